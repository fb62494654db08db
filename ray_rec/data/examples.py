"""Per-user sequences -> training and evaluation examples, vectorised with numpy (no Ray).

A sequence row holds ``items`` (item indices, 1-based), ``events`` (1 = click, 0 = browse) and
``timestamps`` (seconds), in time order. Training examples use "sliding targets": a window of up
to L clicked items, left-padded, with the next click after every step as that step's target;
sequences longer than L + 1 clicks give several windows. Browsed-not-clicked items shown before a
click become that step's labelled negatives.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ray_rec.data.schema import check_schema

if TYPE_CHECKING:
    from ray_rec.data.manifest import Manifest

if TYPE_CHECKING:
    import torch

CLICK = 1
BROWSE = 0
BUCKET_WINDOW = 64  # batches per chunk that `length_buckets` regroups by length
MAX_BROWSE = 8  # browsed negatives kept per step when the log has impressions
# Prefix examples' last-step fields, and the per-step fields `collate` widens them to.
LAST_STEP = {"last_target": "targets", "last_negatives": "negatives"}


def browse_width(manifest: Manifest, loss: str) -> int:
    """Browsed negatives per step: `MAX_BROWSE` if the data set's log has browses and the loss
    (`ModelConfig.resolved_loss`) reads them (only `bce` does), else 0: with them, building a
    generated log's examples took about twice as long (0.27 s against 0.14 s for 31,570 users)."""
    return MAX_BROWSE if manifest.has_browse and loss == "bce" else 0


MAX_ABS_SECONDS = 1e11  # about year 5138: a larger click time is in milliseconds (or not a click time)


