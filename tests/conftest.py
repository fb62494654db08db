"""Shared fixtures: one loopback S3-protocol server and one local Ray per test session.

Order matters: the S3 settings go into the environment before Ray starts, so every Ray worker
process inherits them (set later, reads happened to work and writes failed).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from ray_rec.data.synthetic import SyntheticSpec, generate

# Serve runs behind the HAProxy ingress, as `ray-rec serve` runs it; set before any test module
# imports Ray Serve (which reads the variables once) and before the session's Ray starts. (A GPU
# machine without Ray runs tests/test_device.py alone.)
if importlib.util.find_spec("ray") is not None:
    from ray_rec.ray_session import use_fast_ingress

    use_fast_ingress()

BUCKET = "ray-rec-test"
API_KEY_ENV = "RAY_REC_TEST_API_KEY"
API_KEY = "test-key-5f2c"
# Distinctive credentials, so a test can grep logs and outputs for them (see test_reliability).
ACCESS_KEY_ID = "AKIARAYRECTEST7Q3Z"
SECRET_KEY = "rr-secret-4f1d9c07b2e8a6"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The test Redis's URL and password reach Serve replicas only through the environment the session's
# Ray starts with (as in production, where they come from a Secret), so its port is chosen here.
REDIS_URL_ENV, REDIS_PASSWORD_ENV, REDIS_PASSWORD = "RAY_REC_TEST_REDIS_URL", "RAY_REC_TEST_REDIS_PASSWORD", "rr-redis-8d41e0"
REDIS_PORT = free_port()
os.environ[REDIS_URL_ENV] = f"redis://127.0.0.1:{REDIS_PORT}/0"
os.environ[REDIS_PASSWORD_ENV] = REDIS_PASSWORD


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real redis-server on loopback (password on, append-only with fsync always)."""
    from bench.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"), REDIS_PASSWORD, REDIS_PORT)
    server.start()
    yield server
    server.kill()


@dataclass
class S3:
    endpoint: str
    bucket: str
    client: object
    server: object = None

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def stop(self) -> None:
        """Take the endpoint away (connections refused); the stored objects survive in moto."""
        self.server.stop()  # type: ignore[attr-defined]
        self.server._server.server_close()  # type: ignore[attr-defined]  # stop() leaves the socket listening

    def restart(self) -> None:
        """Bring the endpoint back on the same port."""
        from moto.server import ThreadedMotoServer

        port = int(self.endpoint.rsplit(":", 1)[1])
        for _ in range(50):  # start() would wait forever if the port could not be bound
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    time.sleep(0.2)
                    continue
            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            self.server.start()  # type: ignore[attr-defined]
            return
        raise RuntimeError(f"cannot restart the S3 server on port {port}")


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            API_KEY_ENV: API_KEY,
        }
    )
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    handle = S3(endpoint, BUCKET, client, server)
    yield handle
    handle.server.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def ray_cluster(s3: S3) -> Iterator[None]:
    import ray

    from ray_rec.ray_session import SERVING_WORKERS, worker_env

    if ray.is_initialized():  # a CLI test may have started one in this process
        ray.shutdown()
    # The Serve tests deploy on this Ray: its workers run at normal priority, as `ray-rec serve`'s do.
    ray.init(address="local", num_cpus=6, logging_level="WARNING", runtime_env={"env_vars": worker_env()},
             _system_config=SERVING_WORKERS)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


TINY = SyntheticSpec(users=240, items=60, topics=6, min_clicks=6, max_clicks=14, seed=3)


@pytest.fixture(scope="session")
def tiny_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic click-and-browse log (events.parquet) with items.csv."""
    folder = tmp_path_factory.mktemp("logs")
    log, catalog = generate(TINY)
    pq.write_table(log, folder / "events.parquet")
    pacsv.write_csv(catalog, folder / "items.csv")
    return folder


@pytest.fixture(scope="session")
def tiny_data(tiny_logs: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny log prepared into a local dataset folder."""
    from ray_rec.data.prepare import PrepareOptions, prepare

    out = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare(PrepareOptions(input=str(tiny_logs / "events.parquet"), output=out, items=str(tiny_logs / "items.csv"), num_shards=2))
    return out


@pytest.fixture(scope="session")
def s3_data(tiny_logs: Path, s3: S3) -> str:
    """The tiny log uploaded to S3 and prepared there."""
    from ray_rec.data.prepare import PrepareOptions, prepare

    s3.client.upload_file(str(tiny_logs / "events.parquet"), s3.bucket, "raw/events.parquet")
    s3.client.upload_file(str(tiny_logs / "items.csv"), s3.bucket, "raw/items.csv")
    out = s3.uri("datasets/tiny")
    prepare(PrepareOptions(input=s3.uri("raw/events.parquet"), output=out, items=s3.uri("raw/items.csv"), num_shards=2))
    return out


@pytest.fixture(scope="session")
def trained(ray_cluster: None, s3_data: str, s3: S3):
    """A 2-worker training run on the S3 dataset, output in S3 (shared by train and serve tests)."""
    from ray_rec.config import load_config
    from ray_rec.train.trainer import train

    config = load_config(None, {"model.dim": 16, "train.epochs": 3, "train.batch_size": 64})
    return train(s3_data, s3.uri("runs/main"), config, workers=2)


class Payload:
    """Unpickling this runs code: the attack a pickle-based checkpoint would allow."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tiny_artifact(folder: Path) -> str:
    import numpy as np

    from ray_rec.config import ModelConfig
    from ray_rec.model.artifact import save_model
    from ray_rec.model.interest_model import InterestModel
    from ray_rec.vocab import Vocabulary

    model = InterestModel(ModelConfig(num_items=20, dim=8, max_len=5, heads=1)).eval()
    vocab = Vocabulary(ids=[f"i{i}" for i in range(1, 21)], counts=np.ones(20, dtype=np.int64), side_values={},
                       side_table=np.zeros((20, 0), dtype=np.int64))
    save_model(model, vocab, str(folder))
    return str(folder)


class MlflowServer:
    """A real MLflow tracking server on loopback (SQLite store, proxied artifacts) that a test can
    stop and start again on the same store."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        import requests

        command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
                   "--artifacts-destination", str(self.folder / "artifacts"), "--workers", "1"]
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 (the server writes to it until stopped)
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(self.uri + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.5)
        raise RuntimeError(f"MLflow server did not start: {(self.folder / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        """Kill the server and everything it started (its connections are refused from then on)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


def make_manifest(users: int = 10, items: int = 5, clicks: int = 30, files: dict | None = None, has_browse: bool = False,
                  protocol: str = "leave_one_out"):
    """A data set's manifest for unit tests that need one without preparing a data set."""
    from ray_rec.data.manifest import DataCounts, Manifest, SplitFacts

    return Manifest(counts=DataCounts(users=users, items=items, events=clicks, clicks=clicks, rows_read=clicks),
                    split=SplitFacts(protocol=protocol, cutoff=0 if protocol == "time" else None, min_clicks=3),
                    files=files or {}, side_features={}, has_time=False, has_browse=has_browse, num_shards=1, id_type="str")


RECORDS_ENV = "RAY_REC_RELIABILITY_RECORDS"


def record(name: str, **figures: object) -> None:
    """Add a reliability test's figures to the file ``RAY_REC_RELIABILITY_RECORDS`` names (one JSON line
    each); nothing without it."""
    target = os.environ.get(RECORDS_ENV)
    if target:
        with open(target, "a") as f:
            f.write(json.dumps({"name": name, **figures, "recorded": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
