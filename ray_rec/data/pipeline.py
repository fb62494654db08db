"""The Ray Data pipeline: sharded sequence parquet (S3 or local) -> training tensors.

Reading and example building run as Ray Data tasks (``map_batches`` over pyarrow batches);
each training worker streams its split in chunks (``iter_batches`` with a seeded local shuffle),
regroups each chunk by history length and collates it with the plain `collate` function (see
``ray_rec.train.trainer._training_batches``). Nothing here materialises the data set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray

from ray_rec import storage
from ray_rec.config import ModelConfig
from ray_rec.data.examples import training_examples
from ray_rec.data.prepare import read_manifest

# Sequences per map_batches call: large enough to amortise task overhead, small enough to stream.
SEQUENCES_PER_TASK = 4096


class ToTrainingExamples:
    """``map_batches`` callable: a pyarrow batch of sequences -> sliding-target examples."""

    def __init__(self, max_len: int, time_buckets: int, max_browse: int) -> None:
        self.max_len, self.time_buckets, self.max_browse = max_len, time_buckets, max_browse

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        return training_examples(batch, self.max_len, self.time_buckets, self.max_browse)


def split_paths(data: str, split: str, manifest: dict[str, Any] | None = None) -> tuple[list[str], Any]:
    """Shard paths of a split as Ray Data wants them, and the filesystem to read them with."""
    manifest = manifest or read_manifest(data)
    fs, _ = storage.resolve(data)
    paths = [storage.resolve(storage.join(data, rel))[1] for rel in manifest["files"][split]]
    if not paths:
        raise ValueError(f"{data}: split {split!r} has no shards")
    return paths, fs


def read_sequences(data: str, split: str, manifest: dict[str, Any] | None = None) -> ray.data.Dataset:
    """The raw per-user sequences of one split."""
    paths, fs = split_paths(data, split, manifest)
    return ray.data.read_parquet(paths, filesystem=fs)


def training_dataset(
    data: str, model: ModelConfig, max_browse: int, seed: int, manifest: dict[str, Any] | None = None
) -> ray.data.Dataset:
    """Training examples of the train split, shard order randomised from ``seed``."""
    ds = read_sequences(data, "train", manifest).randomize_block_order(seed=seed)
    return ds.map_batches(
        ToTrainingExamples(model.max_len, model.time_buckets, max_browse),
        batch_format="pyarrow",
        batch_size=SEQUENCES_PER_TASK,
        zero_copy_batch=True,
    )
