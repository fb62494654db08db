"""The plain PyTorch parts of training: one step, evaluation. No Ray here; the Ray Train worker
loop and the single-process baseline both call these."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ray_rec.config import TrainConfig
from ray_rec.metrics import DEFAULT_KS, RankingMetrics, full_ranks, sample_negatives, sampled_ranks
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
        scores = model.score_catalog(batch["items"], batch.get("time_buckets"))  # (B, N + 1)
        full.add(full_ranks(scores, batch["targets"], batch["seen"]))
        if sampled is not None:
            neg = sample_negatives(model.config.num_items, batch["targets"], batch["seen"], sampled_negatives, generator)
            target_scores = scores.gather(1, batch["targets"].unsqueeze(1)).squeeze(1)
            sampled.add(sampled_ranks(target_scores, scores.gather(1, neg)))
    return full, sampled
