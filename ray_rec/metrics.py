"""Ranking metrics on tensors: HR@k, NDCG@k and MRR, over a full catalog or sampled negatives.

Ranks are 0-based and pessimistic: an item tied with the target counts as ranked above it, so a
model that scores everything alike gets no credit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
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


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 counters: a fixed, well-mixed pseudo-random value each."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def user_negatives(
    num_items: int, targets: torch.Tensor, exclude: torch.Tensor | None, n: int, keys: Sequence[int], seed: int = 0
) -> torch.Tensor:
    """`sample_negatives` drawn from each row's own counter-based stream, keyed by ``seed`` and the
    row's key (a stable hash of its user, < 2**32): a user gets the same negatives whichever batch,
    actor or order evaluates it, so sampled metrics repeat from run to run: (B, n).

    Draw j of a row is SplitMix64((seed * 2**32 + key) * 2**20 + j) mod num_items + 1; draws that hit
    the target or an excluded item are skipped, as `sample_negatives` redraws them.
    """
    b, per_round = len(keys), 2 * n
    base = (np.uint64(seed) << np.uint64(32)) + np.asarray(keys, dtype=np.uint64)  # (B,)
    bad = targets.numpy()[:, None] if exclude is None else torch.cat([targets.unsqueeze(1), exclude], 1).numpy()
    out = np.zeros((b, n), dtype=np.int64)
    filled = np.zeros(b, dtype=np.int64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        for r in range(100):
            need = np.flatnonzero(filled < n)
            if not len(need):
                break
            j = np.arange(r * per_round, (r + 1) * per_round, dtype=np.uint64)
            draws = (_splitmix64((base[need, None] << np.uint64(20)) + j) % np.uint64(num_items)).astype(np.int64) + 1
            ok = ~(draws[:, :, None] == bad[need, None, :]).any(2)  # (R, per_round)
            slot = np.cumsum(ok, 1) + filled[need, None] - 1  # where each valid draw goes in its row
            take = ok & (slot < n)
            rows, cols = np.nonzero(take)
            out[need[rows], slot[rows, cols]] = draws[rows, cols]
            filled[need] = np.minimum(n, filled[need] + ok.sum(1))
    return torch.from_numpy(out)  # a catalog too small to fill a row leaves its last slots at 0


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
