"""Why an item was recommended: which clicks of the history moved its score.

An explanation covers the clicks the model reads (the last ``history_len`` of the history). Four
methods:

- ``best_set`` (default): the ``top`` clicks whose deletion *together* lowers the item's score
  most. Every set of ``top`` clicks of a pool is deleted and scored: the whole window when it is
  short, else the clicks with the largest leave-one-out contributions, as many as keep the sets
  within `MAX_SETS` (8 clicks for 3). Exact where the pool is the window. One forward pass scores
  every query's single deletions, a second every query's sets (a query's items share its sets; the
  pool of several items is ordered by each click's largest contribution to any of them); a lone
  query whose window is its own pool is scored in one pass.
- ``leave_one_out``: the ``top`` clicks with the largest single-deletion contributions: the
  target's score minus its score with that click deleted from the history (the window then reaches
  one click further back, as it would for that shorter history). Exact for one deletion, for every
  tracker and enhancer; one forward pass over n histories for n clicks, all of a batch's explained
  queries in one pass.
- ``gradient``: gradient x input of the target's score on the click's history features (item,
  side features, position and time together), one backward pass for all targets of a batch.
- ``attention``: the AUGRU enhancer's attention score of the click's step, the same for every
  target (enhancer ``augru`` only).

A named click's share is its own contribution (its leave-one-out contribution for ``best_set``)
over the sum of the absolute contributions of the window's clicks: signed, and the shares'
absolute values add up to at most 1. A deleted click's time gap is not recomputed: the next click
keeps the time bucket it had.
"""

from __future__ import annotations

import itertools
import math
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

METHODS = ("best_set", "leave_one_out", "gradient", "attention")
DEFAULT_METHOD = "best_set"  # the most faithful (BENCHMARKS.md, "Explanations")
DEFAULT_TOP = 3  # clicks named per explained item
MAX_TOP = 20
MAX_SETS = 56  # click sets `best_set` deletes per query; C(8, 3): the 8 most contributing for 3


class Reason(NamedTuple):
    """One click that moved an item's score: its raw ``item_id``, its ``position`` in the history as
    sent (0 = oldest) and its signed ``share`` of the window's total absolute contribution."""

    item_id: object
    position: int
    share: float


@dataclass
class Job:
    """One history to explain: known item indices (oldest first), their time buckets (or None), and
    the item indices whose scores to explain (0 = an unknown candidate: explained by nothing), and
    how many clicks to name per target."""

    history: list[int]
    time_buckets: list[int] | None
    targets: list[int]
    top: int = DEFAULT_TOP


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


def explain(model: InterestModel, jobs: Sequence[Job], method: str = DEFAULT_METHOD) -> list[list[list[tuple[int, float]]]]:
    """Per job, per target: its ``job.top`` clicks (position in the window the model reads, signed
    share), the most influential first. The model is in eval mode."""
    check_method(method, model)
    if method != "best_set":
        return [reasons(c, job.top) for c, job in zip(contributions(model, jobs, method), jobs)]
    found, chosen = _best_sets(model, jobs)
    return [[_named(row, picked) for row, picked in zip(c, sets)] for c, sets in zip(found, chosen)]


def contributions(model: InterestModel, jobs: Sequence[Job], method: str = "leave_one_out") -> list[np.ndarray]:
    """Per job a (targets, n) array: how much each of the n clicks the model reads (oldest first)
    raised each target's score, by a method that rates clicks one by one (not ``best_set``). The
    model is in eval mode."""
    check_method(method, model)
    if method == "best_set":
        raise ValueError("best_set chooses clicks together: it has no per-click contributions (use explain)")
    live = [i for i, job in enumerate(jobs) if job.targets and job.history]
    out = [np.zeros((len(job.targets), 0), dtype=np.float32) for job in jobs]
    if live:
        chosen = [jobs[i] for i in live]
        found = _leave_one_out(model, chosen)[0] if method == "leave_one_out" else _gradient(model, chosen, method == "attention")
        for i, array in zip(live, found):
            out[i] = array
    return out


def reasons(contribution: np.ndarray, top: int) -> list[list[tuple[int, float]]]:
    """Per target (row): its ``top`` clicks by contribution, largest first, as (position in the
    window, signed share)."""
    return [_named(row, np.argsort(-row, kind="stable")[:top]) for row in contribution]


def _named(row: np.ndarray, chosen: Sequence[int] | np.ndarray) -> list[tuple[int, float]]:
    """The ``chosen`` positions of a window with their shares of ``row``'s contributions, largest first."""
    total = float(np.abs(row).sum())
    order = sorted(chosen, key=lambda j: (-row[j], j))
    return [(int(j), float(row[j]) / total if total > 0 else 0.0) for j in order]


def pool_size(top: int, n: int) -> int:
    """Clicks `best_set` searches for sets of ``top`` among a window of ``n``: the most whose sets
    of ``top`` number at most `MAX_SETS` (all ``n`` when they do, at least ``top``)."""
    size = min(top, n)
    while size < n and math.comb(size + 1, top) <= MAX_SETS:
        size += 1
    return size


