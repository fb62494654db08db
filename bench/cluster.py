"""The paths that only differ on a cluster, timed on a local multi-node cluster
(`ray_rec.local_cluster`: the autoscaler starts and removes real worker nodes on this machine) with
the data on a loopback S3 server:

- ``ray job submit`` of prepare -> train (2 workers, each on its own training node) -> evaluate ->
  batch-score: each job's wall time, and seconds from the first submit to the autoscaler's first
  new node, and from the last job's end to a cluster of the head alone;
- node loss: a whole training node (its raylet and every process on it) killed mid-run; seconds
  from the kill to the run's resumption on a replacement node, and the run's final metrics;
- Serve autoscaling: ``serve deploy`` with an ``autoscaling_config``, a load until every replica
  runs, seconds to scale up and back down, and the requests that failed (none should).

`tests/test_zz_cluster.py` runs the same scenarios and asserts on them.

    python -m bench.cluster [--users 240] [--epochs 6]    # writes bench/results/cluster.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_rec.local_cluster import TRAIN_SLOT, LocalCluster, LocalClusterError, processes_with

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
S3_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
# Each training worker on a node of the training type (the stand-in for cluster.yaml's GPU type).
TRAIN_WORKERS = ("--workers", "2", "--resources-per-worker", json.dumps({"CPU": 1, TRAIN_SLOT: 1}))


class NodeWatch:
    """Samples the cluster's worker nodes by type every ``every`` seconds in a thread."""

    def __init__(self, cluster: LocalCluster, every: float = 1.0) -> None:
        self.cluster, self.every = cluster, every
        self.started = time.monotonic()
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                nodes = self.cluster.worker_nodes()
            except LocalClusterError:  # a missed sample: the next one counts
                nodes = None
            if nodes is not None:
                counts: dict[str, int] = {}
                for n in nodes:
                    counts[n["type"]] = counts.get(n["type"], 0) + 1
                self.samples.append((time.monotonic(), counts))
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def total(self, counts: dict[str, int], kind: str | None = None) -> int:
        return counts.get(kind, 0) if kind else sum(counts.values())

    def first(self, predicate: Callable[[int], bool], after: float = 0.0, kind: str | None = None) -> float | None:
        """The first sample time (monotonic) at or after ``after`` whose node count satisfies ``predicate``."""
        return next((t for t, c in list(self.samples) if t >= after and predicate(self.total(c, kind))), None)

    def most(self, kind: str | None = None) -> int:
        return max((self.total(c, kind) for _, c in list(self.samples)), default=0)

    def series(self) -> list[tuple[float, int]]:
        """(seconds since the watch began, worker nodes) at every change."""
        out: list[tuple[float, int]] = []
        for t, c in list(self.samples):
            if not out or out[-1][1] != self.total(c):
                out.append((round(t - self.started, 1), self.total(c)))
        return out

    def wait_for(self, predicate: Callable[[int], bool], timeout_s: float, kind: str | None = None) -> float:
        """Block until a sample satisfies ``predicate``; its time.

        Raises:
            TimeoutError: none did within ``timeout_s``.
        """
        since, deadline = time.monotonic(), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hit = self.first(predicate, since, kind)
            if hit is not None:
                return hit
            time.sleep(0.5)
        raise TimeoutError(f"the cluster's worker nodes never met the condition in {timeout_s:.0f} s: {self.series()[-5:]}")


def s3_runtime_env() -> dict[str, Any]:
    """The job's runtime env: where the loopback S3 server is (tests only: credentials in a runtime
    env end up in Ray's logs; a real cluster's nodes have an instance role)."""
    return {"env_vars": {k: os.environ[k] for k in S3_VARIABLES if k in os.environ}}


def submit(cluster: LocalCluster, *job: str, entrypoint_cpus: float = 0, wait: bool = True,
           timeout_s: float = 900) -> subprocess.CompletedProcess:
    """``ray job submit`` of ``python JOB...`` from the repository, as a user submits it.

    Raises:
        RuntimeError: the submission or (with ``wait``) the job failed.
    """
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster.address, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(s3_runtime_env()), f"--entrypoint-num-cpus={entrypoint_cpus}"]
    if not wait:
        cmd.append("--no-wait")
    for _ in range(12):
        out = subprocess.run([*cmd, "--", sys.executable, *job], capture_output=True, text=True,
                             env=cluster.client_env(), timeout=timeout_s, cwd=ROOT)
        # A head that has just started may not have its job agent yet ("try again later").
        if out.returncode == 0 or "No available agent" not in out.stderr:
            break
        time.sleep(5)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(job)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-2000:]}")
    return out


