"""`ray-rec prepare --engine ray`: the same data set as the local engine, on a real local Ray."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_rec import storage
from ray_rec.data.manifest import read_manifest
from ray_rec.data.prepare import PrepareOptions, prepare
from ray_rec.data.standard import InputError

from .test_data import sequences


def messy_log(folder: Path, tiny_logs: Path) -> Path:
    """The tiny log in three files of three formats, with malformed rows, duplicates across files,
    browses and unknown event values, under the log's own column names."""
    log = pq.read_table(tiny_logs / "events.parquet").to_pylist()
    renamed = [{"uid": r["user_id"], "sku": r["item_id"], "ts": r["timestamp"], "action": r["event"]} for r in log]
    third = len(renamed) // 3
    parts = [renamed[:third], renamed[third : 2 * third], renamed[2 * third :]]
    parts[1] = parts[1] + parts[0][:50]  # duplicates of the first file's rows in the second
    parts[0] = parts[0] + [{"uid": None, "sku": "x", "ts": 5, "action": "click"}, {"uid": "u1", "sku": "x", "ts": "soon", "action": "click"},
                           {"uid": "u1", "sku": "x", "ts": 7, "action": "add_to_cart"}]
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{**r, "ts": str(r["ts"])} for r in parts[0]]), folder / "a.parquet")
    header = "uid,sku,ts,action\n"
    (folder / "b.csv").write_text(header + "".join(f"{r['uid']},{r['sku']},{r['ts']},{r['action']}\n" for r in parts[1]))
    import json

    (folder / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in parts[2]) + "{broken\n")
    return folder


def options(src: Path | str, out: Path | str, engine: str) -> PrepareOptions:
    return PrepareOptions(input=str(src), output=str(out), num_shards=3, engine=engine, overwrite=True,
                          columns={"user_id": "uid", "item_id": "sku", "timestamp": "ts", "event": "action"})


def test_both_engines_make_the_same_data_set_from_a_messy_log(ray_cluster, tiny_logs, tmp_path):
    src = messy_log(tmp_path / "logs", tiny_logs)
    local = prepare(options(src, tmp_path / "local", "local"))
    on_ray = prepare(options(src, tmp_path / "ray", "ray"))
    assert local.dropped["null_ids"] == 2 and local.dropped["bad_timestamps"] == 1 and local.dropped["duplicates"] == 50
    assert local.dropped_event_values == {"add_to_cart": 1}
    same = ("counts", "dropped", "dropped_event_values", "files", "has_browse", "has_time", "id_type", "num_shards", "split")
    assert {k: getattr(on_ray, k) for k in same} == {k: getattr(local, k) for k in same}
    assert sequences(tmp_path / "ray") == sequences(tmp_path / "local")
    assert storage.read_bytes(str(tmp_path / "ray" / "items.parquet")) == storage.read_bytes(str(tmp_path / "local" / "items.parquet"))
    assert not [p for p in (tmp_path / "ray").iterdir() if p.name.startswith("_staging")]


def test_the_ray_engine_writes_to_s3_and_a_failed_run_leaves_nothing_that_looks_complete(ray_cluster, tiny_logs, s3, tmp_path):
    s3.client.upload_file(str(tiny_logs / "events.parquet"), s3.bucket, "ray-engine/logs/part-0.parquet")
    out = s3.uri("ray-engine/data")
    made = prepare(PrepareOptions(input=s3.uri("ray-engine/logs"), output=out, num_shards=2, engine="ray"))
    assert read_manifest(out).counts == made.counts and made.counts.users > 0
    plain = prepare(PrepareOptions(input=str(tiny_logs / "events.parquet"), output=str(tmp_path / "plain"), num_shards=2, engine="local"))
    assert dataclasses.asdict(made.counts) == dataclasses.asdict(plain.counts)
    # A second file whose header is right and whose rows are not fails in its read task, mid-run:
    # the error names the file, the data set already there is untouched, no staging prefix is left.
    s3.client.put_object(Bucket=s3.bucket, Key="ray-engine/logs/part-1.csv", Body=b"user_id,item_id,timestamp\na,b,1\nx,y\n")
    with pytest.raises(InputError, match="part-1.csv: cannot be read"):
        prepare(PrepareOptions(input=s3.uri("ray-engine/logs"), output=out, num_shards=2, engine="ray", overwrite=True))
    assert read_manifest(out).counts == made.counts  # the failed run changed nothing
    assert not [f for f in storage.list_files(out) if f.startswith("_staging")]


def test_on_a_cluster_the_ray_engine_needs_its_input_and_output_on_s3(ray_cluster, tiny_logs, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # as inside a Ray job: the tasks may run on any node
    with pytest.raises(InputError, match="--input and --output must be s3://"):
        prepare(PrepareOptions(input=str(tiny_logs / "events.parquet"), output=str(tmp_path / "out"), engine="ray"))
    assert not (tmp_path / "out").exists()
