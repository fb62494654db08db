"""Readers that turn a user's logs into a stream of standard event tables (`ray_rec.data.standard`).

Events files (Parquet, CSV, JSON Lines), MovieLens ratings and seqtxt sequences; each reader yields
one bounded batch at a time, so a log larger than memory streams through.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_rec import storage
from ray_rec.config import FORMATS
from ray_rec.data.schema import check_schema, read_checked
from ray_rec.data.standard import FIELDS, STANDARD, EventMapping, InputError, require_columns, standardise

EVENT_SUFFIXES = (".parquet", ".pq", ".csv", ".csv.gz", ".tsv", ".jsonl", ".jsonl.gz", ".ndjson", ".json")
JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json")
BATCH_ROWS = 1 << 18
TEXT_CHUNK_BYTES = 1 << 24
MAX_LINE_BYTES = 1 << 26  # a longer "line" is not a log (a compressed file of zeros, say): refused
MAX_HEADER_BYTES = 1 << 16  # a CSV header is read from this much of the file's start


def list_inputs(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """The data files at a path: the file itself, or the matching files in a folder (sorted)."""
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {uri} does not exist")
    if info.type == pafs.FileType.File:
        return [uri]
    files = [f for f in storage.list_files(uri) if f.lower().endswith(suffixes) and not posixpath.basename(f).startswith((".", "_"))]
    if not files:
        raise InputError(f"input folder {uri} holds no {'/'.join(suffixes)} files")
    return [storage.join(uri, f) for f in files]


# Bytes per event in text inputs, on the small side so the estimate errs toward more events
# (more, smaller spill buckets). Measured: events CSV 30-60 B/row, MovieLens 15-25, seqtxt 5-7 per item.
TEXT_BYTES_PER_EVENT = {"events": 24, "movielens": 12, "seqtxt": 4}
COMPRESSED_RATIO = 4  # a .gz text file holds about this many times its size


def estimate_events(uri: str, fmt: str) -> int:
    """About how many events an input holds, without reading it: Parquet footers give row counts
    exactly; text files are sized by `TEXT_BYTES_PER_EVENT`."""
    total = 0
    for path in list_inputs(uri, (".parquet", ".pq", ".csv", ".csv.gz", ".tsv", ".txt", ".dat", ".data", ".gz", "")):
        fs, fpath = storage.resolve(path)
        if path.lower().endswith((".parquet", ".pq")):
            try:
                total += pq.ParquetFile(fs.open_input_file(fpath)).metadata.num_rows
            except (pa.ArrowInvalid, OSError) as exc:
                raise InputError(f"{path}: cannot be read: {exc}") from None
        else:
            size = fs.get_file_info(fpath).size or 0
            total += size * (COMPRESSED_RATIO if path.lower().endswith(".gz") else 1) // TEXT_BYTES_PER_EVENT.get(fmt, 24)
    return total


def check_event_columns(uri: str, mapping: EventMapping) -> None:
    """Every events file at ``uri`` holds the columns ``mapping`` names, read from its schema, header
    or first line only, so a wrong mapping fails before any work.

    Raises:
        InputError: naming the file and the missing column."""
    for path in list_inputs(uri, EVENT_SUFFIXES):
        fs, fpath = storage.resolve(path)
        lower = path.lower()
        try:
            if lower.endswith((".parquet", ".pq")):
                names = pq.read_schema(fpath, filesystem=fs).names
            elif lower.endswith(JSON_SUFFIXES):
                first = next((line for chunk in _text_chunks(path) for line in chunk.splitlines() if line.strip()), b"{}")
                try:
                    row = json.loads(first)
                except ValueError as exc:
                    raise InputError(f"{path}: the first line is not a JSON object: {exc}") from None
                names = list(row) if isinstance(row, dict) else []
            else:
                with fs.open_input_stream(fpath, compression="detect") as stream:
                    head = stream.read(MAX_HEADER_BYTES).split(b"\n", 1)[0].decode("utf-8", "replace")
                names = next(csv.reader([head], delimiter="\t" if lower.endswith(".tsv") else ","), [])
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: cannot be read: {exc}") from None
        require_columns(names, mapping, path)


def read_events_format(uri: str, mapping: EventMapping | None = None) -> Iterator[pa.Table]:
    """Parquet, CSV or JSON Lines files with user_id, item_id, timestamp[, event] (or the columns
    ``mapping`` names)."""
    mapping = mapping or EventMapping()
    for path in list_inputs(uri, EVENT_SUFFIXES):
        fs, fpath = storage.resolve(path)
        try:
            if path.lower().endswith((".parquet", ".pq")):
                schema = pq.read_schema(fpath, filesystem=fs)
                require_columns(schema.names, mapping, path)
                check_schema(schema, path)
                cols = [mapping.source(c) for c in FIELDS if mapping.source(c) in schema.names]
                source = pads.dataset(fpath, format="parquet", filesystem=fs)
                for batch in source.to_batches(columns=cols, batch_size=BATCH_ROWS):
                    if batch.num_rows:
                        yield standardise(pa.Table.from_batches([batch]), path, mapping)
            elif path.lower().endswith(JSON_SUFFIXES):
                yield from _read_json_lines(path, mapping)
            else:
                yield from _read_csv(path, fs, fpath, mapping)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: cannot be read: {exc}") from None


def _read_csv(path: str, fs: pafs.FileSystem, fpath: str, mapping: EventMapping) -> Iterator[pa.Table]:
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    text_cols = {mapping.source(c): pa.string() for c in ("user_id", "item_id", "event")}
    with fs.open_input_stream(fpath, compression="detect") as stream:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=TEXT_CHUNK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(column_types=text_cols, strings_can_be_null=True),
        )
        require_columns(reader.schema.names, mapping, path)
        for batch in reader:
            if batch.num_rows:
                yield standardise(pa.Table.from_batches([batch]), path, mapping)


def _read_json_lines(path: str, mapping: EventMapping) -> Iterator[pa.Table]:
    """One JSON object a line. A line that is not an object, or a field that is not a plain value,
    reads as nulls (counted as dropped rows downstream); ids may be numbers or strings."""
    names = [mapping.source(f) for f in FIELDS]
    for chunk in _text_chunks(path):
        columns: list[list[Any]] = [[] for _ in names]
        for line in chunk.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                row = {}
            for column, name in zip(columns, names):
                value = row.get(name)
                column.append(None if value is None or isinstance(value, (dict, list)) else str(value))
        if columns[0]:
            table = pa.table({name: pa.array(values, pa.string()) for name, values in zip(names, columns)})
            yield standardise(table, path, mapping)


def _text_chunks(path: str) -> Iterator[bytes]:
    """A text file in chunks that end on line boundaries.

    Raises:
        InputError: a line runs past `MAX_LINE_BYTES` (memory stays bounded whatever the file holds).
    """
    fs, fpath = storage.resolve(path)
    rest = b""
    with fs.open_input_stream(fpath, compression="detect") as stream:
        while True:
            block = stream.read(TEXT_CHUNK_BYTES)
            if not block:
                break
            block = rest + block
            cut = block.rfind(b"\n")
            if cut < 0:
                if len(block) > MAX_LINE_BYTES:
                    raise InputError(f"{path}: a line runs past {MAX_LINE_BYTES:,} bytes without a newline: not a text log")
                rest = block
                continue
            rest = block[cut + 1 :]
            yield block[: cut + 1]
    if rest.strip():
        yield rest + b"\n"


MOVIELENS_FILES = ("ratings.csv", "ratings.dat", "u.data")


def _movielens_file(uri: str) -> str:
    fs, path = storage.resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        for name in MOVIELENS_FILES:
            if storage.exists(storage.join(uri, name)):
                return storage.join(uri, name)
        raise InputError(f"input folder {uri} holds none of {', '.join(MOVIELENS_FILES)}")
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise InputError(f"input {uri} does not exist")
    return uri


def read_movielens(uri: str) -> Iterator[pa.Table]:
    """MovieLens ratings (every rating is a click): ``u.data``, ``ratings.dat`` or ``ratings.csv``."""
    path = _movielens_file(uri)
    name = posixpath.basename(path).lower()
    names = ["user_id", "item_id", "rating", "timestamp"]
    for chunk in _text_chunks(path):
        if name.endswith(".csv"):
            first = chunk.split(b"\n", 1)[0].lower()
            skip = 1 if first.startswith(b"userid") else 0
            opts = pacsv.ParseOptions(delimiter=",")
        else:
            skip = 0
            if b"::" in chunk[:4096]:
                chunk = chunk.replace(b"::", b"\t")
            opts = pacsv.ParseOptions(delimiter="\t")
        try:
            table = pacsv.read_csv(
                io.BytesIO(chunk),
                read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip),
                parse_options=opts,
                convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}),
            )
        except pa.ArrowInvalid as exc:
            raise InputError(f"{path}: not a MovieLens ratings file (user, item, rating, timestamp): {exc}") from None
        if table.num_rows:
            yield standardise(table.drop_columns(["rating"]), path)


_SPACES = re.compile(rb"\s+")


def read_seqtxt(uri: str) -> Iterator[pa.Table]:
    """One user a line, ``user item item ...`` in time order; timestamps are the positions."""
    for path in list_inputs(uri, SEQTXT_SUFFIXES):
        for chunk in _text_chunks(path):
            users: list[str] = []
            items: list[str] = []
            stamps: list[int] = []
            for line in chunk.splitlines():
                parts = _SPACES.split(line.strip())
                if len(parts) < 2 or not parts[0]:
                    continue
                user = parts[0].decode("utf-8", "replace")
                users.extend([user] * (len(parts) - 1))
                items.extend(p.decode("utf-8", "replace") for p in parts[1:])
                stamps.extend(range(len(parts) - 1))
            if users:
                yield pa.table(
                    {
                        "user_id": pa.array(users, pa.string()),
                        "item_id": pa.array(items, pa.string()),
                        "timestamp": pa.array(stamps, pa.int64()),
                        "event": pa.array([1] * len(users), pa.int8()),
                        "event_value": pa.nulls(len(users), pa.string()),
                    },
                    schema=STANDARD,
                )


SEQTXT_SUFFIXES = (".txt", ".txt.gz", ".seq")


def input_files(uri: str, fmt: str) -> list[str]:
    """The files of an input, each readable alone by `read_input` (the Ray engine's unit of work)."""
    if fmt == "events":
        return list_inputs(uri, EVENT_SUFFIXES)
    if fmt == "movielens":
        return [_movielens_file(uri)]
    if fmt == "seqtxt":
        return list_inputs(uri, SEQTXT_SUFFIXES)
    raise InputError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def read_input(uri: str, fmt: str, mapping: EventMapping | None = None) -> Iterator[pa.Table]:
    """Dispatch on ``fmt`` (one of `FORMATS`); ``mapping`` applies to the events format."""
    if fmt == "events":
        return read_events_format(uri, mapping)
    if fmt == "movielens":
        return read_movielens(uri)
    if fmt == "seqtxt":
        return read_seqtxt(uri)
    raise InputError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def read_item_features(uri: str) -> pa.Table:
    """Item side features -> a table with ``item_id`` (string) and string feature columns.

    Parquet/CSV with ``item_id`` and categorical columns, or MovieLens ``u.item`` / ``movies.dat``
    / ``movies.csv`` (the first listed genre becomes the ``genre`` feature).
    """
    name = posixpath.basename(uri).lower()
    fs, path = storage.resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise InputError(f"items file {uri} does not exist")
    try:
        if name in ("u.item", "movies.dat", "movies.csv"):
            return _movielens_items(uri, name)
        if name.endswith((".parquet", ".pq")):
            table = read_checked(path, uri, filesystem=fs)
        else:
            with fs.open_input_stream(path, compression="detect") as stream:
                table = pacsv.read_csv(stream, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"items file {uri}: cannot be read: {exc}") from None
    if "item_id" not in table.column_names:
        raise InputError(f"items file {uri}: missing column item_id; found {', '.join(table.column_names)}")
    cols = {"item_id": pc.cast(table.column("item_id"), pa.string())}
    for col in table.column_names:
        if col != "item_id":
            cols[col] = pc.cast(table.column(col), pa.string())
    return pa.table(cols)


def _movielens_items(uri: str, name: str) -> pa.Table:
    ids, genres = [], []
    raw = storage.read_bytes(uri).decode("latin-1")
    for i, line in enumerate(raw.splitlines()):
        if not line.strip() or (name == "movies.csv" and i == 0):
            continue
        if name == "u.item":
            parts = line.split("|")
            flags = parts[5:]
            genre = next((str(j) for j, f in enumerate(flags) if f.strip() == "1"), None)
        elif name == "movies.dat":
            parts = line.split("::")
            genre = parts[-1].split("|")[0] if len(parts) >= 3 else None
        else:
            parts = line.rsplit(",", 1)
            genre = parts[-1].split("|")[0] if len(parts) == 2 else None
            parts = [line.split(",", 1)[0]]
        ids.append(parts[0].strip())
        genres.append(genre)
    return pa.table({"item_id": pa.array(ids, pa.string()), "genre": pa.array(genres, pa.string())})
