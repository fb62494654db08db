"""Ranking metrics on tensors: HR@k, NDCG@k and MRR, over a full catalog or sampled negatives.

Ranks are 0-based and pessimistic: an item tied with the target counts as ranked above it, so a
model that scores everything alike gets no credit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

DEFAULT_KS = (5, 10, 20)


def full_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of each target among all items, seen items excluded.

    Args:
        scores: (B, N + 1) scores of every item; column 0 is padding and never ranked.
        targets: (B,) target item indices.
        exclude: (B, E) item indices to leave out (the user's seen items; 0 = none). The target
            itself is never excluded.

    Returns:
        (B,) ranks, 0 = best.
    """
    scores = scores.clone()
    target_scores = scores.gather(1, targets.unsqueeze(1))  # (B, 1)
    scores[:, 0] = float("-inf")
    if exclude is not None:
        scores.scatter_(1, exclude, float("-inf"))
    scores.scatter_(1, targets.unsqueeze(1), float("-inf"))  # the target is not its own rival
    return (scores >= target_scores).sum(1)


def sample_negatives(
    num_items: int, targets: torch.Tensor, exclude: torch.Tensor | None, n: int, generator: torch.Generator
) -> torch.Tensor:
    """Uniformly sampled negatives per row, never the target or an excluded item: (B, n).

    Rejected draws are redrawn, so every row gets exactly n valid negatives (the catalog must
    hold more than n + E items).
    """
    b = targets.shape[0]
    out = torch.randint(1, num_items + 1, (b, n), generator=generator)
    for _ in range(100):
        bad = out == targets.unsqueeze(1)
        if exclude is not None:
            bad |= (out.unsqueeze(2) == exclude.unsqueeze(1)).any(2)
        if not bad.any():
            return out
        out[bad] = torch.randint(1, num_items + 1, (int(bad.sum()),), generator=generator)
    return out


def sampled_ranks(target_scores: torch.Tensor, negative_scores: torch.Tensor) -> torch.Tensor:
    """Rank of the target among sampled negatives: (B,), (B, n) -> (B,)."""
    return (negative_scores >= target_scores.unsqueeze(1)).sum(1)


class RankingMetrics:
    """Accumulates ranks batch by batch; sums can be merged across workers.

    Example:
        >>> m = RankingMetrics(ks=(1, 10))
        >>> m.add(torch.tensor([0, 3, 50]))
        >>> round(m.result()["HR@10"], 3)
        0.667
    """

    def __init__(self, ks: Iterable[int] = DEFAULT_KS) -> None:
        self.ks = tuple(sorted(ks))
        self.sums = torch.zeros(2 * len(self.ks) + 2, dtype=torch.float64)  # HR..., NDCG..., MRR, count

    def add(self, ranks: torch.Tensor) -> None:
        ranks = ranks.to(torch.float64).cpu()
        for i, k in enumerate(self.ks):
            hit = ranks < k
            self.sums[i] += hit.sum()
            self.sums[len(self.ks) + i] += (hit / torch.log2(ranks + 2)).sum()
        self.sums[-2] += (1.0 / (ranks + 1)).sum()
        self.sums[-1] += ranks.numel()

    def merge(self, sums: torch.Tensor) -> None:
        """Add another accumulator's ``sums`` (e.g. after an all-reduce)."""
        self.sums += sums.to(torch.float64).cpu()

    def result(self) -> dict[str, float]:
        n = float(self.sums[-1])
        if n == 0:
            return {**{f"HR@{k}": math.nan for k in self.ks}, **{f"NDCG@{k}": math.nan for k in self.ks}, "MRR": math.nan, "count": 0}
        out = {f"HR@{k}": float(self.sums[i]) / n for i, k in enumerate(self.ks)}
        out.update({f"NDCG@{k}": float(self.sums[len(self.ks) + i]) / n for i, k in enumerate(self.ks)})
        out["MRR"] = float(self.sums[-2]) / n
        out["count"] = int(n)
        return out
