"""What feeds a training worker: its shard's chunks per epoch, prefetched, cached when small."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from ray_rec.config import Config
from ray_rec.data.examples import BUCKET_WINDOW, collate, length_buckets, shuffle_chunks


class ExampleCache:
    """Keeps one worker's examples in memory after the first complete pass, when they fit.

    Streaming re-runs the Ray Data pipeline (read, decode, build examples) every epoch: that is
    what lets a shard far larger than memory train, but on a small data set it is pure overhead
    beside the model (an epoch with the next epoch's execution running alongside is slower than
    one without). Once a full pass has gone
    through and its chunks total at most ``limit_mb``, later passes read the memory copy; larger
    shards keep streaming, and a pass cut short is never kept. Workers may choose differently
    (their shards differ in size); `in_step` keeps their steps together either way.
    """

    def __init__(self, limit_mb: int) -> None:
        self.limit = limit_mb * 2**20
        self.too_big = limit_mb <= 0
        self._kept: list[dict[str, np.ndarray]] | None = None

    @property
    def rows(self) -> dict[str, np.ndarray] | None:
        """The kept examples as one array per field (merged once, the chunks then let go)."""
        if not self._kept:
            return None
        if len(self._kept) > 1:
            self._kept = [{k: np.concatenate([c[k] for c in self._kept]) for k in self._kept[0]}]
        return self._kept[0]

    def chunks(self, stream: Callable[[], Iterable[dict[str, np.ndarray]]]) -> Iterator[dict[str, np.ndarray]]:
        """The chunks of ``stream()`` in their order; from memory once a full pass was kept."""
        if self._kept is not None:
            yield from self._kept
            return
        kept: list[dict[str, np.ndarray]] = []
        size = 0
        for chunk in stream():
            if not self.too_big:
                size += sum(v.nbytes for v in chunk.values())
                self.too_big = size > self.limit
                if self.too_big:
                    kept = []
                else:
                    kept.append(chunk)
            yield chunk
        if not self.too_big:
            self._kept = kept

    def epoch(self, stream: Callable[[], Iterable[dict[str, np.ndarray]]], size: int,
              rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        """One training epoch: ``stream()`` until a full pass was kept, then the kept rows in a fresh
        random order (``rng``), cut into chunks of ``size`` rows."""
        if self._kept is None:
            yield from self.chunks(stream)
            return
        rows = self.rows
        if rows is None:
            return
        order = rng.permutation(len(rows["items"]))
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            yield {k: v[idx] for k, v in rows.items()}


def epoch_chunks(examples: Iterable[dict[str, np.ndarray]], cfg: Config, epoch: int, rank: int) -> Iterator[dict[str, np.ndarray]]:
    """This worker's example chunks of one epoch (``examples``: its shard's, built on the worker by
    `ray_rec.data.pipeline.example_chunks`), shuffled through a seeded buffer (`shuffle_chunks`).
    Workers get equal numbers of sequences, not of examples: `in_step` keeps their steps together."""
    size = BUCKET_WINDOW * cfg.train.batch_for(cfg.model)
    yield from shuffle_chunks(examples, size, cfg.data.shuffle_buffer, np.random.default_rng([cfg.data.seed, epoch, rank, 1]))


def in_step(batches: Iterable[dict[str, torch.Tensor]], group: Any = None,
            left_out: Callable[[int], None] = lambda examples: None) -> Iterator[dict[str, torch.Tensor]]:
    """This data-parallel worker's batches while every worker of ``group`` still has one.

    DDP needs every worker in every step, and workers build their examples from equal numbers of
    sequences, which hold unequal numbers of clicks. Before each step the workers agree (one
    all-reduce of a flag on the CPU); once one has run out all stop, and the others' remaining
    batches are read and left untrained, a different surplus each epoch (the shards are reshuffled).
    ``left_out`` gets the number of examples left out, summed over the workers, when there were any.
    A worker's wait for the others at the agreement counts as its wait for data (`fit`'s ``data_wait_s``)."""
    import torch.distributed as dist

    flag, stream = torch.ones(1), iter(batches)
    for batch in stream:
        flag.fill_(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        if not flag.item():
            left = torch.tensor([float(len(batch["items"])) + sum(len(b["items"]) for b in stream)])
            break
        yield batch
    else:
        flag.fill_(0)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)  # the step the others wait in
        left = torch.zeros(1)
    dist.all_reduce(left, group=group)
    if left.item():
        left_out(int(left.item()))


class EpochPrefetcher:
    """Streams the chunks of consecutive epochs from a background thread into a small queue.

    Each epoch's ``iter_batches`` starts a fresh Ray Data execution, which costs 1.5-3 s before
    the first chunk on a small machine. The thread starts the next
    epoch as soon as the current one is read, so that start-up overlaps with training instead of
    stalling it. The queue holds at most ``depth`` chunks, so memory stays bounded.
    """

    _END = object()

    def __init__(self, make_epoch: Any, first_epoch: int, last_epoch: int, depth: int = 4) -> None:
        self._make_epoch, self._last = make_epoch, last_epoch
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(first_epoch,), daemon=True, name="epoch-prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, epoch: int) -> None:
        try:
            while epoch <= self._last and not self._stop.is_set():
                for chunk in self._make_epoch(epoch):
                    if not self._put(chunk):
                        return
                if not self._put(self._END):
                    return
                epoch += 1
        except BaseException as exc:  # surfaced in the training thread
            self._put(exc)

    def epoch(self) -> Iterator[dict[str, np.ndarray]]:
        """The chunks of the next epoch."""
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()


def training_batches(chunks: Iterator[dict[str, np.ndarray]], cfg: Config, epoch: int, rank: int) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch's batches: each chunk regrouped by history length (`length_buckets`), collated."""
    rng = np.random.default_rng([cfg.data.seed, epoch, rank])
    for chunk in chunks:
        for batch in length_buckets(chunk, cfg.train.batch_for(cfg.model), rng):
            yield collate(batch)
