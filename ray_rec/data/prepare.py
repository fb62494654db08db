"""`ray-rec prepare`: raw logs -> one dataset folder of sharded per-user sequences.

Two streaming passes, so a log larger than memory imports:
1. read the input batch by batch, drop bad rows (counted), count item clicks, and spill each event
   to a local bucket file chosen by a stable hash of its user;
2. per bucket (all events of its users): drop exact duplicates, sort by time, drop users with too
   few clicks, split, and write the users' sequences as that bucket's file of each split.
Buckets hold about `BUCKET_TARGET_ROWS` events and there are at least ``num_shards`` of them, so
memory stays the same however large the log is (measured in ``bench/data_scale.py``).
Shards go to a staging prefix; the old dataset's manifest is removed before anything of it is
replaced and the new manifest is written last, so only a finished import looks complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_rec import storage
from ray_rec.config import PrepareOptions
from ray_rec.data.formats import check_event_columns, estimate_events, read_input, read_item_features
from ray_rec.data.manifest import SCHEMA_VERSION, SPLITS, DataCounts, Manifest, SplitFacts
from ray_rec.data.schema import SEQUENCE_SCHEMA
from ray_rec.data.standard import DEFAULT_BROWSES, DEFAULT_CLICKS, EventMapping, InputError
from ray_rec.vocab import Vocabulary

logger = logging.getLogger(__name__)

BUCKET_TARGET_ROWS = 1_000_000  # events per spill bucket, bounding pass-2 memory
ROW_GROUP_USERS = 8192
SPILL_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")
MAX_BUCKETS = 512  # open spill files in pass 1; past 512M events the buckets grow instead
RAY_ENGINE_EVENTS = 50_000_000  # engine auto: larger logs go to the Ray cluster (one process does ~0.8M events/s)
MAX_EVENT_VALUES = 100  # dropped event values the manifest counts one by one (the most frequent)
DROP_REASONS = ("null_ids", "bad_timestamps", "bad_events", "duplicates", "short_users", "short_user_events")


@dataclass
class Counts:
    """Rows seen and dropped, by reason."""

    rows: int = 0
    users: int = 0
    events: int = 0
    clicks: int = 0
    dropped: Counter = field(default_factory=Counter)
    event_values: Counter = field(default_factory=Counter)  # dropped rows by their event value

    def add(self, other: Counts) -> None:
        """Add the counts of another part of the same import (the Ray engine's tasks)."""
        self.rows += other.rows
        self.users += other.users
        self.events += other.events
        self.clicks += other.clicks
        self.dropped.update(other.dropped)
        self.event_values.update(other.event_values)


def _user_buckets(users: pa.Array, n: int) -> np.ndarray:
    """A stable bucket per row from a CRC32 of its user id (the same on every run and machine)."""
    encoded = pc.dictionary_encode(users)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    per_user = np.fromiter(
        (zlib.crc32(u.encode()) % n for u in encoded.dictionary.to_pylist()), dtype=np.int64, count=len(encoded.dictionary)
    )
    return per_user[encoded.indices.to_numpy(zero_copy_only=False)]


def spill_buckets(events: int, num_shards: int) -> int:
    """Spill buckets for a log of ``events``: about `BUCKET_TARGET_ROWS` events each, so the
    per-bucket pass holds the same amount whatever the log's size, and a multiple of the shard
    count, so every shard gets the same number of buckets."""
    per_shard = min(max(1, math.ceil(events / (BUCKET_TARGET_ROWS * num_shards))), max(1, MAX_BUCKETS // num_shards))
    return num_shards * per_shard


def _clean(table: pa.Table, counts: Counts) -> pa.Table:
    counts.rows += table.num_rows
    null_ids = pc.or_(
        pc.or_(pc.is_null(table["user_id"]), pc.equal(pc.utf8_length(pc.fill_null(table["user_id"], "")), 0)),
        pc.or_(pc.is_null(table["item_id"]), pc.equal(pc.utf8_length(pc.fill_null(table["item_id"], "")), 0)),
    )
    bad_time = pc.and_(pc.invert(null_ids), pc.is_null(table["timestamp"]))
    bad_event = pc.and_(pc.invert(pc.or_(null_ids, bad_time)), pc.equal(table["event"], -1))
    counts.dropped["null_ids"] += pc.sum(null_ids).as_py() or 0
    counts.dropped["bad_timestamps"] += pc.sum(bad_time).as_py() or 0
    counts.dropped["bad_events"] += pc.sum(bad_event).as_py() or 0
    if pc.any(bad_event).as_py():
        for entry in pc.value_counts(table["event_value"].filter(bad_event)).to_pylist():
            counts.event_values[entry["values"]] += entry["counts"]
    keep = pc.invert(pc.or_(pc.or_(null_ids, bad_time), bad_event))
    return table.filter(keep).drop_columns(["event_value"])


def _spill(opts: PrepareOptions, scratch: str, progress: Callable[[str], None]) -> tuple[int, Counts, Counter, set[str]]:
    """Pass 1. Returns (number of buckets, counts, clicks per item, all item ids)."""
    counts = Counts()
    clicks: Counter = Counter()
    items: set[str] = set()
    n_buckets = spill_buckets(opts.expected_events or estimate_events(opts.input, opts.format), opts.num_shards)
    # Arrow IPC streams, not Parquet: a Parquet writer holds ~6 MB of dictionary and page buffers
    # until it closes, which times hundreds of open buckets grew with the log; these hold none.
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    seq = 0
    started = time.monotonic()
    try:
        for raw in read_input(opts.input, opts.format, event_mapping(opts)):
            seq, pieces = ingest(raw, counts, clicks, items, seq, n_buckets)
            for b, piece in pieces:
                if b not in writers:
                    writers[b] = pa.ipc.new_stream(os.path.join(scratch, f"bucket-{b:05d}.arrow"), piece.schema, options=SPILL_OPTIONS)
                writers[b].write_table(piece)
            progress(f"read {counts.rows:,} rows ({counts.rows / max(time.monotonic() - started, 1e-6):,.0f}/s)")
    finally:
        for w in writers.values():
            w.close()
    return n_buckets, counts, clicks, items


def ingest(raw: pa.Table, counts: Counts, clicks: Counter, items: set[str], seq: int,
           n_buckets: int) -> tuple[int, list[tuple[int, pa.Table]]]:
    """Pass 1 for one standard table (both engines): drop bad rows (counted), number the rest from
    ``seq`` in read order (duplicates keep the first), count item clicks and ids, and cut the rows
    into per-bucket pieces by user. Returns the next ``seq`` and the (bucket, piece) pairs."""
    table = _clean(raw, counts)
    if not table.num_rows:
        return seq, []
    table = table.append_column("seq", pa.array(np.arange(seq, seq + table.num_rows, dtype=np.int64)))
    is_click = pc.equal(table["event"], 1)
    for entry in pc.value_counts(table["item_id"].filter(is_click)).to_pylist():
        clicks[entry["values"]] += entry["counts"]
    items.update(pc.unique(table["item_id"]).to_pylist())
    buckets = _user_buckets(table["user_id"], n_buckets)
    order = np.argsort(buckets, kind="stable")
    sorted_buckets = buckets[order]
    table = table.take(pa.array(order))
    bounds = np.flatnonzero(np.diff(sorted_buckets)) + 1
    pieces = [(int(sorted_buckets[start]), table.slice(start, end - start))
              for start, end in zip(np.r_[0, bounds], np.r_[bounds, len(order)])]
    return seq + table.num_rows, pieces


def build_vocab(clicks: Counter, items: set[str], side: pa.Table | None) -> Vocabulary:
    """Every item, most clicked first (ties by id), with its side features from ``side``."""
    ids = sorted(items, key=lambda i: (-clicks.get(i, 0), len(i), i))
    id_type = "int" if all(i.lstrip("-").isdigit() for i in ids) else "str"
    if id_type == "int":
        ids = sorted(items, key=lambda i: (-clicks.get(i, 0), int(i)))
    counts = np.array([clicks.get(i, 0) for i in ids], dtype=np.int64)
    side_values: dict[str, list[str]] = {}
    side_table = None
    if side is not None:
        names = sorted(c for c in side.column_names if c != "item_id")
        row_of = {iid: r for r, iid in enumerate(side.column("item_id").to_pylist())}
        rows = np.array([row_of.get(i, -1) for i in ids], dtype=np.int64)
        side_table = np.zeros((len(ids), len(names)), dtype=np.int64)
        for j, name in enumerate(names):
            column = side.column(name).to_pylist()
            values = sorted({v for v in column if v not in (None, "")})
            code = {v: k + 1 for k, v in enumerate(values)}
            side_values[name] = values
            side_table[:, j] = [code.get(column[r], 0) if r >= 0 else 0 for r in rows]
    return Vocabulary(ids=ids, counts=counts, id_type=id_type, side_values=side_values, side_table=side_table)


def _prefix_rows(user_start: np.ndarray, end: np.ndarray, keep: np.ndarray, table: pa.Table, users: np.ndarray) -> pa.Table:
    """Per-user prefixes [start, end) of the sorted events as a sequence table."""
    start, end, users = user_start[keep], end[keep], users[keep]
    lengths = end - start
    flat = np.repeat(start - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
    offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
    take = pa.array(flat)

    def lists(name: str, typ: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pc.cast(table[name].take(take), typ).combine_chunks())

    return pa.Table.from_arrays(
        [pa.array(users, pa.string()), lists("item", pa.int32()), lists("event", pa.int8()), lists("timestamp", pa.int64())],
        schema=SEQUENCE_SCHEMA,
    )


def _split_bucket(table: pa.Table, vocab_ids: pa.Array, opts: PrepareOptions, counts: Counts) -> dict[str, pa.Table]:
    """Pass 2 for one bucket: dedupe, sort, filter users, split."""
    table = table.append_column("item", pc.add(pc.index_in(table["item_id"], value_set=vocab_ids), 1))
    before = table.num_rows
    table = table.group_by(["user_id", "item_id", "timestamp", "event"], use_threads=False).aggregate(
        [("seq", "min"), ("item", "min")]
    ).rename_columns(["user_id", "item_id", "timestamp", "event", "seq", "item"])
    counts.dropped["duplicates"] += before - table.num_rows
    table = table.sort_by([("user_id", "ascending"), ("timestamp", "ascending"), ("seq", "ascending")])
    user_codes = pc.dictionary_encode(table["user_id"]).combine_chunks()
    codes = user_codes.indices.to_numpy()
    bounds = np.flatnonzero(np.diff(codes)) + 1
    user_start, user_end = np.r_[0, bounds], np.r_[bounds, len(codes)]
    users = np.array(table["user_id"].take(pa.array(user_start)).to_pylist(), dtype=object)
    is_click = table["event"].to_numpy() == 1
    click_rank = np.cumsum(is_click)  # clicks up to and including each event
    base = np.r_[0, click_rank][user_start]
    n_clicks = click_rank[user_end - 1] - base
    stamps = table["timestamp"].to_numpy()

    def position_of_click(k: np.ndarray) -> np.ndarray:
        """Event index of each user's k-th click (1-based); -1 where absent."""
        want = base + k
        pos = np.searchsorted(click_rank, want, side="left")
        ok = (k >= 1) & (k <= n_clicks)
        return np.where(ok, pos, -1)

    if opts.split == "leave_one_out":
        keep = n_clicks >= opts.min_clicks
        last, second = position_of_click(n_clicks), position_of_click(n_clicks - 1)
        ends = {"train": second, "valid": second + 1, "test": last + 1}
        masks = {s: keep for s in SPLITS}
    else:
        assert opts.cutoff is not None
        clicks_before = np.add.reduceat((is_click & (stamps < opts.cutoff)).astype(np.int64), user_start)
        keep = n_clicks >= opts.min_clicks
        first_after = position_of_click(clicks_before + 1)
        last_before = position_of_click(clicks_before)
        ends = {"train": last_before, "valid": last_before + 1, "test": first_after + 1}
        masks = {
            "train": keep & (clicks_before >= 2),
            "valid": keep & (clicks_before >= 2),
            "test": keep & (first_after >= 0) & (clicks_before >= 1),
        }
    dropped_users = ~keep
    counts.dropped["short_users"] += int(dropped_users.sum())
    counts.dropped["short_user_events"] += int((user_end - user_start)[dropped_users].sum())
    counts.users += int(keep.sum())
    counts.events += int((user_end - user_start)[keep].sum())
    counts.clicks += int(n_clicks[keep].sum())
    return {s: _prefix_rows(user_start, ends[s], masks[s] & (ends[s] > user_start), table, users) for s in SPLITS}


def chosen_engine(opts: PrepareOptions) -> str:
    """``opts.engine``, with ``auto`` resolved: ray on a cluster (``RAY_ADDRESS`` set, as in a Ray
    job) for a log of more than `RAY_ENGINE_EVENTS` events, else local."""
    if opts.engine != "auto":
        return opts.engine
    if not os.environ.get("RAY_ADDRESS"):
        return "local"
    return "ray" if (opts.expected_events or estimate_events(opts.input, opts.format)) > RAY_ENGINE_EVENTS else "local"


def event_mapping(opts: PrepareOptions) -> EventMapping:
    """The events format's mapping from ``opts`` (defaults where a part is not given)."""
    return EventMapping(columns=dict(opts.columns or {}),
                        clicks=DEFAULT_CLICKS if opts.click_events is None else tuple(opts.click_events),
                        browses=DEFAULT_BROWSES if opts.browse_events is None else tuple(opts.browse_events))


def split_bucket_files(bucket: pa.Table, b: int, vocab_ids: pa.Array, opts: PrepareOptions, counts: Counts,
                       folder: str) -> tuple[list[str], bool]:
    """Pass 2 for bucket ``b`` (both engines): the per-user rules of `_split_bucket`, then one file
    per split, ``{split}/part-{b:05d}.parquet`` under ``folder`` (local or s3://), written whole: no
    writer stays open across buckets and no file holds more than a bucket's events, so neither this
    nor a Ray Data read task grows with the log. Returns the files written (relative to ``folder``)
    and whether the bucket holds browses."""
    has_browse = bool(pc.any(pc.equal(bucket["event"], 0)).as_py())
    written = []
    for split, rows in _split_bucket(bucket, vocab_ids, opts, counts).items():
        if rows.num_rows:
            name = f"{split}/part-{b:05d}.parquet"
            buf = pa.BufferOutputStream()
            pq.write_table(rows, buf, row_group_size=ROW_GROUP_USERS, use_dictionary=False)
            storage.write_bytes(storage.join(folder, name), buf.getvalue().to_pybytes())
            written.append(name)
    return written, has_browse


def dataset_manifest(opts: PrepareOptions, vocab: Vocabulary, counts: Counts, files: dict[str, list[str]], has_time: bool, has_browse: bool) -> Manifest:
    """The manifest of a finished import (written last by `commit_dataset`)."""
    return Manifest(
        schema_version=SCHEMA_VERSION,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        source={"input": opts.input, "format": opts.format, "items": opts.items,
                **({"columns": opts.columns} if opts.columns else {}),
                **({"click_events": opts.click_events} if opts.click_events is not None else {}),
                **({"browse_events": opts.browse_events} if opts.browse_events is not None else {})},
        counts=DataCounts(users=counts.users, items=len(vocab), events=counts.events, clicks=counts.clicks, rows_read=counts.rows),
        dropped={k: counts.dropped.get(k, 0) for k in DROP_REASONS},
        dropped_event_values=dict(counts.event_values.most_common(MAX_EVENT_VALUES)),
        split=SplitFacts(protocol=opts.split, cutoff=opts.cutoff, min_clicks=opts.min_clicks),
        num_shards=max(len(f) for f in files.values()),
        has_time=has_time,
        has_browse=has_browse,
        id_type=vocab.id_type,
        side_features=vocab.side_sizes,
        files=files,
    )


def prepare(opts: PrepareOptions, progress: Callable[[str], None] | None = None) -> Manifest:
    """Import a log into a dataset folder and return its manifest.

    Raises:
        InputError: the input or items file is missing, unreadable or lacks a column.
        OutputError: the output holds files `prepare` did not write (see `storage.claim_output`).
    """
    say = progress or (lambda msg: logger.info(msg))
    if chosen_engine(opts) == "ray":
        from ray_rec.data.prepare_ray import prepare_on_ray
        from ray_rec.ray_session import init_ray

        init_ray(1)
        say("engine: ray (tasks on the Ray cluster)")
        return prepare_on_ray(opts, say)
    mapping = event_mapping(opts)
    if opts.format == "events":
        check_event_columns(opts.input, mapping)  # a wrong mapping fails before any work
    storage.claim_output(opts.output, "prepare", opts.overwrite, reads=(opts.input, opts.items or ""))
    run_id = uuid.uuid4().hex[:8]
    staging = storage.join(opts.output, f"_staging-{run_id}")
    with tempfile.TemporaryDirectory(prefix="ray-rec-prepare-") as scratch:
        n_buckets, counts, clicks, items = _spill(opts, scratch, say)
        if not items:
            raise InputError(f"{opts.input}: no usable events (read {counts.rows:,} rows; dropped {dict(counts.dropped)})")
        side = read_item_features(opts.items) if opts.items else None
        vocab = build_vocab(clicks, items, side)
        vocab_ids = pa.array(vocab.ids, pa.string())
        has_browse = False
        local_out = os.path.join(scratch, "out")
        files: dict[str, list[str]] = {s: [] for s in SPLITS}
        for b in range(n_buckets):
            path = os.path.join(scratch, f"bucket-{b:05d}.arrow")
            if not os.path.exists(path):
                continue
            with pa.ipc.open_stream(path) as reader:
                bucket = reader.read_all()
            written, browses = split_bucket_files(bucket, b, vocab_ids, opts, counts, local_out)
            has_browse = has_browse or browses
            for name in written:
                files[name.split("/", 1)[0]].append(name)
            del bucket
            os.remove(path)
            say(f"split bucket {b + 1}/{n_buckets}")
        if counts.users == 0:
            raise InputError(
                f"{opts.input}: no user has {opts.min_clicks} or more clicks (read {counts.rows:,} rows); "
                f"lower --min-clicks or check the event column"
            )
        vocab.save(local_out)
        has_time = opts.format != "seqtxt"
        manifest = dataset_manifest(opts, vocab, counts, {s: sorted(f) for s, f in files.items()}, has_time, has_browse)
        say("uploading shards")
        storage.copy_dir(local_out, staging)
    commit_dataset(opts.output, staging, manifest)
    return manifest


def commit_dataset(output: str, staging: str, manifest: Manifest) -> None:
    """Replace the dataset at ``output`` with ``staging``; the manifest goes last."""
    manifest_uri = storage.join(output, "manifest.json")
    for name in ("manifest.json", *SPLITS, "items.parquet", "side_features.json"):  # manifest first
        _delete(storage.join(output, name))
    for name in (*SPLITS, "items.parquet", "side_features.json"):
        src = storage.join(staging, name)
        if not storage.exists(src):
            continue
        if storage.is_dir(src):
            storage.move_dir(src, storage.join(output, name))
        else:
            storage.write_bytes(storage.join(output, name), storage.read_bytes(src))
    storage.delete_dir(staging)
    for stale in {rel.split("/", 1)[0] for rel in storage.list_files(output) if rel.startswith("_staging-")}:
        storage.delete_dir(storage.join(output, stale))  # left by an import that failed
    storage.write_bytes(manifest_uri, json.dumps(manifest.to_dict(), indent=2).encode())


def _delete(uri: str) -> None:
    """Delete a file or folder if it exists."""
    if storage.is_dir(uri):
        storage.delete_dir(uri)
    elif storage.exists(uri):
        fs, path = storage.resolve(uri)
        fs.delete_file(path)


