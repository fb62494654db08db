"""The Ray Data pipeline: sharded sequence parquet (S3 or local) -> per-user sequences on each worker.

Ray Data reads the shards (plain read tasks, file order reshuffled every epoch) and streams the
sequences to the training workers; each worker builds its examples from them (`example_chunks`;
the feed is `ray_rec.train.feed`), shuffles them through a seeded buffer, regroups them by history length
and collates them. Sequences, not examples, cross the object store: a prefix example repeats up to
L clicks of its user's history. Nothing here materialises the data set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray.data import FileShuffleConfig

from ray_rec import storage
from ray_rec.config import ModelConfig
from ray_rec.data.examples import training_examples
from ray_rec.data.manifest import read_manifest
from ray_rec.data.schema import SEQUENCE_SCHEMA, check_files

if TYPE_CHECKING:
    from ray_rec.data.manifest import Manifest

# Ray Data's output blocks: small, so reading streams in steps of this size instead of holding up to
# Ray Data's default 128 MB block (and its copies) per task.
BLOCK_BYTES = 16 * 2**20


def sequences_per_batch(manifest: Manifest, model: ModelConfig, examples: int) -> int:
    """Sequences to read at a time for about ``examples`` training examples: a batch of long
    histories gives up to one prefix per click, so a fixed count of sequences would not bound memory."""
    targets = max(manifest.counts.clicks / max(manifest.counts.users, 1) - 1, 1.0)
    per_sequence = targets if model.on_prefixes else math.ceil(targets / model.history_len)
    return max(1, round(examples / per_sequence))


def example_chunks(sequences: Any, manifest: Manifest, model: ModelConfig, max_browse: int,
                   examples: int) -> Iterator[dict[str, np.ndarray]]:
    """The training examples of a stream of sequences (a Ray Data dataset or a worker's shard:
    anything with ``iter_batches``), about ``examples`` a chunk, as ``model`` (resolved by `for_data`)
    trains on them, with ``max_browse`` browsed negatives a step."""
    for table in sequences.iter_batches(batch_size=sequences_per_batch(manifest, model, examples), batch_format="pyarrow"):
        yield training_examples(table, model.history_len, model.time_buckets, max_browse, model.on_prefixes)


def split_paths(data: str, split: str, manifest: Manifest | None = None) -> tuple[list[str], Any]:
    """Shard paths of a split as Ray Data wants them, and the filesystem to read them with.

    Raises:
        UnsafeSchemaError: a shard's schema is not `SEQUENCE_SCHEMA` (checked on its footer)."""
    manifest = manifest or read_manifest(data)
    fs, _ = storage.resolve(data)
    uris = [storage.join(data, rel) for rel in manifest.files[split]]
    if not uris:
        raise ValueError(f"{data}: split {split!r} has no shards")
    paths = [storage.resolve(uri)[1] for uri in uris]
    check_files(paths, fs, SEQUENCE_SCHEMA, uris)  # a clear error here, before Ray Data's tasks read them
    return paths, fs


def read_sequences(
    data: str, split: str, manifest: Manifest | None = None, shuffle_seed: int | None = None
) -> ray.data.Dataset:
    """The raw per-user sequences of one split; with ``shuffle_seed``, files are read in an order
    drawn from the seed anew for every execution (every epoch), reproducibly."""
    paths, fs = split_paths(data, split, manifest)
    shuffle = FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True) if shuffle_seed is not None else None
    with parquet_v1():
        return ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle)


@contextlib.contextmanager
def parquet_v1() -> Iterator[None]:
    """``read_parquet`` inside it builds Ray Data's V1 Parquet datasource (the context is restored
    after). Why: the default V2 one starts 32 footer-reading actors spread over the cluster at every
    execution, i.e. every epoch (4 s of an epoch of Beauty on 2 cores), and one placed on a node the
    autoscaler is removing fails the whole read, as its actors are not restarted."""
    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = before


def validation_sample(manifest: Manifest, max_users: int) -> Manifest:
    """The manifest with its valid split cut to its first shards, holding about ``max_users``
    users (0 = all). `ray-rec prepare` spreads users over shards by a hash of their id, so the
    first shards are a fixed random sample: every evaluation compares epochs on the same users."""
    files, users = manifest.files["valid"], manifest.counts.users
    if max_users <= 0 or users <= max_users:
        return manifest
    keep = max(1, math.ceil(len(files) * max_users / users))
    return dataclasses.replace(manifest, files={**manifest.files, "valid": files[:keep]})


def limit_memory(object_store_mb: int) -> None:
    """Cap the object-store memory Ray Data may fill with blocks ahead of the consumer.

    Without a cap Ray Data buffers up to a share of the whole object store, so the pipeline's
    footprint grows with the data set until it reaches that share; with one it stays the same for
    any data set larger than the cap (see ``bench/data_scale.py``). Applies to datasets created
    afterwards in this process.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(object_store_memory=object_store_mb * 2**20)
    ctx.target_max_block_size = BLOCK_BYTES


def training_sequences(data: str, seed: int, manifest: Manifest | None = None, split: str = "train") -> ray.data.Dataset:
    """The sequences training reads (``test`` for the final fit: every click), file order shuffled
    per epoch from ``seed``; `example_chunks` turns them into examples on the worker.

    Not ``randomize_block_order``: that is an all-to-all step, which waits for every block of the
    read (the whole split, in the object store) before the first sequence comes out."""
    return read_sequences(data, split, manifest, shuffle_seed=seed)
