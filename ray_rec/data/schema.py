"""Schema checks for every Parquet file ray_rec reads, before any value is converted.

A Parquet file can declare an Arrow extension type, and once ``ray.data`` is imported Ray's
``ray.data.arrow_pickled_object`` type is registered: converting one of its values to Python
unpickles it, so a planted file would run code with the reader's rights. Reading the schema is
safe (it parses type names only); every reader here checks it first and refuses any extension
type, at any depth, and any column whose type is not the one ray_rec writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# One user a row: the per-user sequences `ray-rec prepare` writes for each split.
SEQUENCE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("items", pa.list_(pa.int32())),
        ("events", pa.list_(pa.int8())),
        ("timestamps", pa.list_(pa.int64())),
    ]
)


FOOTER_THREADS = 8  # footers fetched at once by `check_files` (one small read each)


class UnsafeSchemaError(ValueError):
    """A Parquet file or table holds an extension type or a column of another type than expected."""


def _extension_in(dtype: pa.DataType) -> bool:
    if isinstance(dtype, pa.ExtensionType):
        return True
    return any(_extension_in(dtype.field(i).type) for i in range(dtype.num_fields))


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    """Equal types, nested ones compared by structure (a list's value field may be named
    ``item`` or ``element`` depending on the writer)."""
    if a.num_fields or b.num_fields:
        return a.id == b.id and a.num_fields == b.num_fields and all(
            _same_type(a.field(i).type, b.field(i).type) for i in range(a.num_fields)
        )
    return a.equals(b)


def check_schema(schema: pa.Schema, source: str, expected: pa.Schema | None = None,
                 required: Iterable[str] = ()) -> None:
    """Refuse ``schema`` if any column holds an extension type; with ``expected``, also unless it
    has exactly those columns of exactly those types (order free); ``required`` names columns that
    must be present.

    Raises:
        UnsafeSchemaError: naming ``source``, the column and its type.
    """
    for field in schema:
        if _extension_in(field.type):
            raise UnsafeSchemaError(
                f"{source}: column {field.name!r} has the extension type {field.type}; ray_rec reads only plain "
                f"Arrow types (an extension value can run code when read), so this file was not written by ray_rec"
            )
    missing = [name for name in required if name not in schema.names]
    if missing:
        raise UnsafeSchemaError(f"{source}: missing column(s) {', '.join(missing)}")
    if expected is None:
        return
    if sorted(schema.names) != sorted(expected.names):
        raise UnsafeSchemaError(f"{source}: columns {schema.names} are not the expected {expected.names}")
    for field in expected:
        actual = schema.field(field.name).type
        if not _same_type(actual, field.type):
            raise UnsafeSchemaError(f"{source}: column {field.name!r} is {actual}, expected {field.type}")


def read_checked(source: Any, name: str, expected: pa.Schema | None = None, filesystem: Any = None) -> pa.Table:
    """``pq.read_table`` after `check_schema` has passed the file's own schema.

    ``source``: a path (with ``filesystem``) or a file-like object; ``name`` names it in errors."""
    with pq.ParquetFile(source, filesystem=filesystem) as parquet:
        check_schema(parquet.schema_arrow, name, expected)
        return parquet.read()


def check_files(paths: list[str], filesystem: Any, expected: pa.Schema, names: list[str] | None = None) -> None:
    """`check_schema` on the footer of each Parquet file (no data is read), a few at a time.

    ``names``: how errors name each file (default: its path)."""

    def check(i: int) -> None:
        check_schema(pq.read_schema(paths[i], filesystem=filesystem), (names or paths)[i], expected)

    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        list(pool.map(check, range(len(paths))))
