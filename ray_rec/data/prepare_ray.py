"""`ray-rec prepare --engine ray`: the same two passes as `ray_rec.data.prepare`, as Ray tasks.

Pass 1 runs one task per input file: read, drop bad rows, count clicks, cut the rows into
per-bucket pieces by a hash of the user (`prepare.ingest`); the pieces stay in Ray's object store
(spilled to disk when it fills). Pass 2 runs one task per bucket on all of that bucket's pieces:
dedupe, sort, the minimum-clicks rule and the split (`prepare.split_bucket_files`, the local
engine's own function), and writes the bucket's shard of each split into the staging prefix. The
driver holds only per-item data (click counts, the vocabulary) and counts, never events. Rows are
numbered by (file, row) in read order, so both engines keep the same first of two duplicates and
produce the same data set. The commit is the local engine's: staging prefix, manifest last.

A lost node's tasks run again (Ray retries them, and rebuilds lost pieces from their read task).
Every node reads the input and writes the output, so on a cluster of more than one node both must
be on shared storage (s3://).
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import ray

from ray_rec import storage
from ray_rec.config import PrepareOptions
from ray_rec.data.formats import check_event_columns, estimate_events, input_files, read_input, read_item_features
from ray_rec.data.manifest import Manifest
from ray_rec.data.prepare import (
    SPLITS,
    Counts,
    build_vocab,
    commit_dataset,
    dataset_manifest,
    event_mapping,
    ingest,
    spill_buckets,
    split_bucket_files,
)
from ray_rec.data.standard import InputError

FILE_ROWS_SHIFT = 40  # row numbers are file index << 40 + row: 1e12 rows a file


def _read_file(path: str, index: int, opts: PrepareOptions, n_buckets: int) -> tuple[Any, ...]:
    """Pass 1 for one input file: (counts, clicks per item, item ids, then one piece per bucket,
    None where the file has no row of it)."""
    counts, clicks, items = Counts(), Counter(), set()  # type: ignore[var-annotated]
    pieces: list[list[pa.Table]] = [[] for _ in range(n_buckets)]
    seq = index << FILE_ROWS_SHIFT
    for raw in read_input(path, opts.format, event_mapping(opts)):
        seq, cut = ingest(raw, counts, clicks, items, seq, n_buckets)
        for b, piece in cut:
            pieces[b].append(piece)
    return (counts, clicks, items, *[pa.concat_tables(p) if p else None for p in pieces])


def _split_task(b: int, opts: PrepareOptions, vocab_ids: pa.Array, staging: str, *pieces: pa.Table | None) -> tuple[Counts, list[str], bool]:
    """Pass 2 for bucket ``b``: its shards written under ``staging``; (counts, files, has browses)."""
    counts = Counts()
    tables = [p for p in pieces if p is not None]
    if not tables:
        return counts, [], False
    written, has_browse = split_bucket_files(pa.concat_tables(tables), b, vocab_ids, opts, counts, staging)
    return counts, written, has_browse


def _unwrapped(exc: ray.exceptions.RayTaskError) -> Exception:
    """The user's error inside a failed task (an unreadable file, say), else the task error."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, (InputError, ValueError)) else exc


def _check_shared(opts: PrepareOptions) -> None:
    """On a cluster (one joined through ``RAY_ADDRESS``, or more than one live node), input and
    output must be on storage every node reads (s3://): the tasks run wherever Ray places them."""
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if os.environ.get("RAY_ADDRESS") or nodes > 1:
        local = [name for name, uri in (("--input", opts.input), ("--output", opts.output)) if not storage.is_s3(uri)]
        if local:
            raise InputError(f"{' and '.join(local)} must be s3:// with --engine ray on a cluster: every node "
                             "reads the input and writes the output")


def prepare_on_ray(opts: PrepareOptions, progress: Callable[[str], None]) -> Manifest:
    """`prepare.prepare` on the connected Ray cluster (`ray_rec.ray_session.init_ray` first)."""
    mapping = event_mapping(opts)
    if opts.format == "events":
        check_event_columns(opts.input, mapping)
    _check_shared(opts)
    storage.claim_output(opts.output, "prepare", opts.overwrite, reads=(opts.input, opts.items or ""))
    staging = storage.join(opts.output, f"_staging-{uuid.uuid4().hex[:8]}")
    paths = input_files(opts.input, opts.format)
    n_buckets = spill_buckets(opts.expected_events or estimate_events(opts.input, opts.format), opts.num_shards)
    started = time.monotonic()
    read = ray.remote(_read_file).options(num_returns=n_buckets + 3)
    try:
        # num_returns > 1: each call gives a list of refs (counts, clicks, items, a piece per bucket)
        outputs: list[Any] = [read.remote(path, i, opts, n_buckets) for i, path in enumerate(paths)]
        counts, clicks, items = Counts(), Counter(), set()  # type: ignore[var-annotated]
        for done, output in enumerate(outputs, 1):
            part_counts, part_clicks, part_items = ray.get(list(output[:3]))
            counts.add(part_counts)
            clicks.update(part_clicks)
            items.update(part_items)
            progress(f"read {done}/{len(paths)} files, {counts.rows:,} rows ({counts.rows / max(time.monotonic() - started, 1e-6):,.0f}/s)")
        if not items:
            raise InputError(f"{opts.input}: no usable events (read {counts.rows:,} rows; dropped {dict(counts.dropped)})")
        vocab = build_vocab(clicks, items, read_item_features(opts.items) if opts.items else None)
        vocab_ref = ray.put(pa.array(vocab.ids, pa.string()))
        split = ray.remote(_split_task)
        pending = [split.remote(b, opts, vocab_ref, staging, *[o[3 + b] for o in outputs]) for b in range(n_buckets)]
        files: dict[str, list[str]] = {s: [] for s in SPLITS}
        has_browse = False
        for done, (part, written, browses) in enumerate((ray.get(p) for p in pending), 1):
            counts.add(part)
            has_browse = has_browse or browses
            for name in written:
                files[name.split("/", 1)[0]].append(name)
            progress(f"split bucket {done}/{n_buckets}")
    except ray.exceptions.RayTaskError as exc:
        storage.delete_dir(staging)
        raise _unwrapped(exc) from None
    except BaseException:
        storage.delete_dir(staging)
        raise
    if counts.users == 0:
        storage.delete_dir(staging)
        raise InputError(f"{opts.input}: no user has {opts.min_clicks} or more clicks (read {counts.rows:,} rows); "
                         f"lower --min-clicks or check the event column")
    vocab.save(staging)
    manifest = dataset_manifest(opts, vocab, counts, {s: sorted(f) for s, f in files.items()}, opts.format != "seqtxt", has_browse)
    commit_dataset(opts.output, staging, manifest)
    return manifest
