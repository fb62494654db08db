"""Why an item was recommended: how much each click of the history moved its score.

An explanation covers the clicks the model reads (the last ``history_len`` of the history). Each
click gets a contribution to each target item's score by one of three methods:

- ``leave_one_out``: the target's score minus its score with that click deleted from the history
  (the window then reaches one click further back, as it would for that shorter history). Exact
  for one deletion, for every tracker and enhancer; one forward pass over n histories for n clicks,
  all of a batch's explained queries in one pass.
- ``gradient``: gradient x input of the target's score on the click's history features (item,
  side features, position and time together), one backward pass for all targets of a batch.
- ``attention``: the AUGRU enhancer's attention score of the click's step, the same for every
  target (enhancer ``augru`` only).

A click's share is its contribution over the sum of the absolute contributions of the window's
clicks: signed, and the shares' absolute values add up to 1. A deleted click's time gap is not
recomputed: the next click keeps the time bucket it had.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ray_rec.device import to_device
from ray_rec.model.enhancement import AUGRUEnhancer
from ray_rec.model.interest_model import InterestModel
from ray_rec.predict import ranking
from ray_rec.predict.inputs import pad_rows, window

METHODS = ("leave_one_out", "gradient", "attention")
DEFAULT_METHOD = "leave_one_out"  # the most faithful of the three (BENCHMARKS.md, "Explanations")
DEFAULT_TOP = 3  # clicks named per explained item
MAX_TOP = 20


class Reason(NamedTuple):
    """One click that moved an item's score: its raw ``item_id``, its ``position`` in the history as
    sent (0 = oldest) and its signed ``share`` of the window's total absolute contribution."""

    item_id: object
    position: int
    share: float


@dataclass
class Job:
    """One history to explain: known item indices (oldest first), their time buckets (or None), and
    the item indices whose scores to explain (0 = an unknown candidate: explained by nothing)."""

    history: list[int]
    time_buckets: list[int] | None
    targets: list[int]


def clicks_asked(explain: bool, top: int) -> int:
    """Clicks to name per answer: ``top`` with ``explain``, else 0.

    Raises:
        ValueError: ``explain`` with ``top`` outside 1..`MAX_TOP`."""
    if explain and not 1 <= top <= MAX_TOP:
        raise ValueError(f"explain_top={top} must be between 1 and {MAX_TOP}")
    return top if explain else 0


def check_method(method: str, model: InterestModel) -> None:
    """Raises ValueError: ``method`` is not one of `METHODS`, or does not apply to this model."""
    if method not in METHODS:
        raise ValueError(f"explain method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "attention" and not isinstance(model.enhancer, AUGRUEnhancer):
        raise ValueError(f"explain method 'attention' reads the AUGRU enhancer's attention; this model's enhancer is "
                         f"{model.config.enhancer!r} (use leave_one_out or gradient)")


def contributions(model: InterestModel, jobs: Sequence[Job], method: str = DEFAULT_METHOD) -> list[np.ndarray]:
    """Per job a (targets, n) array: how much each of the n clicks the model reads (oldest first)
    raised each target's score. The model is in eval mode."""
    check_method(method, model)
    live = [i for i, job in enumerate(jobs) if job.targets and job.history]
    out = [np.zeros((len(job.targets), 0), dtype=np.float32) for job in jobs]
    if live:
        chosen = [jobs[i] for i in live]
        found = _leave_one_out(model, chosen) if method == "leave_one_out" else _gradient(model, chosen, method == "attention")
        for i, array in zip(live, found):
            out[i] = array
    return out


def reasons(contribution: np.ndarray, top: int) -> list[list[tuple[int, float]]]:
    """Per target (row): its ``top`` clicks by contribution, largest first, as (position in the
    window, signed share)."""
    out = []
    for row in contribution:
        total = float(np.abs(row).sum())
        order = np.argsort(-row, kind="stable")[:top]
        out.append([(int(j), float(row[j]) / total if total > 0 else 0.0) for j in order])
    return out


def _read_span(job: Job, length: int) -> tuple[int, int]:
    """(clicks read, index of the first one in the history)."""
    n = min(len(job.history), length)
    return n, len(job.history) - n


def _leave_one_out(model: InterestModel, jobs: Sequence[Job]) -> list[np.ndarray]:
    length = model.config.history_len
    rows: list[list[int]] = []
    times: list[list[int]] = []
    targets: list[list[int]] = []
    spans = []
    for job in jobs:
        n, first = _read_span(job, length)
        spans.append((len(rows), n))
        buckets = job.time_buckets or [0] * len(job.history)
        for drop in [None, *range(first, first + n)]:  # the whole history, then each click deleted
            keep = [i for i in range(len(job.history)) if i != drop]
            rows.append([job.history[i] for i in keep])
            times.append([buckets[i] for i in keep])
            targets.append(job.targets)
    inputs = {"items": window(rows, length), "targets": pad_rows(targets)}
    if any(job.time_buckets for job in jobs):
        inputs["time_buckets"] = window(times, length)
    inputs = to_device(inputs, next(model.parameters()).device)
    with torch.inference_mode():
        u = ranking.interests(model, inputs["items"], inputs.get("time_buckets"))
        scores = model.candidate_scores(u, inputs["targets"]).float().cpu().numpy()  # (rows, T)
    out = []
    for job, (start, n) in zip(jobs, spans):
        t = len(job.targets)
        base, without = scores[start, :t], scores[start + 1 : start + 1 + n, :t]
        out.append((base[None, :] - without).T)  # (T, n)
    return out


def _gradient(model: InterestModel, jobs: Sequence[Job], attention: bool) -> list[np.ndarray]:
    """Gradient x input (one row per target), or the AUGRU's step scores (one row per job)."""
    length = model.config.history_len
    per_job = [1 if attention else len(job.targets) for job in jobs]
    rows = [job.history for job, m in zip(jobs, per_job) for _ in range(m)]
    times = [job.time_buckets or [0] * len(job.history) for job, m in zip(jobs, per_job) for _ in range(m)]
    inputs = {"items": window(rows, length),
              "targets": torch.tensor([t for job, m in zip(jobs, per_job) for t in job.targets[:m]])}
    if any(job.time_buckets for job in jobs):
        inputs["time_buckets"] = window(times, length)
    inputs = to_device(inputs, next(model.parameters()).device)
    with torch.inference_mode(False), torch.enable_grad():
        items = inputs["items"].clone()  # tensors made under inference mode cannot enter autograd
        buckets = inputs["time_buckets"].clone() if "time_buckets" in inputs else None
        valid = items > 0
        feats = model.features.sequence_features(items, buckets).detach().requires_grad_(True)  # (R, L, D)
        states = model.tracker(feats, valid)
        if attention:
            assert isinstance(model.enhancer, AUGRUEnhancer)
            attributed = model.enhancer.step_scores(states, valid)[..., 0]  # (R, L)
        else:
            u = model.enhancer(states, valid)[:, -1]
            picked = model.candidate_scores(u, inputs["targets"].clone()[:, None])[:, 0]  # (R,)
            (grad,) = torch.autograd.grad(picked.sum(), feats)
            attributed = (grad * feats).sum(-1)  # (R, L)
    values = attributed.detach().float().cpu().numpy()
    out, row = [], 0
    for job, m in zip(jobs, per_job):
        n, _ = _read_span(job, length)
        block = values[row : row + m, values.shape[1] - n :]  # left padding: the clicks are the last n columns
        out.append(np.repeat(block, len(job.targets), 0) if attention else block)
        row += m
    return out