@dataclass
class JobsResult:
    seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    first_node_s: float | None = None  # first submit -> the autoscaler's first worker node
    back_to_head_s: float | None = None  # the last job's end -> no worker node left
    most_nodes: dict[str, int] = field(default_factory=dict)
    nodes_over_time: list[tuple[float, int]] = field(default_factory=list)


def run_jobs(cluster: LocalCluster, raw: str, base: str, train_args: tuple[str, ...] = (),
             idle_wait_s: float | None = 180) -> JobsResult:
    """prepare -> train -> evaluate -> batch-score as four ``ray job submit`` s on ``cluster``, from
    a cluster of the head alone; then (unless ``idle_wait_s`` is None) wait up to ``idle_wait_s``
    for it to be the head alone again."""
    watch = NodeWatch(cluster)
    result = JobsResult()
    data, run = f"{base}/data", f"{base}/run"
    jobs = {
        # Preparation, evaluation and batch scoring run their driver on a CPU node (one CPU for the
        # entry point keeps it off the head), training's driver only coordinates: on the head.
        "prepare": (1, ["jobs/prepare.py", "--input", raw, "--format", "events", "--output", data, "--num-shards", "2"]),
        "train": (0, ["jobs/train.py", "--data", data, "--output", run, *TRAIN_WORKERS, *train_args]),
        "evaluate": (1, ["jobs/evaluate.py", "--data", data, "--model", run + "/model", "--output", run]),
        "batch_score": (1, ["jobs/batch_score.py", "--data", data, "--model", run + "/model", "--output", base + "/recs"]),
    }
    try:
        began = time.monotonic()
        for name, (cpus, args) in jobs.items():
            t = time.monotonic()
            result.outputs[name] = submit(cluster, *args, entrypoint_cpus=cpus).stdout
            result.seconds[name] = round(time.monotonic() - t, 1)
        ended = time.monotonic()
        first = watch.first(lambda n: n > 0, began)
        result.first_node_s = None if first is None else round(first - began, 1)
        if idle_wait_s is not None:
            result.back_to_head_s = round(watch.wait_for(lambda n: n == 0, idle_wait_s) - ended, 1)
    finally:
        watch.stop()
    result.most_nodes = {kind: watch.most(kind) for kind in ("cpu_worker", "train_worker")}
    result.nodes_over_time = watch.series()
    return result


