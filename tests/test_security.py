"""Attacks on every way in, made for real: planted Parquet files, hostile requests, tampered
artifacts, outputs that would delete someone's files, decompression bombs and link loops."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import pickle
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data  # noqa: F401  registers Ray's pickled-object extension type, as in every Ray process
import yaml
from ray.air.util.object_extensions.arrow import ArrowPythonObjectType

from ray_rec import load_model, storage
from ray_rec.data.schema import UnsafeSchemaError

from .conftest import ACCESS_KEY_ID, SECRET_KEY, Payload, tiny_artifact

ROOT = Path(__file__).resolve().parents[1]


def cli(*argv: str) -> tuple[int, str]:
    from ray_rec.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(argv))
    return rc, err.getvalue()


def pickled(marker: Path, n: int = 1) -> pa.ExtensionArray:
    """A column of Ray's pickled-object type whose every value runs ``touch marker`` when read."""
    storage_array = pa.array([pickle.dumps(Payload(str(marker)))] * n, pa.large_binary())
    return pa.ExtensionArray.from_storage(ArrowPythonObjectType(), storage_array)


def plant(table: pa.Table, column: str, marker: Path, path: Path) -> None:
    """Write ``table`` to ``path`` with ``column`` replaced by a pickled-object column."""
    planted = table.set_column(table.schema.get_field_index(column), column, pickled(marker, table.num_rows))
    pq.write_table(planted, path)


# ------------------------------------------------------------------------------ planted Parquet


def test_the_planted_column_runs_code_when_read_the_usual_way(tmp_path):
    """The attack is live: without a schema check, reading the value runs the payload."""
    marker = tmp_path / "pwned"
    pq.write_table(pa.table({"item_id": pickled(marker)}), tmp_path / "x.parquet")
    pq.read_table(tmp_path / "x.parquet").column("item_id").to_pylist()
    assert marker.exists()


def test_an_artifacts_items_file_with_an_extension_type_is_refused_unread(tmp_path):
    marker = tmp_path / "pwned"
    for column in ("item_id", "index", "count"):
        art = Path(tiny_artifact(tmp_path / column))
        table = pq.read_table(art / "items.parquet")
        plant(table, column, marker, art / "items.parquet")
        with pytest.raises(UnsafeSchemaError, match=f"{column}.*extension type"):
            load_model(str(art))
    assert not marker.exists()


def test_dataset_shards_with_an_extension_type_are_refused_by_every_reader(tiny_data, tmp_path):
    from ray_rec.data.examples import evaluation_examples, training_examples
    from ray_rec.data.local import read_split
    from ray_rec.data.manifest import read_manifest
    from ray_rec.data.pipeline import split_paths
    from ray_rec.vocab import Vocabulary

    marker = tmp_path / "pwned"
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = data / read_manifest(str(data)).files["valid"][0]
    table = pq.read_table(shard)
    plant(table, "items", marker, shard)
    with pytest.raises(UnsafeSchemaError, match="items"):
        split_paths(str(data), "valid")  # what the Ray Data pipeline (train, evaluate, batch-score) reads
    with pytest.raises(UnsafeSchemaError):
        read_split(str(data), "valid")
    planted = pq.read_table(shard)
    with pytest.raises(UnsafeSchemaError):
        training_examples(planted, 5, 8)  # the batch check inside Ray Data's tasks
    with pytest.raises(UnsafeSchemaError):
        evaluation_examples(planted, 5, 8)
    plant(pq.read_table(data / "items.parquet"), "item_id", marker, data / "items.parquet")
    with pytest.raises(UnsafeSchemaError):
        Vocabulary.load(str(data))  # each training worker reads the data set's vocabulary
    assert not marker.exists()


