"""Faults injected for real, bad input thrown at every entry point, and what must never leak.

Each test that injects a fault records its figures (faults survived, requests sent, errors seen,
data lost) when ``RAY_REC_RELIABILITY_RECORDS`` names a file: ``python -m bench.reliability`` runs
these tests that way and keeps the figures for RELIABILITY.md. A plain test run writes nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from bench.serve_kill import replica_pids
from ray_rec import load_model
from ray_rec.config import load_config
from ray_rec.serve.client import retrying_session
from ray_rec.serve.local import APP_NAME

from .conftest import (
    ACCESS_KEY_ID,
    API_KEY,
    API_KEY_ENV,
    SECRET_KEY,
    Payload,
    free_port,
    record,
    tiny_artifact,
)


def history(s3, out: str) -> list[dict]:
    key = out.split("/", 3)[3] + "/metrics.jsonl"
    body = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines()]


def keys(s3, prefix: str) -> list[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


# --------------------------------------------------------------------------------------- faults


@pytest.mark.slow
def test_killed_worker_resumes_and_ends_like_a_clean_run(trained, ray_cluster, s3_data, s3, tmp_path):
    """SIGKILL a training worker mid-epoch; the run resumes from its checkpoint and its final
    validation metrics match the same run without the fault (the `trained` fixture) within noise."""
    from ray_rec.train.trainer import train

    marker = tmp_path / "killed"
    config = load_config(None, {"model.dim": 16, "train.epochs": 3, "train.batch_size": 64})
    out = s3.uri("runs/killed")
    result = train(s3_data, out, config, workers=2, fail_once={"epoch": 2, "step": 2, "marker": str(marker)})
    assert marker.exists(), "the fault was not injected"
    rows, clean = history(s3, out), history(s3, trained.output)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["resumes"] for r in rows] == [0, 1, 1], "epochs 2-3 must run after resuming from epoch 1's checkpoint"
    assert result.epochs_run == 3
    faulty, reference = rows[-1]["val_NDCG@10"], clean[-1]["val_NDCG@10"]
    assert abs(faulty - reference) <= max(0.03, 0.15 * reference), (faulty, reference)
    load_model(result.model_uri)
    record("worker SIGKILL mid-epoch", faults=1, survived=1, epochs=len(rows), val_ndcg10_with_fault=round(faulty, 4),
           val_ndcg10_clean=round(reference, 4), data_lost=0)


class Outage:
    """Stops the S3 server once ``ready()`` says so, keeps it down ``seconds``, restarts it."""

    def __init__(self, s3, ready, seconds: float) -> None:
        self.s3, self.ready, self.seconds = s3, ready, seconds
        self.started_at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stop = threading.Event()

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.ready():
                self.s3.stop()
                self.started_at = time.monotonic()
                time.sleep(self.seconds)
                self.s3.restart()
                return
            time.sleep(0.05)

    def __enter__(self) -> Outage:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


@pytest.mark.slow
def test_training_survives_an_s3_outage(ray_cluster, s3_data, s3):
    """The S3 endpoint goes away for 6 s after the first checkpoint: uploads and reads retry,
    training finishes with every epoch's checkpoint and metrics."""
    from ray_rec.train.trainer import train

    out = s3.uri("runs/outage")
    config = load_config(None, {"model.dim": 16, "train.epochs": 4, "train.batch_size": 64})
    prefix = "runs/outage/run/checkpoint_"
    done = threading.Event()
    with Outage(s3, lambda: bool(keys(s3, prefix)), 6.0) as outage:
        result = train(s3_data, out, config, workers=2)
        done.set()
    assert outage.started_at is not None, "the outage never happened"
    rows = history(s3, out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    load_model(result.model_uri)
    record("S3 endpoint down 6 s during training", faults=1, survived=1, epochs=len(rows), data_lost=0)


@pytest.mark.slow
@pytest.mark.parametrize("seconds,retries", [(3.0, None), (40.0, None), (20.0, "2")])
def test_import_during_an_s3_outage_completes_or_leaves_nothing_complete(tiny_logs, s3, seconds, retries, monkeypatch):
    """The endpoint goes away while the import uploads its shards. Outages the retries cover
    (10 attempts, about 40 s) are ridden out; one they do not (2 attempts against 20 s) fails the
    import, which then leaves no manifest, so nothing looks complete."""
    from ray_rec.data.local import read_split
    from ray_rec.data.manifest import read_manifest
    from ray_rec.data.prepare import PrepareOptions, prepare

    if retries:
        monkeypatch.setenv("RAY_REC_S3_RETRIES", retries)
    name = f"datasets/outage-{int(seconds)}-{retries}"
    out = s3.uri(name)
    error = None
    with Outage(s3, lambda: any("_staging-" in k for k in keys(s3, name)), seconds) as outage:
        try:
            prepare(PrepareOptions(input=str(tiny_logs / "events.parquet"), output=out, num_shards=2))
        except OSError as exc:
            error = exc
    assert outage.started_at is not None, "the outage never happened"
    monkeypatch.delenv("RAY_REC_S3_RETRIES", raising=False)
    if error is None:
        manifest = read_manifest(out)
        users = read_split(out, "train").num_rows
        assert users == manifest.counts.users, "the dataset looks complete but is not"
        outcome = "completed"
    else:
        assert f"{name}/manifest.json" not in keys(s3, name), "a failed import left a manifest"
        with pytest.raises(ValueError, match="manifest"):
            read_manifest(out)
        outcome = f"failed cleanly: {str(error)[:80]}"
    if retries:
        assert error is not None, "2 retries should not ride out a 20 s outage"
    record(f"S3 endpoint down {seconds:.0f} s during import" + (f" ({retries} attempts)" if retries else ""), faults=1,
           outcome=outcome, data_lost=0)


@pytest.fixture(scope="module")
def keyed_service(trained, ray_cluster):
    """The app with an API key and a short request timeout, on its own port."""
    from ray import serve

    from ray_rec.serve.local import start

    os.environ[API_KEY_ENV] = API_KEY
    serve.shutdown()
    url = start(trained.model_uri, port=free_port(), request_timeout_s=10, api_key_env=API_KEY_ENV, max_body_bytes=8192)
    yield url
    serve.delete("ray_rec")
    serve.shutdown()


HEADERS = {"X-API-Key": API_KEY}


def _replica_pid() -> int:
    """The pid of the app's one live replica, waiting out the state API's lag."""
    pids = replica_pids(APP_NAME, 1, timeout_s=30)
    assert len(pids) == 1, f"{len(pids)} live replicas of the app"
    return pids[0]


@pytest.mark.slow
def test_serve_replica_killed_under_load(keyed_service):
    """SIGKILL the replica while 8 clients (`retrying_session`) send requests: every request is
    answered (success or an error response) within the 10 s request timeout, Serve starts a new
    replica, and then every request succeeds again."""
    url, timeout_s = keyed_service, 10
    stop = threading.Event()
    results: list[tuple[str, float]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        session = retrying_session()
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = session.post(url + "/v1/recommend", json={"history": [f"i{i}"], "k": 3}, headers=HEADERS,
                                 timeout=timeout_s + 20)
                outcome = str(r.status_code)
            except requests.Timeout:
                outcome = "hang"
            except requests.ConnectionError:
                outcome = "connection error"
            with lock:
                results.append((outcome, time.monotonic() - t0))

    old_pid = _replica_pid()
    with ThreadPoolExecutor(8) as pool:
        for i in range(8):
            pool.submit(client, i)
        time.sleep(3)
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 90
        recovered = False
        while time.monotonic() < deadline and not recovered:
            time.sleep(1)
            with lock:
                recent = [o for o, _ in results[-40:]]
            recovered = len(recent) == 40 and set(recent) == {"200"}
        stop.set()
    assert recovered, f"Serve did not recover: last outcomes {sorted(set(o for o, _ in results[-40:]))}"
    assert _replica_pid() != old_pid
    outcomes = [o for o, _ in results]
    assert "hang" not in outcomes
    assert max(t for _, t in results) < timeout_s + 5, "a request waited past the request timeout"
    assert set(outcomes) <= {"200", "500", "502", "503", "504", "408"}, sorted(set(outcomes))
    after = [requests.post(url + "/v1/recommend", json={"history": ["i1"], "k": 3}, headers=HEADERS, timeout=30).status_code
             for _ in range(50)]
    assert set(after) == {200}
    errors = sum(o != "200" for o in outcomes)
    record("Serve replica SIGKILL under load (8 clients)", faults=1, survived=1, requests=len(outcomes), errors_during=errors,
           hangs=0, slowest_s=round(max(t for _, t in results), 2), requests_after=50, errors_after=0)


@pytest.mark.slow
def test_a_replica_killed_under_load_fails_no_request_while_another_serves(trained, keyed_service):
    """Two replicas behind the HAProxy ingress; SIGKILL one while 8 clients send requests. New
    requests go to the live replica (HAProxy retries a refused connection elsewhere); a request in
    flight on the dead one has its connection reset, or is answered 500 by HAProxy itself, and the
    client sends it again (`retrying_session`), so every request succeeds."""
    from ray import serve

    from ray_rec.serve.app import RecommenderService, deployment_options
    from ray_rec.serve.schemas import ServeArgs

    args = ServeArgs(model_uri=trained.model_uri)
    two = RecommenderService.options(**{**deployment_options(args), "num_replicas": 2}).bind(args.model_dump())  # type: ignore[attr-defined]
    serve.run(two, name="two", route_prefix="/two")
    url = keyed_service + "/two"
    try:
        pids = replica_pids("two", 2)
        assert len(pids) == 2, pids
        stop, lock = threading.Event(), threading.Lock()
        outcomes: list[str] = []

        def client(i: int) -> None:
            session = retrying_session()
            while not stop.is_set():
                try:
                    r = session.post(url + "/v1/recommend", json={"history": [f"i{i}"], "k": 3}, timeout=40)
                    outcome = str(r.status_code)
                except requests.RequestException as exc:
                    outcome = type(exc).__name__
                with lock:
                    outcomes.append(outcome)

        with ThreadPoolExecutor(8) as pool:
            for i in range(8):
                pool.submit(client, i)
            time.sleep(3)
            before = len(outcomes)
            os.kill(pids[0], signal.SIGKILL)
            time.sleep(10)
            stop.set()
        failed = [o for o in outcomes if o != "200"]
        assert before > 0 and len(outcomes) > before, "the load did not run across the kill"
        assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {sorted(set(failed))}"
        record("Serve replica SIGKILL under load, 2 replicas (8 clients)", faults=1, survived=1, requests=len(outcomes),
               errors_during=0, requests_after_kill=len(outcomes) - before)
    finally:
        serve.delete("two")


# ------------------------------------------------------------------------------ generated requests


def _schema_strategy(schema: dict, components: dict, st):
    """A hypothesis strategy for values of an OpenAPI schema, mixed with wrong-typed values."""
    if "$ref" in schema:
        return _schema_strategy(components[schema["$ref"].rsplit("/", 1)[1]], components, st)
    if "anyOf" in schema:
        return st.one_of([_schema_strategy(s, components, st) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "object":
        props = {k: _schema_strategy(v, components, st) for k, v in schema.get("properties", {}).items()}
        return st.fixed_dictionaries({}, optional={**props, "extra": st.integers()})
    if kind == "array":
        return st.lists(_schema_strategy(schema.get("items", {}), components, st), max_size=60)
    if kind == "integer":
        return st.one_of(st.integers(), st.integers(min_value=-5, max_value=600))
    if kind == "number":
        return st.floats(allow_nan=False)
    if kind == "string":
        return st.text(max_size=40)
    if kind == "boolean":
        return st.booleans()
    return st.one_of(st.none(), st.text(max_size=10), st.integers())



@pytest.mark.slow
def test_ten_thousand_generated_requests_get_no_5xx_and_no_hang(keyed_service):
    """Requests generated from the app's OpenAPI schema (valid, wrong-typed, out-of-range, extra
    fields, broken JSON, oversized bodies), 10,000 of them, 10 at a time: no 5xx and no hang."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    url = keyed_service
    spec = requests.get(url + "/openapi.json", headers=HEADERS, timeout=30).json()
    components = spec.get("components", {}).get("schemas", {})
    bodies = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if schema is not None:
                bodies.append(st.tuples(st.just(method), st.just(path), st.one_of(
                    _schema_strategy(schema, components, st).map(json.dumps),
                    st.text(max_size=30),  # not JSON
                    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
                    st.integers(9000, 20000).map(lambda n: json.dumps({"history": ["i1"] * n})),  # over the body limit
                )))
            else:
                bodies.append(st.tuples(st.just(method), st.just(path), st.just("")))
    request = st.tuples(st.one_of(bodies), st.sampled_from([HEADERS, {}, {"X-API-Key": "wrong"}]))
    session = requests.Session()
    seen: dict[str, int] = {}
    slowest = [0.0]

    def send(item) -> None:
        (method, path, body), headers = item
        t0 = time.monotonic()
        r = session.request(method, url + path, data=body.encode(), timeout=30,
                            headers={**headers, "content-type": "application/json"})
        slowest[0] = max(slowest[0], time.monotonic() - t0)
        seen[str(r.status_code)] = seen.get(str(r.status_code), 0) + 1
        assert r.status_code < 500, (method, path, body[:200], r.status_code, r.text[:300])

    pool = ThreadPoolExecutor(10)

    @settings(max_examples=1000, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(request, min_size=10, max_size=10))
    def ten_at_a_time(items) -> None:
        for future in [pool.submit(send, item) for item in items]:
            future.result()

    ten_at_a_time()
    pool.shutdown()
    total = sum(seen.values())
    assert total >= 10_000
    record("generated requests from the OpenAPI schema", requests=total, status_counts=seen, errors_5xx=0, hangs=0,
           slowest_s=round(slowest[0], 2))


# ------------------------------------------------------------------------------------- security


@pytest.mark.slow
def test_api_key_and_credentials_never_reach_logs_or_outputs(keyed_service, trained, s3):
    """After serving keyed requests and training on S3: the API key and the S3 secret appear in
    no Ray log, and the S3 credentials in no object the runs wrote (manifests, checkpoints,
    artifacts, metrics)."""
    url = keyed_service
    for key in (API_KEY, "a-wrong-key-77"):
        requests.post(url + "/v1/recommend", json={"history": ["i1"], "k": 2}, headers={"X-API-Key": key}, timeout=30)
    time.sleep(2)  # let the log monitor flush
    logs = Path("/tmp/ray/session_latest/logs")
    leaks = []
    for path in logs.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            leaks += [f"{path}: {s}" for s in (API_KEY, "a-wrong-key-77", SECRET_KEY) if s.encode() in text]
    objects = [k for k in keys(s3, "") if not k.startswith("raw/")]
    assert any(k.endswith("manifest.json") for k in objects) and any("checkpoint_" in k for k in objects)
    for key in objects:
        body = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        leaks += [f"s3://{s3.bucket}/{key}: {s}" for s in (SECRET_KEY, ACCESS_KEY_ID) if s.encode() in body]
    assert not leaks, leaks
    record("secrets in logs and outputs", files_checked=sum(1 for p in logs.rglob("*") if p.is_file()) + len(objects), leaks=0)


def test_malicious_pickles_in_artifacts_and_checkpoints_are_refused(tmp_path):
    import shutil

    import torch

    from ray_rec.model.artifact import ArtifactError
    from ray_rec.train.checkpoint import (
        HISTORY_FILE,
        LEGACY_STATE_FILE,
        OPTIMIZER_META,
        OPTIMIZER_TENSORS,
        read_checkpoint,
        write_checkpoint,
    )

    marker = tmp_path / "pwned"
    evil = pickle.dumps(Payload(str(marker)))
    # 1. the weights file replaced by a pickle
    art = tiny_artifact(tmp_path / "a")
    (Path(art) / "weights.safetensors").write_bytes(evil)
    with pytest.raises(ArtifactError, match="safetensors"):
        load_model(art)
    # 2. a pickle planted beside the weights, under names torch users load by habit
    art2 = tiny_artifact(tmp_path / "b")
    for name in ("model.pt", "weights.pt", "pytorch_model.bin"):
        (Path(art2) / name).write_bytes(evil)
    load_model(art2)
    # 3. each file of a checkpoint's trainer state replaced by a pickle
    rec = load_model(art2)
    good = tmp_path / "ckpt"
    write_checkpoint(str(good), rec.model, rec.vocab, torch.optim.Adam(rec.model.parameters()), {"epoch": 1, "history": []})
    for name in (OPTIMIZER_TENSORS, OPTIMIZER_META, HISTORY_FILE):
        bad = tmp_path / f"ckpt-{name}"
        shutil.copytree(good, bad)
        (bad / name).write_bytes(evil)
        with pytest.raises(ArtifactError, match="cannot be read"):
            read_checkpoint(str(bad), rec.model, torch.optim.Adam(rec.model.parameters()))
    # 4. a checkpoint in the old layout, whose optimizer state was a pickle: refused unread
    old = tmp_path / "ckpt-old"
    shutil.copytree(good, old)
    for name in (OPTIMIZER_TENSORS, OPTIMIZER_META):
        (old / name).unlink()
    (old / LEGACY_STATE_FILE).write_bytes(evil)
    with pytest.raises(ArtifactError, match="pickle"):
        read_checkpoint(str(old), rec.model, torch.optim.Adam(rec.model.parameters()))
    assert not marker.exists(), "a planted pickle ran"
    pickle.loads(evil)  # the payload is live: loading it the usual way does run it
    assert marker.exists()
    record("malicious pickles planted in artifacts and checkpoints", planted=8, executed=0)


# ------------------------------------------------------------------------------------- bad input


def _prepare(tmp_path: Path, path: Path, fmt: str) -> tuple[int, str]:
    import contextlib
    import io

    from ray_rec.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["prepare", "--input", str(path), "--format", fmt, "--output", str(tmp_path / "out"), "--num-shards", "2"])
    return rc, err.getvalue()


def _check_outcome(rc: int, err: str, out: Path) -> None:
    from ray_rec.data.manifest import read_manifest

    assert "Traceback" not in err
    if rc == 0:
        assert read_manifest(str(out)).counts.users >= 1
    else:
        last = err.strip().split("\n")[-1] if err.strip() else ""
        assert rc == 2 and last.startswith("ray-rec prepare: error: ") and len(last) > 30, err
        assert not (out / "manifest.json").exists()


def _fuzz_settings():
    from hypothesis import HealthCheck, settings

    return settings(max_examples=150, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _values(st):
    return st.one_of(
        st.none(), st.text(max_size=12), st.integers(), st.integers(min_value=2**62, max_value=2**63 - 1),
        st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.sampled_from(["click", "browse", "", "2024-01-01T00:00:00Z"]),
    )


def test_fuzzed_event_files_get_a_clear_error_or_counted_drops(tmp_path):
    """Malformed CSV and Parquet event logs: wrong types, nulls, huge ids, unicode, missing
    columns, empty and truncated files. Each gives a clear error (exit 2, one line) or imports
    with the bad rows counted; never a stack trace."""
    import csv
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from hypothesis import given
    from hypothesis import strategies as st

    columns = st.lists(st.sampled_from(["user_id", "item_id", "timestamp", "event", "extra", "ÜSER"]), min_size=0, max_size=5,
                       unique=True)
    counter = [0]

    @_fuzz_settings()
    @given(columns, st.data(), st.sampled_from(["csv", "parquet"]), st.floats(0.0, 1.0), st.booleans())
    def check(cols, data, kind, cut, truncate) -> None:
        counter[0] += 1
        case = tmp_path / f"case{counter[0]}"
        case.mkdir()
        n = data.draw(st.integers(0, 25))
        rows = [[data.draw(_values(st)) for _ in cols] for _ in range(n)]
        if kind == "csv":
            buf = io.StringIO()
            writer = csv.writer(buf)
            if cols:
                writer.writerow(cols)
            writer.writerows(rows)
            raw = buf.getvalue().encode("utf-8", errors="surrogatepass")
            path = case / "events.csv"
        else:
            arrays = {}
            for j, c in enumerate(cols):
                values = [r[j] for r in rows]
                try:
                    arrays[c] = pa.array(values)
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                    arrays[c] = pa.array([None if v is None else str(v) for v in values])
            sink = io.BytesIO()
            pq.write_table(pa.table(arrays) if arrays else pa.table({"x": pa.array([], pa.int64())}), sink)
            raw = sink.getvalue()
            path = case / "events.parquet"
        path.write_bytes(raw[: int(len(raw) * cut)] if truncate else raw)
        rc, err = _prepare(case, path, "events")
        _check_outcome(rc, err, case / "out")
        outcomes["imported" if rc == 0 else "clear error"] += 1

    outcomes = {"imported": 0, "clear error": 0}
    check()
    record("fuzzed event logs (CSV, Parquet)", files=sum(outcomes.values()), **outcomes, stack_traces=0)


def test_fuzzed_text_formats_get_a_clear_error_or_counted_drops(tmp_path):
    """seqtxt and MovieLens files of arbitrary lines (unicode, separators in the wrong places,
    huge numbers, empty): a clear error or an import with drops counted."""
    from hypothesis import given
    from hypothesis import strategies as st

    token = st.one_of(st.integers(-5, 10**20).map(str), st.text(max_size=8), st.sampled_from(["1", "2", "3", "::", "\t", ","]))
    line = st.lists(token, max_size=8)
    counter = [0]

    @_fuzz_settings()
    @given(st.lists(line, max_size=30), st.sampled_from([("seqtxt", "seq.txt", " "), ("movielens", "u.data", "\t"),
                                                        ("movielens", "ratings.dat", "::"), ("movielens", "ratings.csv", ",")]))
    def check(lines, fmt) -> None:
        counter[0] += 1
        case = tmp_path / f"case{counter[0]}"
        case.mkdir()
        kind, name, sep = fmt
        text = "\n".join(sep.join(parts) for parts in lines)
        if name == "ratings.csv":
            text = "userId,movieId,rating,timestamp\n" + text
        path = case / name
        path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
        rc, err = _prepare(case, path, kind)
        _check_outcome(rc, err, case / "out")
        outcomes["imported" if rc == 0 else "clear error"] += 1

    outcomes = {"imported": 0, "clear error": 0}
    check()
    record("fuzzed seqtxt and MovieLens files", files=sum(outcomes.values()), **outcomes, stack_traces=0)


def test_fuzzed_mostly_valid_logs_import_with_bad_rows_counted(tmp_path):
    """Logs with every required column and a few users, where any value may be bad (nulls,
    empty or huge ids, unicode, junk or out-of-range timestamps, unknown events): the import
    succeeds whenever some user keeps 3 clicks, and every row is either kept or counted as dropped."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from hypothesis import given
    from hypothesis import strategies as st

    from ray_rec.data.manifest import read_manifest

    bad = st.one_of(st.none(), st.just(""), st.text(max_size=6), st.integers(2**62, 2**63 - 1).map(str))
    def mostly(valid):  # one_of picks its branches evenly: 4 in 5 values are good
        return st.one_of(valid, valid, valid, valid, bad)

    row = st.tuples(
        mostly(st.sampled_from(["u1", "u2", "ü3"])),
        mostly(st.sampled_from(["i1", "i2", "i3", "i4"])),
        mostly(st.integers(1_600_000_000, 1_700_000_000).map(str)),
        mostly(st.sampled_from(["click", "click", "browse"])),
    )
    counter = [0]

    @_fuzz_settings()
    @given(st.lists(row, min_size=8, max_size=40))
    def check(rows) -> None:
        counter[0] += 1
        case = tmp_path / f"case{counter[0]}"
        case.mkdir()
        # hypothesis shrinks toward equal rows; spread the good timestamps so rows are not all duplicates
        rows = [(u, i, str(int(t) + k * 60) if t and t.isdigit() and len(t) == 10 else t, e) for k, (u, i, t, e) in enumerate(rows)]
        cols = list(zip(*rows))
        table = pa.table({name: pa.array(list(values), pa.string()) for name, values in
                          zip(("user_id", "item_id", "timestamp", "event"), cols)})
        pq.write_table(table, case / "events.parquet")
        rc, err = _prepare(case, case / "events.parquet", "events")
        _check_outcome(rc, err, case / "out")
        if rc == 0:
            m = read_manifest(str(case / "out"))
            assert m.counts.rows_read == len(rows)
            dropped_rows = sum(v for k, v in m.dropped.items() if k != "short_users")  # that one counts users
            assert m.counts.events + dropped_rows == len(rows), m
        outcomes["imported" if rc == 0 else "clear error"] += 1

    outcomes = {"imported": 0, "clear error": 0}
    check()
    assert outcomes["imported"] > 0, "the generator never produced an importable log"
    record("fuzzed mostly-valid event logs", files=sum(outcomes.values()), **outcomes, stack_traces=0)


def test_the_s3_filesystem_keeps_its_retries_through_a_pickle(monkeypatch):
    """Ray Train ships the storage filesystem to its controller and workers pickled; pyarrow's
    own pickle would drop the retry strategy and leave them with 3 attempts."""
    import pickle

    from ray import cloudpickle

    from ray_rec.storage import s3_filesystem

    monkeypatch.setenv("RAY_REC_S3_RETRIES", "7")
    fs = s3_filesystem()
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        copy = loads(dumps(fs))
        assert copy.attempts == 7 and copy == fs
