"""The standard event table every reader yields, and how a log's columns become it.

Columns: ``user_id`` (string), ``item_id`` (string), ``timestamp`` (int64 seconds; null where
unparseable), ``event`` (int8: 1 click, 0 browse, -1 neither) and ``event_value`` (the raw value of
a -1 event). `EventMapping` says where the events format finds each field and which event values
are clicks or browses; `standardise` applies it to one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from ray_rec.data.examples import MAX_ABS_SECONDS

STANDARD = pa.schema(
    [("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64()), ("event", pa.int8()),
     ("event_value", pa.string())]  # the raw value of an event neither click nor browse (-1), else null
)
FIELDS = ("user_id", "item_id", "timestamp", "event")  # what a mapping may rename; event is optional
DEFAULT_CLICKS = ("click", "1", "true", "clicked")
DEFAULT_BROWSES = ("browse", "0", "false", "impression", "view", "shown")


class InputError(ValueError):
    """The user's input cannot be read: names the file and what is wrong with it."""


@dataclass(frozen=True)
class EventMapping:
    """Where the events format finds its fields and what its event values mean: ``columns`` maps a
    field of `FIELDS` to the log's column name (unnamed fields keep their own name); event values
    (compared trimmed and case-insensitively) in ``clicks`` are clicks, in ``browses`` browses, any
    other is dropped and counted by value."""

    columns: dict[str, str] = field(default_factory=dict)
    clicks: tuple[str, ...] = DEFAULT_CLICKS
    browses: tuple[str, ...] = DEFAULT_BROWSES

    def __post_init__(self) -> None:
        unknown = sorted(set(self.columns) - set(FIELDS))
        if unknown:
            raise ValueError(f"columns: {', '.join(unknown)} is not a field; map any of {', '.join(FIELDS)}")
        sources = [self.source(f) for f in FIELDS]
        if len(set(sources)) < len(sources):
            raise ValueError(f"columns: two fields read the same column ({', '.join(f'{f}={c}' for f, c in zip(FIELDS, sources))})")
        object.__setattr__(self, "clicks", tuple(v.strip().lower() for v in self.clicks))
        object.__setattr__(self, "browses", tuple(v.strip().lower() for v in self.browses))
        both = sorted(set(self.clicks) & set(self.browses))
        if both:
            raise ValueError(f"event value(s) {', '.join(both)} are both click and browse events")
        if not self.clicks:
            raise ValueError("click events: name at least one event value that is a click")

    def source(self, name: str) -> str:
        """The log's column holding field ``name``."""
        return self.columns.get(name, name)


def parse_mapping(text: str | None) -> dict[str, str]:
    """``user_id=uid,item_id=sku`` -> {"user_id": "uid", "item_id": "sku"}.

    Raises:
        ValueError: an entry is not ``field=column``."""
    out: dict[str, str] = {}
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        name, sep, column = entry.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise ValueError(f"--columns entry {entry.strip()!r} is not field=column (e.g. user_id=uid)")
        out[name.strip()] = column.strip()
    return out


def parse_values(text: str | None) -> tuple[str, ...] | None:
    """``click,purchase`` -> ("click", "purchase"); None when not given."""
    return None if text is None else tuple(v.strip() for v in text.split(",") if v.strip())


_NUMERIC = r"^\s*-?\d+(\.\d*)?\s*$"


