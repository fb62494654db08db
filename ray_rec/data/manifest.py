"""A prepared data set's ``manifest.json``, typed: written last by `prepare`, read by everything
that reads the data set (`read_manifest` is the one loader)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ray_rec import storage
from ray_rec.checks import check_types
from ray_rec.data.standard import InputError

SCHEMA_VERSION = 1
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class DataCounts:
    users: int
    items: int
    events: int
    clicks: int
    rows_read: int

    def __post_init__(self) -> None:
        check_types(self, "manifest.counts")


@dataclass(frozen=True)
class SplitFacts:
    protocol: str  # leave_one_out or time
    cutoff: int | None  # epoch seconds, for a time split
    min_clicks: int

    def __post_init__(self) -> None:
        check_types(self, "manifest.split")


@dataclass(frozen=True)
class Manifest:
    """What a data set holds: counts, drops by reason, the split, its shards and catalog facts."""

    counts: DataCounts
    split: SplitFacts
    files: dict[str, list[str]]  # split -> shard paths relative to the data set
    side_features: dict[str, int]  # name -> vocabulary size
    has_time: bool
    has_browse: bool
    num_shards: int
    id_type: str
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_event_values: dict[str, int] = field(default_factory=dict)  # bad_events by value (the most frequent)
    source: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        check_types(self, "manifest")
        for split, paths in self.files.items():
            for rel in paths:
                if not isinstance(rel, str) or rel.startswith("/") or ".." in rel.split("/") or "://" in rel:
                    raise ValueError(f"shard path {rel!r} of split {split!r} is not a path inside the data set")

    @property
    def clicks_per_user(self) -> float:
        return self.counts.clicks / max(self.counts.users, 1)

    def to_dict(self) -> dict[str, Any]:
        """The JSON ``manifest.json`` holds (and lineage fingerprints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        fields = {**raw, "counts": DataCounts(**raw["counts"]), "split": SplitFacts(**raw["split"])}
        return cls(**fields)


def read_manifest(data: str) -> Manifest:
    """The manifest of a finished dataset; raises `InputError` for anything else."""
    uri = storage.join(data, "manifest.json")
    if not storage.exists(uri):
        raise InputError(
            f"{data} is not a prepared dataset (no manifest.json): run `ray-rec prepare` first, "
            f"or an earlier import did not finish"
        )
    try:
        raw = json.loads(storage.read_bytes(uri))
    except ValueError as exc:
        raise InputError(f"{uri} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
        found = raw.get("schema_version") if isinstance(raw, dict) else None
        raise InputError(f"{data}: dataset schema version {found} is not {SCHEMA_VERSION}")
    try:
        return Manifest.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{uri} is not a ray_rec manifest: {exc}") from None
