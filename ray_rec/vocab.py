"""The item vocabulary: raw item ids <-> indices 1..N (0 = padding), with side features.

Stored as ``items.parquet`` (index, item_id, count, one int column per side feature) and
``side_features.json`` (feature name -> its values, value index j+1 = values[j]).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_rec import storage
from ray_rec.data.schema import read_checked

RawId = int | str


@dataclass
class Vocabulary:
    """Maps raw item ids to indices and back.

    Args:
        ids: raw ids as strings; ``ids[i]`` has index i + 1.
        counts: clicks per item, same order.
        id_type: "int" when every raw id was an integer (they are returned as int), else "str".
        side_values: feature name -> list of its values (value index j + 1 = values[j]).
        side_table: (N, S) value index of each item for each feature in sorted-name order (0 = unknown).
    """

    ids: list[str]
    counts: np.ndarray
    id_type: str = "str"
    side_values: dict[str, list[str]] = field(default_factory=dict)
    side_table: np.ndarray | None = None

    def __post_init__(self) -> None:
        self._index = {raw: i + 1 for i, raw in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def side_names(self) -> list[str]:
        return sorted(self.side_values)

    @property
    def side_sizes(self) -> dict[str, int]:
        return {name: len(values) for name, values in self.side_values.items()}

    def index_of(self, raw: RawId) -> int | None:
        """Index of a raw id (int or str), or None if the item is unknown."""
        return self._index.get(str(raw))

    def raw_id(self, index: int) -> RawId:
        raw = self.ids[index - 1]
        return int(raw) if self.id_type == "int" else raw

    def indices(self, raws: Iterable[RawId]) -> list[int | None]:
        """The index of each raw id, None for unknown ids."""
        return [self._index.get(str(raw)) for raw in raws]

    def lookup(self, raws: Iterable[RawId]) -> tuple[list[int], list[RawId]]:
        """Indices of the known ids, in order, and the unknown ids."""
        raws = list(raws)
        index = self.indices(raws)
        return [i for i in index if i is not None], [raw for raw, i in zip(raws, index) if i is None]

    def side_matrix(self) -> np.ndarray:
        """(N + 1, S) side-feature value indices with a zero row for padding."""
        s = len(self.side_values)
        table = np.zeros((len(self.ids) + 1, s), dtype=np.int64)
        if self.side_table is not None and s:
            table[1:] = self.side_table
        return table

    def to_arrow(self) -> pa.Table:
        """The ``items.parquet`` table (its schema is `schema`)."""
        cols: dict[str, object] = {
            "index": pa.array(np.arange(1, len(self.ids) + 1, dtype=np.int32)),
            "item_id": pa.array(self.ids, pa.string()),
            "count": pa.array(np.asarray(self.counts, dtype=np.int64)),
        }
        for j, name in enumerate(self.side_names):
            assert self.side_table is not None
            cols[f"side:{name}"] = pa.array(self.side_table[:, j].astype(np.int32))
        return pa.table(cols, schema=self.schema(self.side_names))

    def save(self, folder: str) -> None:
        """Write ``items.parquet`` and ``side_features.json`` into a folder (local or s3://)."""
        buf = io.BytesIO()
        pq.write_table(self.to_arrow(), buf)
        storage.write_bytes(storage.join(folder, "items.parquet"), buf.getvalue())
        meta = {"id_type": self.id_type, "side_features": self.side_values}
        storage.write_bytes(storage.join(folder, "side_features.json"), json.dumps(meta).encode())

    @staticmethod
    def schema(side_names: Iterable[str]) -> pa.Schema:
        """The exact schema of ``items.parquet`` for these side features."""
        fields = [("index", pa.int32()), ("item_id", pa.string()), ("count", pa.int64())]
        return pa.schema(fields + [(f"side:{name}", pa.int32()) for name in sorted(side_names)])

    @classmethod
    def load(cls, folder: str) -> Vocabulary:
        """Read a vocabulary written by `save`; ``items.parquet`` must have exactly its schema.

        Raises:
            UnsafeSchemaError: items.parquet has another schema (an extension type, say).
        """
        meta = json.loads(storage.read_bytes(storage.join(folder, "side_features.json")))
        if not isinstance(meta, dict) or not isinstance(meta.get("side_features"), dict):
            raise ValueError(f"{folder}/side_features.json is not a ray_rec vocabulary description")
        names = sorted(meta["side_features"])
        table = read_checked(
            io.BytesIO(storage.read_bytes(storage.join(folder, "items.parquet"))),
            f"{folder}/items.parquet",
            cls.schema(names),
        )
        side_table = None
        if names:
            side_table = np.stack([table.column(f"side:{n}").to_numpy() for n in names], 1).astype(np.int64)
        indices = table.column("index").to_numpy()
        if not np.array_equal(indices, np.arange(1, len(indices) + 1)):
            raise ValueError(f"{folder}/items.parquet: item indices are not 1..N in order")
        return cls(
            ids=table.column("item_id").to_pylist(),
            counts=table.column("count").to_numpy(),
            id_type=meta["id_type"],
            side_values=meta["side_features"],
            side_table=side_table,
        )