def parse_timestamps(values: pa.Array) -> pa.Array:
    """Epoch seconds (int, float, or milliseconds when > 1e11) or ISO 8601 strings -> int64 seconds.

    Unparseable or implausible values (NaN, infinite, beyond `MAX_ABS_SECONDS` once milliseconds
    are converted) become null; the caller counts and drops them.
    """
    if pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
        return pc.cast(pc.cast(values, pa.timestamp("s"), safe=False), pa.int64())
    if pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
        secs = pc.cast(values, pa.float64(), safe=False)  # huge ints lose precision, then fail the range check
        secs = pc.if_else(pc.greater(pc.abs(secs), MAX_ABS_SECONDS), pc.divide(secs, 1000.0), secs)
        plausible = pc.fill_null(pc.less(pc.abs(secs), MAX_ABS_SECONDS), False)  # also drops NaN and inf
        return pc.cast(pc.floor(pc.if_else(plausible, secs, None)), pa.int64())
    strings = pc.cast(values, pa.string())
    numeric = pc.fill_null(pc.match_substring_regex(strings, _NUMERIC), False)
    out: list[int | None] = []
    for text, is_num in zip(strings.to_pylist(), numeric.to_pylist()):
        out.append(_parse_one(text, is_num))
    return pa.array(out, pa.int64())


def _parse_one(text: str | None, is_num: bool) -> int | None:
    if text is None:
        return None
    try:
        if is_num:
            secs = float(text)
            secs = secs / 1000 if abs(secs) > 1e11 else secs
            return int(math.floor(secs)) if abs(secs) < MAX_ABS_SECONDS else None
        stamp = datetime.fromisoformat(text.strip())
    except (ValueError, OverflowError):
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return int(stamp.timestamp())


def parse_events(values: pa.Array | None, n: int, mapping: EventMapping | None = None) -> tuple[pa.Array, pa.Array]:
    """Event values -> (1 click / 0 browse / -1 neither, int8; the raw value where -1, else null).
    Values are compared trimmed and lower-cased with ``mapping``'s lists (by default click/browse,
    1/0, true/false, ...); no event column means every row is a click."""
    if values is None:
        return pa.array([1] * n, pa.int8()), pa.nulls(n, pa.string())
    mapping = mapping or EventMapping()
    raw = pc.cast(values, pa.string())
    text = pc.utf8_lower(pc.utf8_trim_whitespace(raw))
    click = pc.fill_null(pc.is_in(text, pa.array(mapping.clicks, pa.string())), False)
    browse = pc.fill_null(pc.is_in(text, pa.array(mapping.browses, pa.string())), False)
    event = pc.cast(pc.if_else(click, 1, pc.if_else(browse, 0, -1)), pa.int8())
    other = pc.invert(pc.or_(click, browse))
    return event, pc.if_else(other, pc.fill_null(raw, "(null)"), pa.scalar(None, pa.string()))


def standardise(table: pa.Table, source: str, mapping: EventMapping | None = None) -> pa.Table:
    """A table holding the events fields (under ``mapping``'s column names) -> the `STANDARD` schema."""
    mapping = mapping or EventMapping()

    def as_string(name: str) -> pa.Array:
        col = table.column(mapping.source(name)).combine_chunks()
        if pa.types.is_floating(col.type):  # ints read as floats because of nulls
            col = pc.cast(col, pa.int64(), safe=False)
        try:
            return pc.cast(col, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InputError(f"{source}: column {mapping.source(name)!r} ({name}) cannot be read as ids: {exc}") from None

    has_event = mapping.source("event") in table.column_names
    event, value = parse_events(table.column(mapping.source("event")).combine_chunks() if has_event else None,
                                table.num_rows, mapping)
    return pa.table(
        {
            "user_id": as_string("user_id"),
            "item_id": as_string("item_id"),
            "timestamp": parse_timestamps(table.column(mapping.source("timestamp")).combine_chunks()),
            "event": event,
            "event_value": value,
        },
        schema=STANDARD,
    )


def require_columns(columns: list[str], mapping: EventMapping, source: str) -> None:
    """Raises InputError naming the file and every field whose column it lacks (event only when mapped)."""
    needed = [f for f in FIELDS if f != "event" or "event" in mapping.columns]
    missing = [f"{mapping.source(f)}" + (f" (for {f})" if mapping.source(f) != f else "") for f in needed
               if mapping.source(f) not in columns]
    if missing:
        raise InputError(
            f"{source}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'} "
            f"(the events format needs user_id, item_id, timestamp and optionally event; --columns maps other names)"
        )