def test_a_manifest_cannot_point_readers_outside_the_data_set(tiny_data, tmp_path):
    from ray_rec.data.manifest import read_manifest
    from ray_rec.data.standard import InputError

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    manifest = json.loads((data / "manifest.json").read_text())
    for rel in ("../../elsewhere/part.parquet", "/etc/passwd", "s3://other-bucket/x.parquet"):
        manifest["files"]["valid"] = [rel]
        (data / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(InputError, match="not a path inside"):
            read_manifest(str(data))


def test_prepare_refuses_input_logs_and_item_files_with_an_extension_type(tiny_logs, tmp_path):
    marker = tmp_path / "pwned"
    events = pq.read_table(tiny_logs / "events.parquet")
    plant(events, "user_id", marker, tmp_path / "events.parquet")
    rc, err = cli("prepare", "--input", str(tmp_path / "events.parquet"), "--format", "events",
                  "--output", str(tmp_path / "out1"))
    assert rc == 2 and "extension type" in err and "Traceback" not in err
    items = pa.table({"item_id": events.column("item_id").unique(), "genre": pickled(marker, len(events.column("item_id").unique()))})
    pq.write_table(items, tmp_path / "items.parquet")
    rc, err = cli("prepare", "--input", str(tiny_logs / "events.parquet"), "--format", "events",
                  "--items", str(tmp_path / "items.parquet"), "--output", str(tmp_path / "out2"))
    assert rc == 2 and "extension type" in err
    assert not (tmp_path / "out2" / "manifest.json").exists()
    assert not marker.exists()


# ---------------------------------------------------------------------------- tampered artifacts


def _edit_config(art: Path, **model: object) -> None:
    meta = json.loads((art / "config.json").read_text())
    meta["model"].update(model)
    (art / "config.json").write_text(json.dumps(meta))


def test_an_artifact_is_checked_before_anything_is_allocated(tmp_path):
    """An oversized config is refused by its size alone; a config that does not match the weights'
    shapes, a version that is not the weights' hash and non-finite weights are all refused."""
    import torch

    from ray_rec.model.artifact import ArtifactError, save_model

    art = Path(tiny_artifact(tmp_path / "big"))
    _edit_config(art, num_items=3_000_000, dim=1024)  # about 12 GB if it were allocated
    with pytest.raises(ArtifactError, match="budget"):
        load_model(str(art))
    with pytest.raises(ArtifactError, match="do not match"):
        load_model(str(art), max_model_mb=1_000_000)  # within a budget, still not the weights' shapes

    art = Path(tiny_artifact(tmp_path / "version"))
    meta = json.loads((art / "config.json").read_text())
    (art / "config.json").write_text(json.dumps({**meta, "version": "000000000000"}))
    with pytest.raises(ArtifactError, match="version"):
        load_model(str(art))

    rec = load_model(tiny_artifact(tmp_path / "ok"))
    with torch.no_grad():
        rec.model.features.item.weight[3, 0] = float("nan")
    save_model(rec.model, rec.vocab, str(tmp_path / "nan"))
    with pytest.raises(ArtifactError, match="NaN"):
        load_model(str(tmp_path / "nan"))


def test_an_s3_artifact_downloads_only_its_own_files_within_the_budget(s3, tmp_path):
    art = tiny_artifact(tmp_path / "model")
    uri = s3.uri("security/model")
    storage.copy_dir(art, uri)
    s3.client.put_object(Bucket=s3.bucket, Key="security/model/huge.bin", Body=b"\0" * (3 << 20))
    assert load_model(uri).version  # the stray 3 MB file is not fetched (a 1 MB budget would refuse it)
    s3.client.put_object(Bucket=s3.bucket, Key="security/model/weights.safetensors", Body=b"\0" * (3 << 20))
    from ray_rec.model.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="budget"):
        load_model(uri, max_model_mb=1)


# ----------------------------------------------------------------------------- hostile requests


def _validation_answer(body: dict) -> tuple[int, bytes]:
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    from ray_rec.serve.http import validation_error
    from ray_rec.serve.schemas import ScoreRequest

    try:
        ScoreRequest.model_validate(body)
    except ValidationError as exc:
        response = asyncio.run(validation_error(None, RequestValidationError(exc.errors())))  # type: ignore[arg-type]
        return response.status_code, bytes(response.body)
    raise AssertionError("the body was valid")


def test_a_bad_request_gets_a_small_answer_that_echoes_nothing():
    code, answer = _validation_answer({"history": [{}] * 100_000, "candidates": ["x"]})  # past the list ceiling
    assert code == 422 and len(answer) < 2000
    code, answer = _validation_answer({"history": [{"secret-looking": "v" * 100}] * 5000, "candidates": ["x"]})
    assert code == 422 and len(answer) < 4000 and b"secret-looking" not in answer
    assert json.loads(answer)["errors"] == 10_000  # counted, not listed
    code, answer = _validation_answer({"history": ["\ud800"], "candidates": ["x"]})
    assert code == 422 and "unicode" in answer.decode("utf-8")  # refused, not a 500 on the way out
    code, answer = _validation_answer({"history": ["a"], "candidates": ["x"], "\x1b[2J" + "k" * 5000: 1})
    assert code == 422 and len(answer) < 1000
    assert "\x1b" not in json.loads(answer)["detail"][0]["loc"][0]  # shown as an escape, not sent to a terminal
    code, answer = _validation_answer({"history": ["a"], "candidates": ["x"], "\ud800": 1})
    assert code == 422