def kill_node(node_id: str) -> int:
    """SIGKILL every process of a node at once, as a machine that dies; how many there were. The
    fake provider starts a node's raylet and agents with its id in the environment, and every
    worker process inherits it."""
    pids = processes_with(f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def job_logs(cluster: LocalCluster, job_id: str) -> str:
    return str(cluster.api(f"/api/jobs/{job_id}/logs")["logs"])


def job_status(cluster: LocalCluster, job_id: str) -> str:
    return str(cluster.api(f"/api/jobs/{job_id}")["status"])


@dataclass
class NodeLossResult:
    killed_node: str = ""
    killed_processes: int = 0
    recovery_s: float | None = None  # kill -> the run's "resumed from the checkpoint" line
    seconds: float = 0.0
    logs: str = ""


def run_with_node_loss(cluster: LocalCluster, data: str, run: str, train_args: tuple[str, ...],
                       checkpoint_seen: Callable[[], bool], timeout_s: float = 900) -> NodeLossResult:
    """Train as a job; once ``checkpoint_seen()`` (the first checkpoint is on S3), kill a whole
    training node mid-epoch; wait for the job to end."""
    result = NodeLossResult()
    began = time.monotonic()
    out = submit(cluster, "jobs/train.py", "--data", data, "--output", run, *TRAIN_WORKERS, *train_args, wait=False)
    job_id = next(line.split("'")[1] for line in out.stdout.splitlines() if "submitted successfully" in line)
    deadline = began + timeout_s
    while not checkpoint_seen():
        if job_status(cluster, job_id) in ("FAILED", "STOPPED", "SUCCEEDED") or time.monotonic() > deadline:
            raise RuntimeError(f"the run ended before its first checkpoint:\n{job_logs(cluster, job_id)[-4000:]}")
        time.sleep(0.5)
    victim = next(n for n in cluster.worker_nodes() if n["type"] == "train_worker")
    resumed_before = job_logs(cluster, job_id).count("resumed from the checkpoint")
    killed_at = time.monotonic()
    result.killed_node, result.killed_processes = victim["node_id"], kill_node(victim["node_id"])
    while (status := job_status(cluster, job_id)) not in ("FAILED", "STOPPED", "SUCCEEDED"):
        if result.recovery_s is None and job_logs(cluster, job_id).count("resumed from the checkpoint") > resumed_before:
            result.recovery_s = round(time.monotonic() - killed_at, 1)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the run did not end within {timeout_s:.0f} s")
        time.sleep(1)
    result.seconds = round(time.monotonic() - began, 1)
    result.logs = job_logs(cluster, job_id)
    if status != "SUCCEEDED":
        raise RuntimeError(f"the run with a lost node ended {status}:\n{result.logs[-4000:]}")
    return result


@dataclass
class ServeScaleResult:
    requests: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    most_replicas: int = 0
    scale_up_s: float | None = None  # load start -> the most replicas running
    scale_down_s: float | None = None  # load end -> one replica again
    nodes_over_time: list[tuple[float, int]] = field(default_factory=list)


def serve_config(model_uri: str, port: int, max_replicas: int = 3) -> dict[str, Any]:
    """serve_configs/production.yaml's shape for the local cluster: Serve's own ``deployments:``
    fields, a replica per CPU node (``num_cpus: 2``), quick autoscaling decisions. One HAProxy, on
    the head (``HeadOnly``): the local cluster's nodes share one address, where a proxy per node
    would each want the same port."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": 30},
        "applications": [{
            "name": "ray_rec", "route_prefix": "/", "import_path": "ray_rec.serve.app:build_app",
            "runtime_env": s3_runtime_env(),
            "args": {"model_uri": model_uri, "max_batch_size": 16},
            "deployments": [{
                "name": "RecommenderService",
                "autoscaling_config": {"min_replicas": 1, "max_replicas": max_replicas, "target_ongoing_requests": 2,
                                       "upscale_delay_s": 2, "downscale_delay_s": 10},
                "ray_actor_options": {"num_cpus": 2},
            }],
        }],
    }


def running_replicas(cluster: LocalCluster) -> int:
    """RUNNING replicas of the app's deployment (Serve's REST API on the dashboard)."""
    apps = cluster.api("/api/serve/applications/").get("applications", {})
    deployment = apps.get("ray_rec", {}).get("deployments", {}).get("RecommenderService", {})
    return sum(1 for r in deployment.get("replicas", []) if r.get("state") == "RUNNING")


def serve_autoscaling(cluster: LocalCluster, model_uri: str, port: int, max_replicas: int = 3,
                      concurrency: int = 12, timeout_s: float = 300) -> ServeScaleResult:
    """``serve deploy`` with autoscaling; a bounded load (``concurrency`` clients) until the
    deployment runs ``max_replicas`` replicas, then a trickle (one request at a time) until it is
    back to one; then the app is deleted. Every request's outcome counts."""
    result = ServeScaleResult()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "serve.yaml"
        path.write_text(yaml.safe_dump(serve_config(model_uri, port, max_replicas)))
        serve_cli(cluster, "deploy", str(path))
    url, body = f"http://127.0.0.1:{port}/v1/recommend", json.dumps({"history": ["i1", "i2", "i3"], "k": 5}).encode()
    deadline = time.monotonic() + timeout_s
    while running_replicas(cluster) < 1 or _post(url, body) != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("the deployed app never answered")
        time.sleep(1)
    watch = NodeWatch(cluster)
    lock = threading.Lock()
    width = [concurrency]  # clients sending now: all of them, then one, then none

    def client(slot: int) -> None:
        while width[0] > 0 and time.monotonic() < deadline + 60:
            if slot >= width[0]:
                time.sleep(0.1)
                continue
            status = _post(url, body)
            with lock:
                result.requests += 1
                if status != 200:
                    result.failed += 1
                    if len(result.errors) < 10:
                        result.errors.append(str(status))

    try:
        started = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            for slot in range(concurrency):
                pool.submit(client, slot)
            while (n := running_replicas(cluster)) < max_replicas:
                result.most_replicas = max(result.most_replicas, n)
                if time.monotonic() > deadline:
                    width[0] = 0
                    raise TimeoutError(f"the deployment never reached {max_replicas} replicas (at most {result.most_replicas})")
                time.sleep(1)
            result.most_replicas, result.scale_up_s = n, round(time.monotonic() - started, 1)
            width[0] = 1  # the trickle: requests keep coming while replicas drain and stop
            load_end = time.monotonic()
            while running_replicas(cluster) > 1:
                if time.monotonic() > deadline:
                    width[0] = 0
                    raise TimeoutError("the deployment never scaled back down to one replica")
                time.sleep(1)
            result.scale_down_s = round(time.monotonic() - load_end, 1)
            time.sleep(3)  # requests sent while the last replica stopped
            width[0] = 0
    finally:
        watch.stop()
        serve_cli(cluster, "shutdown", "-y")
    result.nodes_over_time = watch.series()
    return result