def _best_sets(model: InterestModel, jobs: Sequence[Job]) -> tuple[list[np.ndarray], list[list[list[int]]]]:
    """Per job: its leave-one-out contributions, (targets, n), and per target the window positions
    of the ``job.top`` clicks whose deletion together lowers the target's score most, among the
    job's pool (see the module docstring)."""
    spans = [_read_span(job, model.config.history_len)[0] if job.targets else 0 for job in jobs]
    explained = [n > 0 and any(t != 0 for t in job.targets) for job, n in zip(jobs, spans)]  # 0: an unknown candidate
    sets = [_sets(range(n), job.top) if e and pool_size(job.top, n) == n else [] for job, n, e in zip(jobs, spans, explained)]
    # A lone query whose window is its own pool is scored in one pass, its sets beside its single deletions: a
    # pass's fixed cost is most of a lone query's. In a batch the sets keep their own pass, whose rows are
    # padded only to the shortened histories (the set rows of a short window are ``top`` clicks shorter).
    early = [len(s) > 1 and sum(explained) == 1 for s in sets]  # one set: the whole window, nothing to choose
    found, scored = _leave_one_out(model, jobs, [s if e else [] for s, e in zip(sets, early)])
    set_scores = {i: scored[i] for i, e in enumerate(early) if e}
    for i, (job, contribution) in enumerate(zip(jobs, found)):
        if explained[i] and not sets[i]:
            known = contribution[[t != 0 for t in job.targets]]
            sets[i] = _sets(sorted(int(j) for j in np.argsort(-known.max(0), kind="stable")[: pool_size(job.top, spans[i])]), job.top)
    late = [i for i, s in enumerate(sets) if len(s) > 1 and not early[i]]
    set_scores.update(zip(late, _scores_without(model, [jobs[i] for i in late], [sets[i] for i in late])))
    chosen = [[list(sets[i][int(a)]) for a in set_scores[i].argmin(0)] if i in set_scores
              else [list(sets[i][0]) if sets[i] else [] for _ in job.targets] for i, job in enumerate(jobs)]
    return found, chosen


def _sets(pool: Sequence[int], top: int) -> list[tuple[int, ...]]:
    """Every set of ``top`` positions of ``pool`` (the whole pool when it holds fewer)."""
    return list(itertools.combinations(pool, min(top, len(pool))))


def _read_span(job: Job, length: int) -> tuple[int, int]:
    """(clicks read, index of the first one in the history)."""
    n = min(len(job.history), length)
    return n, len(job.history) - n


def _leave_one_out(model: InterestModel, jobs: Sequence[Job], extra: Sequence[Sequence[tuple[int, ...]]] | None = None,
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per job: the (targets, n) contributions of the n clicks it reads, and its targets' scores after
    each of its ``extra`` deletions (window positions), (len(extra[i]), targets); one forward pass for
    all. A job without targets or clicks has neither."""
    spans = [_read_span(job, model.config.history_len)[0] if job.targets else 0 for job in jobs]
    more = extra or [() for _ in jobs]
    scored = _scores_without(model, jobs, [[(), *((j,) for j in range(n)), *m] if n else []  # nothing, each click, extra
                                           for n, m in zip(spans, more)])
    found = [(s[0][None, :] - s[1 : n + 1]).T if n else np.zeros((len(job.targets), 0), dtype=np.float32)
             for job, s, n in zip(jobs, scored, spans)]
    return found, [s[1 + n :] for s, n in zip(scored, spans)]


def _scores_without(model: InterestModel, jobs: Sequence[Job], deletions: Sequence[Sequence[tuple[int, ...]]]) -> list[np.ndarray]:
    """Per job, a (len(deletions[i]), targets) array: its targets' scores after deleting each set of
    window positions from its history (the window then reaches further back), every job's
    deletions in one forward pass."""
    length = model.config.history_len
    rows: list[list[int]] = []
    times: list[list[int]] = []
    targets: list[list[int]] = []
    for job, sets in zip(jobs, deletions):
        _, first = _read_span(job, length)
        buckets = job.time_buckets or [0] * len(job.history)
        for deleted in sets:
            drop = {first + j for j in deleted}
            keep = [i for i in range(len(job.history)) if i not in drop]
            rows.append([job.history[i] for i in keep])
            times.append([buckets[i] for i in keep])
            targets.append(job.targets)
    if not rows:
        return [np.zeros((0, len(job.targets)), dtype=np.float32) for job in jobs]
    inputs = {"items": window(rows, length), "targets": pad_rows(targets)}
    if any(job.time_buckets for job in jobs):
        inputs["time_buckets"] = window(times, length)
    inputs = to_device(inputs, next(model.parameters()).device)
    with torch.inference_mode():
        u = ranking.interests(model, inputs["items"], inputs.get("time_buckets"))
        scores = model.candidate_scores(u, inputs["targets"]).float().cpu().numpy()  # (rows, T)
    out, start = [], 0
    for job, sets in zip(jobs, deletions):
        out.append(scores[start : start + len(sets), : len(job.targets)])
        start += len(sets)
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