def test_the_api_key_is_stripped_and_a_blank_one_refused(monkeypatch):
    from ray_rec.serve.http import api_key_from_env

    monkeypatch.setenv("RR_KEY", "k3y\n")
    assert api_key_from_env("RR_KEY") == "k3y"
    assert api_key_from_env("") is None
    monkeypatch.setenv("RR_KEY", " \n")
    with pytest.raises(RuntimeError, match="RR_KEY"):
        api_key_from_env("RR_KEY")


def test_serving_beyond_loopback_without_a_key_is_warned_about(caplog):
    from ray_rec.serve.local import warn_if_open

    with caplog.at_level("WARNING"):
        assert warn_if_open("0.0.0.0", 8000, "")
    assert "without an API key" in caplog.text
    assert not warn_if_open("127.0.0.1", 8000, "") and not warn_if_open("::1", 8000, "")
    assert not warn_if_open("0.0.0.0", 8000, "RAY_REC_API_KEY")


# ------------------------------------------------------------------------------- guarded outputs


def test_outputs_never_replace_what_the_command_did_not_write(tmp_path, monkeypatch):
    from ray_rec.storage import OutputError, claim_output

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="--overwrite"):
        claim_output(str(theirs), "batch-score")
    assert (theirs / "notes.txt").read_text() == "keep me"
    claim_output(str(tmp_path / "new"), "batch-score")
    claim_output(str(tmp_path / "new"), "batch-score")  # its own earlier output: fine
    with pytest.raises(OutputError, match="ray-rec batch-score"):
        claim_output(str(tmp_path / "new"), "prepare")
    claim_output(str(theirs), "batch-score", overwrite=True)  # asked for
    monkeypatch.chdir(tmp_path / "new")
    for place in (".", str(tmp_path), "/"):
        with pytest.raises(OutputError, match="working directory"):
            claim_output(place, "batch-score", overwrite=True)
    with pytest.raises(OutputError, match="reads"):
        claim_output(str(tmp_path / "run"), "batch-score", overwrite=True, reads=(str(tmp_path / "run" / "model"),))


def test_batch_score_into_the_run_folder_deletes_nothing(tiny_data, s3, tmp_path):
    """The issue's case: `batch-score --output s3://B/runs/r1` would have deleted the model it
    reads and every checkpoint. It is refused before anything is written, --overwrite or not."""
    from ray_rec.predict.batch_score import batch_score
    from ray_rec.storage import OutputError

    model = s3.uri("security/runs/r1/model")
    storage.copy_dir(tiny_artifact(tmp_path / "m"), model)
    s3.client.put_object(Bucket=s3.bucket, Key="security/runs/r1/run/checkpoint_000001/x", Body=b"ckpt")
    before = storage.list_files(s3.uri("security/runs/r1"))
    for overwrite in (False, True):
        with pytest.raises(OutputError):
            batch_score(tiny_data, model, s3.uri("security/runs/r1"), overwrite=overwrite)
    with pytest.raises(OutputError, match="bucket"):
        batch_score(tiny_data, model, f"s3://{s3.bucket}", overwrite=True)
    assert storage.list_files(s3.uri("security/runs/r1")) == before
    assert load_model(model).version


def test_prepare_into_a_folder_of_someone_elses_files_is_refused(tiny_logs, tmp_path):
    out = tmp_path / "shared-folder"
    out.mkdir()
    (out / "train").mkdir()
    (out / "train" / "their-file.csv").write_text("precious")
    args = ["prepare", "--input", str(tiny_logs / "events.parquet"), "--format", "events", "--output", str(out)]
    rc, err = cli(*args)
    assert rc == 2 and "--overwrite" in err
    assert (out / "train" / "their-file.csv").read_text() == "precious"
    assert cli(*args, "--overwrite")[0] == 0
    assert cli(*args)[0] == 0  # now it is prepare's own output: a rerun replaces it
    assert (out / "manifest.json").exists()


# ----------------------------------------------------------------------- bombs and link loops