def time_buckets(deltas: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket seconds since the previous click on a log scale: 1 = first click, 2 = < 1 minute,
    then one bucket per doubling of minutes, capped at ``num_buckets``. Negative = first click."""
    minutes = np.maximum(deltas, 0) / 60.0
    buckets = 2 + np.floor(np.log2(1.0 + minutes)).astype(np.int64)
    buckets = np.minimum(buckets, num_buckets)
    return np.where(deltas < 0, 1, buckets)


def _flat_list(table: pa.Table, name: str, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    column = table.column(name).combine_chunks()
    lengths = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(dtype)
    return values, lengths


class _Clicks:
    """Clicks of a batch of sequences, flattened, with per-click time deltas and browsed negatives."""

    def __init__(self, table: pa.Table, max_browse: int) -> None:
        check_schema(table.schema, "sequence batch", required=("items", "events", "timestamps"))
        items, lengths = _flat_list(table, "items", np.int64)
        events, _ = _flat_list(table, "events", np.int8)
        stamps, _ = _flat_list(table, "timestamps", np.int64)
        n_rows = len(lengths)
        event_row = np.repeat(np.arange(n_rows), lengths)
        is_click = events == CLICK
        self.items = items[is_click]
        self.row = event_row[is_click]
        self.lengths = np.bincount(self.row, minlength=n_rows)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        ts = stamps[is_click]
        first = np.arange(len(self.items)) == self.offsets[self.row]
        self.deltas = np.where(first, -1, ts - np.concatenate([[0], ts[:-1]]))
        self.negatives = self._browsed(items, event_row, is_click, max_browse)

    def _browsed(self, items: np.ndarray, event_row: np.ndarray, is_click: np.ndarray, k: int) -> np.ndarray:
        """(clicks, k) browsed items shown since the previous click, the latest first (0 = none)."""
        table = np.zeros((len(self.items), k), dtype=np.int64)
        if k == 0 or is_click.all():
            return table
        next_click = np.cumsum(is_click) - is_click  # global index of the next click
        browse = ~is_click & (next_click < self.offsets[event_row + 1])
        target = next_click[browse]
        shown = items[browse]
        order = np.lexsort((-np.arange(len(target)), target))  # by target, latest browse first
        target, shown = target[order], shown[order]
        starts = np.searchsorted(target, target, side="left")
        rank = np.arange(len(target)) - starts
        keep = (rank < k) & (shown != self.items[target])
        table[target[keep], rank[keep]] = shown[keep]
        return table


def training_examples(
    table: pa.Table, max_len: int, num_time_buckets: int, max_browse: int = 0, prefixes: bool = False
) -> dict[str, np.ndarray]:
    """Sequences -> training windows.

    Without ``prefixes``: sliding-target windows, each step's next click its target, a sequence
    cut into ceil((clicks - 1) / L) windows. With ``prefixes``: one window per next click, the up
    to L clicks before it, with that click as the target of its last step only (every other step's
    target 0), so each target is predicted from a history ending where a served history ends.

    Returns:
        ``items`` (W, L) int32 and ``time_buckets`` (W, L) int8 (int16 past 127 buckets), left-padded
        with 0; windows: ``targets`` (W, L) int32 and, when ``max_browse`` > 0, ``negatives`` (W, L,
        max_browse) browsed items per step (0 = none); prefixes: only the last step's, ``last_target``
        (W,) and ``last_negatives`` (W, max_browse), which `collate` widens to ``targets`` and
        ``negatives`` (the other steps' are 0: storing them would triple what Ray Data ships).
    """
    c = _Clicks(table, max_browse)
    n_targets = np.maximum(c.lengths - 1, 0)
    n_windows = n_targets if prefixes else -(-n_targets // max_len)  # ceil
    win_row = np.repeat(np.arange(len(c.lengths)), n_windows)
    win_idx = np.arange(len(win_row)) - np.repeat(np.cumsum(n_windows) - n_windows, n_windows)
    # local index of the window's last target
    win_end = win_idx + 1 if prefixes else n_targets[win_row] - win_idx * max_len
    local = win_end[:, None] - (max_len - 1) + np.arange(max_len)[None, :]  # (W, L)
    valid = local >= 1
    g = c.offsets[win_row][:, None] + np.where(valid, local, 1)  # global index of each target
    bucket_type = np.int8 if num_time_buckets <= np.iinfo(np.int8).max else np.int16
    out = {  # narrow types shrink what moves through Ray's object store; `collate` widens to int64
        "items": np.where(valid, c.items[g - 1], 0).astype(np.int32),
        "time_buckets": np.where(valid, time_buckets(c.deltas[g - 1], num_time_buckets), 0).astype(bucket_type),
    }
    if prefixes:  # the target is the last step's, always valid
        out["last_target"] = c.items[g[:, -1]].astype(np.int32)
        if max_browse > 0:
            out["last_negatives"] = c.negatives[g[:, -1]].astype(np.int32)
        return out
    out["targets"] = np.where(valid, c.items[g], 0).astype(np.int32)
    if max_browse > 0:
        out["negatives"] = np.where(valid[..., None], c.negatives[g], 0).astype(np.int32)
    return out


def evaluation_examples(
    table: pa.Table, max_len: int, num_time_buckets: int, with_target: bool = True
) -> dict[str, np.ndarray]:
    """Sequences -> one example per row: the last click is the target (``with_target``), or every
    click is history (for recommending after the whole sequence).

    Returns:
        ``items`` and ``time_buckets`` (n, L) left-padded history; ``seen`` (n, S) every clicked
        item of the history (0-padded), for exclusion; ``row`` (n,) the source row of each
        example; and ``targets`` (n,) with ``with_target``. Rows without enough clicks are skipped.
    """
    c = _Clicks(table, 0)
    rows = np.flatnonzero(c.lengths >= (2 if with_target else 1))
    start = c.offsets[rows]
    end = c.offsets[rows + 1] - (1 if with_target else 0)  # history is [start, end)
    g = end[:, None] + np.arange(-max_len, 0)[None, :]  # (n, L)
    valid = g >= start[:, None]
    g = np.where(valid, g, 0)
    seen_width = max(int((end - start).max()) if len(rows) else 1, 1)
    s = end[:, None] - seen_width + np.arange(seen_width)[None, :]
    seen_valid = s >= start[:, None]
    out = {
        "items": np.where(valid, c.items[g], 0),
        "time_buckets": np.where(valid, time_buckets(c.deltas[g], num_time_buckets), 0),
        "seen": np.where(seen_valid, c.items[np.where(seen_valid, s, 0)], 0),
        "row": rows,
    }
    if with_target:
        out["targets"] = c.items[end]
    return out


def length_buckets(
    examples: dict[str, np.ndarray], batch_size: int, rng: np.random.Generator
) -> Iterator[dict[str, np.ndarray]]:
    """Split a chunk of examples into batches of rows of similar history length, in random order.

    With `collate` cutting off all-padding columns, this saves the work on padding, while the batch
    order and the rows within each length range stay random.
    """
    lengths = (examples["items"] != 0).sum(1)
    order = rng.permutation(len(lengths))
    order = order[np.argsort(lengths[order], kind="stable")]
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for g in rng.permutation(len(groups)):
        idx = np.sort(groups[g])
        yield {name: values[idx] for name, values in examples.items()}


def shuffle_chunks(
    chunks: Iterable[dict[str, np.ndarray]], size: int, buffer_rows: int, rng: np.random.Generator
) -> Iterator[dict[str, np.ndarray]]:
    """Re-chunk a stream of example chunks into chunks of ``size`` rows drawn at random from a
    buffer of about ``buffer_rows + size`` rows: a local shuffle, reproducible from ``rng``.

    Every input row comes out exactly once, and the number of output chunks depends only on the
    number of input rows, so data-parallel workers with equal row counts stay in step. (Ray Data's
    ``local_shuffle_buffer_size`` costs about a second an epoch; this, milliseconds.)
    """
    pool: dict[str, np.ndarray] | None = None
    for chunk in chunks:
        pool = chunk if pool is None else {k: np.concatenate([pool[k], v]) for k, v in chunk.items()}
        while len(pool["items"]) >= buffer_rows + size:
            order = rng.permutation(len(pool["items"]))
            yield {k: v[order[:size]] for k, v in pool.items()}
            pool = {k: v[order[size:]] for k, v in pool.items()}
    if pool is not None and len(pool["items"]):
        order = rng.permutation(len(pool["items"]))
        for start in range(0, len(order), size):
            yield {k: v[order[start : start + size]] for k, v in pool.items()}


def collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Numpy example batch -> int64 torch tensors (the model's batch).

    Leading columns that are padding in every row are cut off: positions count from the right,
    so this changes no result and saves the work on them. Prefix examples' ``last_target`` and
    ``last_negatives`` become ``targets`` and ``negatives`` with 0 on every step but the last.
    """
    import torch  # here, not at the top: building examples needs no torch

    items = batch["items"]
    used = np.flatnonzero((items != 0).any(0))
    start = int(used[0]) if len(used) else items.shape[1] - 1
    out = {}
    for name, values in batch.items():
        if name in LAST_STEP:
            full = np.zeros((len(values), items.shape[1] - start, *values.shape[1:]), dtype=np.int64)
            full[:, -1] = values
            name, values = LAST_STEP[name], full
        elif values.ndim >= 2 and values.shape[1] == items.shape[1]:
            values = values[:, start:]
        out[name] = torch.as_tensor(np.ascontiguousarray(values), dtype=torch.long)
    return out
