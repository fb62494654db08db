"""A single-process reader of prepared datasets (no Ray), for the plain-PyTorch baseline, small
evaluations and tests. It loads one split into memory; the Ray Data pipeline streams instead."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ray_rec import storage
from ray_rec.data.examples import collate, evaluation_examples, training_examples
from ray_rec.data.prepare import read_manifest


def read_split(data: str, split: str) -> pa.Table:
    """Every sequence of one split as one table."""
    manifest = read_manifest(data)
    tables = []
    for rel in manifest["files"][split]:
        fs, path = storage.resolve(storage.join(data, rel))
        tables.append(pq.read_table(path, filesystem=fs))
    return pa.concat_tables(tables)


class InMemoryExamples:
    """All examples of a split, built once; ``batches`` yields shuffled torch batches."""

    def __init__(self, examples: dict[str, np.ndarray]) -> None:
        self.examples = examples
        self.size = len(next(iter(examples.values())))

    @classmethod
    def training(cls, data: str, split: str, max_len: int, time_buckets: int, max_browse: int) -> InMemoryExamples:
        return cls(training_examples(read_split(data, split), max_len, time_buckets, max_browse))

    @classmethod
    def evaluation(cls, data: str, split: str, max_len: int, time_buckets: int) -> InMemoryExamples:
        return cls(evaluation_examples(read_split(data, split), max_len, time_buckets))

    def batches(self, batch_size: int, seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in order, or shuffled by ``seed`` with rows of similar length batched together
        (within windows of 64 batches), which saves the work on padding."""
        if seed is None:
            for start in range(0, self.size, batch_size):
                yield collate({k: v[start : start + batch_size] for k, v in self.examples.items()})
            return
        rng = np.random.default_rng(seed)
        order = rng.permutation(self.size)
        lengths = (self.examples["items"] != 0).sum(1)
        window = 64 * batch_size
        groups: list[np.ndarray] = []
        for start in range(0, self.size, window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            groups.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
        for g in rng.permutation(len(groups)):
            idx = np.sort(groups[g])
            yield collate({k: v[idx] for k, v in self.examples.items()})
