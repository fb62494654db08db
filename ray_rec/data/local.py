"""A single-process reader of prepared datasets (no Ray), for the plain-PyTorch baseline, small
evaluations and tests. It loads one split into memory; the Ray Data pipeline streams instead."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch

from ray_rec import storage
from ray_rec.data.examples import BUCKET_WINDOW, collate, evaluation_examples, length_buckets, training_examples
from ray_rec.data.manifest import read_manifest
from ray_rec.data.schema import SEQUENCE_SCHEMA, read_checked


def read_split(data: str, split: str) -> pa.Table:
    """Every sequence of one split as one table."""
    manifest = read_manifest(data)
    tables = []
    for rel in manifest.files[split]:
        fs, path = storage.resolve(storage.join(data, rel))
        tables.append(read_checked(path, storage.join(data, rel), SEQUENCE_SCHEMA, filesystem=fs))
    return pa.concat_tables(tables)


class InMemoryExamples:
    """All examples of a split, built once; ``batches`` yields shuffled torch batches."""

    def __init__(self, examples: dict[str, np.ndarray]) -> None:
        self.examples = examples
        self.size = len(next(iter(examples.values())))

    @classmethod
    def training(
        cls, data: str, split: str, max_len: int, time_buckets: int, max_browse: int, prefixes: bool = False
    ) -> InMemoryExamples:
        """Training examples of a split (`training_examples`; ``prefixes``: one per next click)."""
        return cls(training_examples(read_split(data, split), max_len, time_buckets, max_browse, prefixes))

    @classmethod
    def evaluation(cls, data: str, split: str, max_len: int, time_buckets: int) -> InMemoryExamples:
        return cls(evaluation_examples(read_split(data, split), max_len, time_buckets))

    def batches(self, batch_size: int, seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in order, or shuffled by ``seed`` with rows of similar length batched together
        (within windows of `BUCKET_WINDOW` batches), which saves the work on padding."""
        if seed is None:
            for start in range(0, self.size, batch_size):
                yield collate({k: v[start : start + batch_size] for k, v in self.examples.items()})
            return
        rng = np.random.default_rng(seed)
        order = rng.permutation(self.size)
        window = BUCKET_WINDOW * batch_size
        for start in range(0, self.size, window):
            chunk = np.sort(order[start : start + window])
            for batch in length_buckets({k: v[chunk] for k, v in self.examples.items()}, batch_size, rng):
                yield collate(batch)
