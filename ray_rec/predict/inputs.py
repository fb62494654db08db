"""Request rows -> model inputs: checked lists, click times as time buckets, padded index tensors."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ray_rec.data.examples import MAX_ABS_SECONDS, time_buckets


def check_rows(name: str, rows: Iterable[Iterable[Any]], what: str = "item ids") -> list[list[Any]]:
    """``rows`` as lists, one per user (each a list, tuple or array). A flat list of ids is
    refused: it would otherwise read each id's characters as a history of unknown items."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
        raise TypeError(f"{name} must be a list of lists of {what}, got {type(rows).__name__}")
    rows = list(rows)  # a generator is read once
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, Iterable):
            raise TypeError(
                f"{name}[{i}] is {type(row).__name__} {row!r:.40}, not a list of {what} "
                f"(pass one list per user: [[{what[:-1]}, ...], ...])"
            )
    return [list(row) for row in rows]


def click_time_buckets(stamps: Sequence[float], clicks: int, num_buckets: int, name: str = "timestamps") -> np.ndarray:
    """One history's click times (epoch seconds, or milliseconds as `prepare` reads them, oldest
    first) -> the time bucket of each click, as training buckets them (the first click: 1).
    Errors name the times ``name``."""
    try:
        ts = np.asarray(stamps, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers (epoch seconds or milliseconds)") from None
    if ts.ndim != 1 or len(ts) != clicks:
        raise ValueError(f"{name} has {ts.size} values for {clicks} history items")
    if not np.isfinite(ts).all():
        raise ValueError(f"{name} holds a value that is not a finite number")
    ts = np.where(np.abs(ts) > MAX_ABS_SECONDS, ts / 1000.0, ts)
    if (np.diff(ts) < 0).any():
        raise ValueError(f"{name} must be oldest first, as the history is (they decrease)")
    return time_buckets(np.concatenate([[-1.0], np.diff(ts)]), num_buckets)


def pad_rows(rows: Sequence[Sequence[int]], left: bool = False) -> torch.Tensor:
    """Ragged rows of item indices -> one (len(rows), longest row or 1) LongTensor padded with 0,
    on the left (histories: each row's last click in the last column) or on the right.
    One boolean-mask fill for the whole batch (row-by-row tensors cost 10x as much)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = max(int(lengths.max(initial=0)), 1)
    out = np.zeros((len(rows), width), dtype=np.int64)
    pos = np.arange(width)
    fill = pos >= (width - lengths)[:, None] if left else pos < lengths[:, None]
    out[fill] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(out)


def window(rows: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """Histories (item indices or time buckets, oldest first) -> the left-padded (B, <= length)
    last ``length`` steps the model reads."""
    return pad_rows([row[-length:] for row in rows], left=True)