def _zeros_gz(path: Path, gib: float) -> None:
    """A gzip file of ``gib`` GiB of zeros (a few MB on disk)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"0" * (1 << 24)
    with open(path, "wb") as f:
        for _ in range(int(gib * 64)):
            f.write(packer.compress(block))
        f.write(packer.flush())


# The CLI in a fresh process that prints its own peak resident memory (kB) last: VmHWM belongs to
# the program's own address space (a forked child's rusage would count the parent's pages too).
PEAK_MEMORY = """
import sys
from ray_rec.cli import main
try:
    rc = main(sys.argv[1:])
finally:
    print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1], flush=True)
sys.exit(rc)
"""


@pytest.mark.parametrize("name,fmt", [("seq.txt.gz", "seqtxt"), ("u.data.gz", "movielens"), ("events.csv.gz", "events")])
def test_a_gzip_bomb_is_refused_with_bounded_memory(tmp_path, name, fmt):
    """1 GiB of zeros without a newline: refused once a line passes the limit; the importer's peak
    memory stays far below what buffering the line would take (it grew past 3 GB before)."""
    bomb = tmp_path / name
    _zeros_gz(bomb, 1.0)
    out = subprocess.run([sys.executable, "-c", PEAK_MEMORY, "prepare", "--input", str(bomb), "--format", fmt,
                          "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr
    assert "error:" in out.stderr and "Traceback" not in out.stderr
    peak_mb = int(out.stdout.split()[-1]) / 1024
    assert peak_mb < 1024, f"peak {peak_mb:.0f} MB"


def test_a_link_loop_in_an_input_folder_is_not_followed(tiny_logs, tmp_path):
    logs = tmp_path / "logs"
    (logs / "sub").mkdir(parents=True)
    shutil.copy(tiny_logs / "events.parquet", logs / "events.parquet")
    (logs / "sub" / "up").symlink_to("..")
    (logs / "sub" / "up2").symlink_to("..")  # two loops: 2^40 paths if followed
    assert storage.list_files(str(logs)) == ["events.parquet"]
    rc, err = cli("prepare", "--input", str(logs), "--format", "events", "--output", str(tmp_path / "out"))
    assert rc == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["rows_read"] == pq.read_metadata(tiny_logs / "events.parquet").num_rows


# ---------------------------------------------------------------------- supply chain and secrets


def test_the_s3_filesystem_carries_no_credentials_when_pickled(s3):
    raw = pickle.dumps(storage.s3_filesystem())
    assert ACCESS_KEY_ID.encode() not in raw and SECRET_KEY.encode() not in raw
    storage.write_bytes(s3.uri("security/probe"), b"ok")
    assert storage.read_bytes(s3.uri("security/probe")) == b"ok"


def _runtime_envs(node: object) -> list[dict]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "runtime_env" and isinstance(value, dict):
                found.append(value)
            found += _runtime_envs(value)
    elif isinstance(node, list):
        for value in node:
            found += _runtime_envs(value)
    return found


def _serve_configs() -> dict[str, dict]:
    configs = {p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "serve_configs").glob("*.yaml")}
    service = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    configs["rayservice.yaml"] = yaml.safe_load(service["spec"]["serveConfigV2"])
    return configs


def test_serve_configs_install_nothing_and_hold_no_secret():
    from ray.serve.schema import ServeDeploySchema

    from ray_rec.serve.schemas import ServeArgs

    for name, config in _serve_configs().items():
        ServeDeploySchema.model_validate(config)
        for env in _runtime_envs(config):
            assert not {"pip", "uv", "conda", "py_modules"} & set(env), f"{name} installs code at deploy time"
            secret_like = [k for k in env.get("env_vars", {}) if any(w in k.upper() for w in ("KEY", "SECRET", "TOKEN", "PASSWORD", "REDIS"))]
            assert not secret_like, f"{name}: {secret_like} in a runtime_env (Ray logs it)"
        for app in config["applications"]:
            ServeArgs(**app["args"])  # typos and unknown settings are refused
            # Replicas and resources are Serve's own fields, on the deployment the app builds.
            assert {d["name"] for d in app.get("deployments", [])} <= {"RecommenderService"}, name
    production = _serve_configs()["production.yaml"]["applications"][0]
    assert production["deployments"][0]["autoscaling_config"]["max_replicas"] > 1  # Serve's own fields
    assert production["args"]["api_key_env"]
