"""One model call for a batch of score and recommend requests (no Ray here)."""

from dataclasses import dataclass
from typing import Any

import torch

from ray_rec.model.artifact import Recommender, pad_rows


@dataclass
class Job:
    """One request inside a batch: a score job has candidates, a recommend job has k."""

    history: list[int]  # every known click, oldest first (the model reads the last history_len)
    candidates: list[int] | None = None
    k: int = 0
    exclude: bool = True
    time_buckets: list[int] | None = None  # one per history click, when the request sent click times


@torch.inference_mode()
def run_jobs(rec: Recommender, jobs: list[Job]) -> list[Any]:
    """Score and recommend jobs in one forward pass, padded to the longest history."""
    model = rec.model
    # Each history's most recent clicks feed the model; all of them are excluded from its top-k.
    # Requests without click times read every gap as unknown (bucket 0), as in a batch of none.
    times = [j.time_buckets or [0] * len(j.history) for j in jobs] if any(j.time_buckets for j in jobs) else None
    u = model.user_interest(rec.window([j.history for j in jobs]), None if times is None else rec.window(times))  # (B, D)
    results: list[Any] = [None] * len(jobs)
    score_rows = [r for r, j in enumerate(jobs) if j.candidates is not None]
    if score_rows:
        cand = pad_rows([jobs[r].candidates or [] for r in score_rows])
        scores = model.relevance(u[score_rows], model.features.item_features(cand)).tolist()  # (S, C)
        for i, r in enumerate(score_rows):
            results[r] = scores[i][: len(jobs[r].candidates or [])]
    rec_rows = [r for r, j in enumerate(jobs) if j.candidates is None]
    if rec_rows:
        scores = model.relevance.catalog(u[rec_rows], model.features.all_item_features())  # (R, N + 1)
        # The seen items of each excluding request; padding (and non-excluding rows) hit column 0,
        # which is never returned anyway.
        scores.scatter_(1, pad_rows([jobs[r].history if jobs[r].exclude else [] for r in rec_rows]), float("-inf"))
        scores[:, 0] = float("-inf")
        k = min(max(jobs[r].k for r in rec_rows), model.config.num_items)
        top = torch.topk(scores, k, dim=1)
        for i, r in enumerate(rec_rows):
            pairs = zip(top.indices[i, : jobs[r].k].tolist(), top.values[i, : jobs[r].k].tolist())
            results[r] = [(int(idx), float(s)) for idx, s in pairs if s != float("-inf")]
    return results
