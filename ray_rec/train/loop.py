"""The plain PyTorch parts of training: one step, evaluation. No Ray here; the Ray Train worker
loop and the single-process baseline both call these."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ray_rec.config import TrainConfig
from ray_rec.metrics import DEFAULT_KS, RankingMetrics, full_ranks, sample_negatives, sampled_ranks
from ray_rec.model.artifact import catalog_blocks
from ray_rec.model.interest_model import InterestModel


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with the betas SASRec uses; weight decay only on matrices, not on norms or biases."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.Adam(groups, lr=cfg.lr, betas=(0.9, 0.98))


def train_step(
    model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, grad_clip: float
) -> dict[str, float]:
    """One optimisation step; returns the losses as floats."""
    model.train()
    losses = model(batch)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}


@torch.inference_mode()
def rank_targets(
    model: InterestModel, batch: dict[str, torch.Tensor], negatives: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each user's target rank over the full catalog (seen items excluded) and, given ``negatives``
    (B, n), among those: (B,) each, 0 = best.

    Users are scored in `catalog_blocks`, so memory stays flat however large the catalog: at 1M
    items a batch of 512 users in one block held 2 GB of scores, and the process peaked at about
    9 GB (README "Top-k at catalog scale": `python -m bench.recommend_many --call evaluate`).
    """
    full, sampled = [], []
    for rows in catalog_blocks(len(batch["targets"]), model.config.num_items):
        items, targets, seen = batch["items"][rows], batch["targets"][rows], batch["seen"][rows]
        buckets = batch.get("time_buckets")
        scores = model.score_catalog(items, None if buckets is None else buckets[rows])  # (b, N + 1)
        full.append(full_ranks(scores, targets, seen))
        if negatives is not None:
            target_scores = scores.gather(1, targets.unsqueeze(1)).squeeze(1)
            sampled.append(sampled_ranks(target_scores, scores.gather(1, negatives[rows])))
    return torch.cat(full), None if negatives is None else torch.cat(sampled)


def evaluate(
    model: InterestModel,
    batches: Iterable[dict[str, torch.Tensor]],
    ks: tuple[int, ...] = DEFAULT_KS,
    sampled_negatives: int = 0,
    seed: int = 0,
) -> tuple[RankingMetrics, RankingMetrics | None]:
    """Full-catalog ranking (seen items excluded) and, optionally, ranking among sampled negatives.

    Args:
        batches: evaluation batches from ``ray_rec.data.examples.evaluation_examples``.
        sampled_negatives: 0 to skip, else the number of uniformly sampled negatives per user.

    Returns:
        (full ranking metrics, sampled metrics or None), as accumulators (mergeable sums).
    """
    model.eval()
    full = RankingMetrics(ks)
    sampled = RankingMetrics(ks) if sampled_negatives else None
    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        negatives = None
        if sampled_negatives:
            negatives = sample_negatives(model.config.num_items, batch["targets"], batch["seen"], sampled_negatives, generator)
        ranks, negative_ranks = rank_targets(model, batch, negatives)
        full.add(ranks)
        if sampled is not None and negative_ranks is not None:
            sampled.add(negative_ranks)
    return full, sampled
