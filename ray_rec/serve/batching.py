"""One model call for a batch of score and recommend requests (no Ray here)."""

from dataclasses import dataclass
from typing import Any

import torch

from ray_rec.model.artifact import Recommender


@dataclass
class Job:
    """One request inside a batch: a score job has candidates, a recommend job has k."""

    history: list[int]
    candidates: list[int] | None = None
    k: int = 0
    exclude: bool = True


@torch.inference_mode()
def run_jobs(rec: Recommender, jobs: list[Job]) -> list[Any]:
    """Score and recommend jobs in one forward pass, padded to the longest history."""
    model = rec.model
    width = max(max(len(j.history) for j in jobs), 1)
    items = torch.zeros(len(jobs), width, dtype=torch.long)
    for r, job in enumerate(jobs):
        if job.history:
            items[r, width - len(job.history) :] = torch.tensor(job.history)
    u = model.user_interest(items)  # (B, D)
    results: list[Any] = [None] * len(jobs)
    score_rows = [r for r, j in enumerate(jobs) if j.candidates is not None]
    if score_rows:
        c = max(len(jobs[r].candidates or []) for r in score_rows)
        cand = torch.zeros(len(score_rows), c, dtype=torch.long)
        for i, r in enumerate(score_rows):
            cand[i, : len(jobs[r].candidates or [])] = torch.tensor(jobs[r].candidates or [])
        scores = model.relevance(u[score_rows], model.features.item_features(cand))  # (S, C)
        for i, r in enumerate(score_rows):
            results[r] = scores[i, : len(jobs[r].candidates or [])].tolist()
    rec_rows = [r for r, j in enumerate(jobs) if j.candidates is None]
    if rec_rows:
        scores = model.relevance.catalog(u[rec_rows], model.features.all_item_features())  # (R, N + 1)
        scores[:, 0] = float("-inf")
        for i, r in enumerate(rec_rows):
            if jobs[r].exclude and jobs[r].history:
                scores[i, torch.tensor(jobs[r].history)] = float("-inf")
        k = min(max(jobs[r].k for r in rec_rows), model.config.num_items)
        top = torch.topk(scores, k, dim=1)
        for i, r in enumerate(rec_rows):
            pairs = zip(top.indices[i, : jobs[r].k].tolist(), top.values[i, : jobs[r].k].tolist())
            results[r] = [(int(idx), float(s)) for idx, s in pairs if s != float("-inf")]
    return results
