"""Scoring the catalog in bounded blocks: top-k with exclusion, target ranks, validation metrics.

Every caller that ranks the whole catalog comes here: `Recommender` (Python API and Serve),
batch scoring, `ray-rec evaluate` and validation during training. Histories are encoded
`BLOCK_ROWS` at a time and catalog scores held at most `BLOCK_CELLS` at a time, so a call with
every user of a large catalog stays within memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from ray_rec.device import model_device, to_device
from ray_rec.metrics import DEFAULT_KS, RankingMetrics, full_ranks, sample_negatives, sampled_ranks
from ray_rec.model.interest_model import InterestModel

BLOCK_ROWS = 1024  # histories encoded at once
BLOCK_CELLS = 1 << 25  # catalog scores (users x items) held at once: 32M floats, 128 MB


def catalog_blocks(rows: int, num_items: int, max_rows: int | None = None) -> Iterator[slice]:
    """Slices of ``rows`` users whose catalog scores (users x (num_items + 1)) stay within
    ``BLOCK_CELLS``, at most ``max_rows`` users and at least one each."""
    step = max(1, BLOCK_CELLS // (num_items + 1))
    step = step if max_rows is None else min(step, max_rows)
    for start in range(0, rows, step):
        yield slice(start, start + step)


@torch.inference_mode()
def interests(model: InterestModel, items: torch.Tensor, time_buckets: torch.Tensor | None = None) -> torch.Tensor:
    """Left-padded histories (B, L) -> each user's interest after the last click (B, D), encoded
    `BLOCK_ROWS` histories at a time. The caller puts the model in eval mode (`evaluate` does)."""
    if len(items) <= BLOCK_ROWS:
        return model.user_interest(items, time_buckets)
    return torch.cat([
        model.user_interest(items[start : start + BLOCK_ROWS],
                            None if time_buckets is None else time_buckets[start : start + BLOCK_ROWS])
        for start in range(0, len(items), BLOCK_ROWS)
    ])


@torch.inference_mode()
def top_k(model: InterestModel, u: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best items of the catalog for each interest (B, D), never an item of its ``exclude``
    row (B, E; 0 entries ignored): (indices (B, k'), scores (B, k')), best first, k' = min(k,
    catalog). Where fewer items are left than k', the tail scores -inf (callers drop those)."""
    k = min(k, model.config.num_items)
    ids, scores = [], []
    for rows in list(catalog_blocks(len(u), model.config.num_items)) or [slice(0, 0)]:
        block = model.catalog_scores(u[rows])  # (b, N + 1), column 0 -inf
        if exclude is not None:
            block.scatter_(1, exclude[rows], float("-inf"))
        top = torch.topk(block, k, dim=1)
        ids.append(top.indices)
        scores.append(top.values)
    return torch.cat(ids), torch.cat(scores)


@torch.inference_mode()
def rank_targets(model: InterestModel, u: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor,
                 negatives: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each user's target rank over the full catalog, its ``seen`` items excluded, and, given
    ``negatives`` (B, n), among those: (B,) each, 0 = best."""
    full, sampled = [], []
    for rows in catalog_blocks(len(targets), model.config.num_items):
        scores = model.catalog_scores(u[rows])  # (b, N + 1)
        full.append(full_ranks(scores, targets[rows], seen[rows]))
        if negatives is not None:
            target_scores = scores.gather(1, targets[rows].unsqueeze(1)).squeeze(1)
            sampled.append(sampled_ranks(target_scores, scores.gather(1, negatives[rows])))
    return torch.cat(full) if full else targets.new_zeros(0), None if negatives is None else (
        torch.cat(sampled) if sampled else targets.new_zeros(0))


def evaluate(
    model: InterestModel,
    batches: Iterable[dict[str, torch.Tensor]],
    ks: tuple[int, ...] = DEFAULT_KS,
    sampled_negatives: int = 0,
    seed: int = 0,
) -> tuple[RankingMetrics, RankingMetrics | None]:
    """Full-catalog ranking (seen items excluded) and, with ``sampled_negatives`` > 0, ranking
    among that many uniformly sampled negatives, over evaluation batches
    (``ray_rec.data.examples.evaluation_examples``) on the model's device; the metrics as
    mergeable accumulators. The negatives are drawn on the host: the same on every device."""
    model.eval()  # once per validation, not per batch; the next training step sets train mode again
    device = model_device(model)
    full = RankingMetrics(ks)
    sampled = RankingMetrics(ks) if sampled_negatives else None
    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        if sampled_negatives:
            drawn = sample_negatives(model.config.num_items, batch["targets"], batch["seen"], sampled_negatives, generator)
            batch = {**batch, "sampled_negatives": drawn}
        batch = to_device(batch, device)
        negatives = batch.get("sampled_negatives")
        u = interests(model, batch["items"], batch.get("time_buckets"))
        ranks, negative_ranks = rank_targets(model, u, batch["targets"], batch["seen"], negatives)
        full.add(ranks)
        if sampled is not None and negative_ranks is not None:
            sampled.add(negative_ranks)
    return full, sampled
