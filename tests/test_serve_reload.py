"""Hot reload the way operators do it: `serve deploy` a config whose user_config.model_uri changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml

from ray_rec import load_model
from ray_rec.model.artifact import save_model

from .conftest import free_port

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).parent / "serve"


def deploy(tmp_path: Path, port: int, model_uri: str, reload_uri: str) -> None:
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "reload",
            "route_prefix": "/",
            "import_path": "ray_rec.serve.app:build_app",
            "args": {"model_uri": model_uri},
            "deployments": [{"name": "RecommenderService", "user_config": {"model_uri": reload_uri}}],
        }],
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([str(RAY), "deploy", str(path), "-a", "http://127.0.0.1:8265"], capture_output=True, text=True,
                         env={**os.environ, "RAY_AUTH_TOKEN_PATH": str(Path.home() / ".ray" / "auth_token")}, timeout=120)
    assert out.returncode == 0, out.stderr


def wait_for(url: str, check, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = requests.get(url + "/v1/model", timeout=5)
            if r.status_code == 200 and check(r.json()):
                return r.json()
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not reach the expected state in {timeout} s")


def test_reload_swaps_the_version_without_failed_requests_and_rejects_bad_artifacts(trained, ray_cluster, s3, tmp_path):
    from ray import serve

    serve.shutdown()  # apps deployed from Python would be replaced by the declarative deploy
    old = load_model(trained.model_uri)
    with torch.no_grad():
        old.model.features.item.weight.mul_(1.5)
    new_uri = s3.uri("models/reloaded")
    new_version = save_model(old.model, old.vocab, new_uri)
    oversized, nan_weights = s3.uri("models/oversized"), s3.uri("models/nan")
    save_model(old.model, old.vocab, oversized)
    key = oversized.split("/", 3)[3] + "/config.json"
    meta = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    meta["model"].update(num_items=3_000_000, dim=1024)
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=json.dumps(meta).encode())
    broken = load_model(new_uri)
    with torch.no_grad():
        broken.model.features.item.weight[1, 0] = float("nan")
    save_model(broken.model, broken.vocab, nan_weights)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    deploy(tmp_path, port, trained.model_uri, trained.model_uri)
    wait_for(url, lambda m: m["model_version"] != new_version)

    codes: list[object] = []
    versions: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            try:
                r = requests.post(url + "/v1/recommend", json={"history": ["i1", "i2"], "k": 3}, timeout=30)
                codes.append(r.status_code)
                versions.append(r.json().get("model_version"))
            except requests.RequestException as exc:
                codes.append(repr(exc))

    worker = threading.Thread(target=stream)
    worker.start()
    try:
        time.sleep(1.0)
        deploy(tmp_path, port, trained.model_uri, new_uri)
        wait_for(url, lambda m: m["model_version"] == new_version)
        time.sleep(1.0)
        deploy(tmp_path, port, trained.model_uri, s3.uri("models/does-not-exist"))
        info = wait_for(url, lambda m: m["last_reload_error"] is not None)
        # Tampered artifacts: a config that asks for ~12 GB, and weights that answer NaN.
        for uri, reason in ((oversized, "budget"), (nan_weights, "NaN")):
            deploy(tmp_path, port, trained.model_uri, uri)
            refused = wait_for(url, lambda m, uri=uri: uri in (m["last_reload_error"] or ""))
            assert reason in refused["last_reload_error"] and refused["model_version"] == new_version
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join()
        serve.delete("reload")
    assert codes and set(codes) == {200}, sorted(set(map(str, codes)))
    assert versions[0] != new_version and versions[-1] == new_version
    assert info["model_version"] == new_version and "does-not-exist" in info["last_reload_error"]