def serve_cli(cluster: LocalCluster, *args: str) -> None:
    """``serve ARGS -a <cluster>`` with the cluster's token.

    Raises:
        RuntimeError: it failed.
    """
    out = subprocess.run([str(BIN / "serve"), *args, "-a", cluster.address], capture_output=True, text=True,
                         env=cluster.client_env(), timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"serve {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


def _post(url: str, body: bytes) -> int | str:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError as exc:
        return type(exc).__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=240, help="synthetic users in the click log")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    import logging

    import boto3
    import pyarrow.parquet as pq
    from moto.server import ThreadedMotoServer

    from bench.output import machine, write_result
    from ray_rec import load_model, local_cluster, storage
    from ray_rec.data.synthetic import SyntheticSpec, generate
    from ray_rec.train.checkpoint import newest_complete_checkpoint

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = local_cluster.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3").create_bucket(Bucket="bench-cluster")
    train = ("--set", "model.dim=16", "--set", f"train.epochs={args.epochs}", "--no-final-fit")
    with tempfile.TemporaryDirectory() as tmp:
        log, _ = generate(SyntheticSpec(users=args.users, items=max(60, args.users // 4), topics=6, min_clicks=6,
                                        max_clicks=14, seed=3))
        pq.write_table(log, f"{tmp}/events.parquet")
        boto3.client("s3").upload_file(f"{tmp}/events.parquet", "bench-cluster", "raw/events.parquet")
        cluster = local_cluster.start(Path(tmp) / "cluster", idle_timeout_minutes=0.25,
                                      env={k: os.environ[k] for k in S3_VARIABLES})
        try:
            jobs = run_jobs(cluster, "s3://bench-cluster/raw/events.parquet", "s3://bench-cluster/jobs", train)
            print(f"jobs: {jobs.seconds}; first node after {jobs.first_node_s} s; head alone {jobs.back_to_head_s} s "
                  "after the last job", flush=True)
            run = "s3://bench-cluster/lost-node"
            lost = run_with_node_loss(cluster, "s3://bench-cluster/jobs/data", run, train,
                                      lambda: newest_complete_checkpoint(storage.join(run, "run")) is not None)
            print(f"node loss: resumed {lost.recovery_s} s after the kill; the run took {lost.seconds} s", flush=True)
            best = {name: load_model(uri).info["training"]["best"] for name, uri in
                    (("unfaulted", "s3://bench-cluster/jobs/run/model"), ("node_lost", run + "/model"))}
            scaled = serve_autoscaling(cluster, "s3://bench-cluster/jobs/run/model", local_cluster.free_port())
            print(f"serve: up to {scaled.most_replicas} replicas in {scaled.scale_up_s} s, back to one "
                  f"{scaled.scale_down_s} s after the load; {scaled.failed} of {scaled.requests} requests failed", flush=True)
        finally:
            cluster.stop()
            server.stop()
    write_result("cluster.json", {
        "command": " ".join(["python -m bench.cluster", *sys.argv[1:]]), "machine": machine(),
        "users": args.users, "epochs": args.epochs,
        "job_seconds": jobs.seconds, "first_node_s": jobs.first_node_s, "back_to_head_s": jobs.back_to_head_s,
        "most_nodes": jobs.most_nodes, "nodes_over_time": jobs.nodes_over_time,
        "node_loss": {"recovery_s": lost.recovery_s, "run_seconds": lost.seconds, "killed_processes": lost.killed_processes},
        "serve": {"most_replicas": scaled.most_replicas, "scale_up_s": scaled.scale_up_s, "scale_down_s": scaled.scale_down_s,
                  "requests": scaled.requests, "failed": scaled.failed},
        "best_val": best,
    })


if __name__ == "__main__":
    main()
