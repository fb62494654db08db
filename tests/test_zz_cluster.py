"""The paths that only differ on a cluster, on a local multi-node cluster (`ray_rec.local_cluster`:
Ray's fake multi-node autoscaler starts and removes real worker nodes on this machine) with token
authentication on and the data on the loopback S3 server. The scenarios are `bench.cluster`'s.

Named to run last: it shuts the session's Ray down first (two clusters on two cores starve each
other). It stops only the processes of the cluster it started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from bench.cluster import S3_VARIABLES, JobsResult, NodeWatch, run_jobs, run_with_node_loss, serve_autoscaling
from ray_rec import load_model, local_cluster, storage
from ray_rec.model.artifact import REQUIRED_FILES
from ray_rec.train.checkpoint import STATE_FILES, newest_complete_checkpoint

from .conftest import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
# One setting for both trainings, so the run that loses a node can be compared with the one that did not.
TRAIN = ("--set", "model.dim=16", "--set", "train.epochs=6", "--no-final-fit")


@pytest.fixture(scope="module")
def cluster(s3, tiny_logs, tmp_path_factory):
    import ray

    ray.shutdown()
    started = local_cluster.start(tmp_path_factory.mktemp("cluster"), idle_timeout_minutes=0.25,
                                  env={k: os.environ[k] for k in S3_VARIABLES})
    s3.client.upload_file(str(tiny_logs / "events.parquet"), s3.bucket, "cluster/raw/events.parquet")
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def jobs(cluster, s3) -> JobsResult:
    # The scale-down to the head alone is checked once every test has used the nodes (the last test).
    return run_jobs(cluster, s3.uri("cluster/raw/events.parquet"), s3.uri("cluster/jobs"), TRAIN, idle_wait_s=None)


def epochs_run(output: str) -> int:
    """The last epoch a training run in ``output`` finished (its metrics file: a line an epoch)."""
    lines = storage.read_bytes(storage.join(output, "metrics.jsonl")).decode().splitlines()
    return max(json.loads(line)["epoch"] for line in lines)


def test_jobs_run_on_worker_nodes_that_the_autoscaler_starts_and_removes(jobs, s3):
    base = s3.uri("cluster/jobs")
    assert json.loads(storage.read_bytes(base + "/data/manifest.json"))["counts"]["users"] == 240
    model = load_model(base + "/run/model")
    assert model.config.dim == 16 and epochs_run(base + "/run") == 6
    placements = model.info["training"]["placements"]
    assert len(placements) == 1 and len(set(placements[0])) == 2, placements  # two workers, two nodes
    assert "NDCG@10" in jobs.outputs["evaluate"]
    assert json.loads(storage.read_bytes(base + "/run/eval_test.json"))["full_ranking"]["count"] == 240
    assert [f for f in storage.list_files(base + "/recs") if f.endswith(".parquet")]
    # From the head alone up to both training nodes and a CPU node (the way back: the last test).
    assert jobs.nodes_over_time[0][1] == 0 and jobs.first_node_s is not None, jobs.nodes_over_time
    assert jobs.most_nodes["train_worker"] == 2 and jobs.most_nodes["cpu_worker"] >= 1, jobs.most_nodes


def test_a_lost_node_is_replaced_and_the_run_resumes_from_its_last_checkpoint(cluster, jobs, s3):
    """A whole training node (raylet, agents, workers) killed after the first checkpoint: the
    autoscaler replaces it, the run resumes from S3 on the new node and finishes every epoch."""
    data, run = s3.uri("cluster/jobs/data"), s3.uri("cluster/lost-node")
    lost = run_with_node_loss(cluster, data, run, TRAIN,
                              lambda: newest_complete_checkpoint(storage.join(run, "run")) is not None)
    assert lost.killed_processes >= 3 and lost.recovery_s is not None, lost
    training = load_model(run + "/model").info["training"]
    assert epochs_run(run) == 6 and training["resumes"] >= 1, training
    first, last = training["placements"][0], training["placements"][-1]
    assert lost.killed_node in first and lost.killed_node not in last and len(set(last)) == 2, training["placements"]
    # The same run without the fault: the resumed epochs replay the same data order from the same state.
    unfaulted = load_model(s3.uri("cluster/jobs/run/model")).info["training"]
    assert abs(training["best"] - unfaulted["best"]) <= 0.03, (training["best"], unfaulted["best"])
    # Nothing half-written: no staging folder, and every checkpoint holds every file.
    files = storage.list_files(run)
    assert not [f for f in files if "staging" in f or f.endswith(".tmp")], files
    folders = {f.split("/")[1] for f in files if f.startswith("run/checkpoint_") and f.count("/") == 2}
    assert folders
    for folder in folders:
        names = {f.rpartition("/")[2] for f in files if f.startswith(f"run/{folder}/")}
        assert {*REQUIRED_FILES, *STATE_FILES} <= names, (folder, names)


def test_serve_scales_replicas_onto_new_nodes_and_back_without_failing_a_request(cluster, jobs, s3):
    scaled = serve_autoscaling(cluster, s3.uri("cluster/jobs/run/model"), free_port())
    assert scaled.failed == 0 and scaled.requests > 100, (scaled.failed, scaled.requests, scaled.errors)
    assert scaled.most_replicas == 3 and scaled.scale_up_s and scaled.scale_down_s is not None, scaled
    assert max(n for _, n in scaled.nodes_over_time) >= 3, scaled.nodes_over_time  # a replica per CPU node


def test_a_node_joins_with_cluster_yaml_start_commands_and_clients_need_the_token(cluster, tmp_path):
    """`cluster.yaml`'s worker start command, verbatim but for the head's address, on a machine
    whose ``~/.ray/auth_token`` is where `cluster.yaml`'s file_mounts put it."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    stop, start = config["worker_start_ray_commands"]
    assert stop == "ray stop"  # not run here: it stops every Ray on the machine
    assert config["file_mounts"]["~/.ray/auth_token"]
    command = start.replace("$RAY_HEAD_IP:6379", cluster.gcs_address)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}

    def machine(name: str, token: bool) -> dict[str, str]:
        home = tmp_path / name
        (home / ".ray").mkdir(parents=True)
        if token:
            shutil.copy(cluster.token_path, home / ".ray" / "auth_token")
            (home / ".ray" / "auth_token").chmod(0o600)
        return {**clean, "HOME": str(home), "PATH": f"{BIN}:{clean['PATH']}"}

    refused = subprocess.run(["bash", "-c", command], env=machine("no-token", False), capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()
    before = {n["node_id"] for n in cluster.worker_nodes()}
    home = machine("worker", True)
    try:
        joined = subprocess.run(["bash", "-c", command], env=home, capture_output=True, text=True, timeout=120)
        assert joined.returncode == 0, joined.stdout[-2000:] + joined.stderr[-2000:]
        deadline = time.monotonic() + 60
        while not {n["node_id"] for n in cluster.worker_nodes()} - before:
            assert time.monotonic() < deadline, "the node never joined"
            time.sleep(1)
    finally:
        local_cluster.stop(Path(home["HOME"]))  # its processes carry that HOME
    # The job API: refused without the token, answered with it.
    assert requests.get(f"{cluster.address}/api/jobs/", timeout=10).status_code == 401
    token = cluster.token_path.read_text().strip()
    assert requests.get(f"{cluster.address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=10).ok
    listed = subprocess.run([str(BIN / "ray"), "job", "list", "--address", cluster.address], env=clean,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode != 0


def test_a_node_lost_mid_import_on_the_ray_engine_still_gives_the_same_data_set(cluster, jobs, s3, tmp_path):
    """`prepare --engine ray` as a job on 8 files in S3; once the first read is back, a whole worker
    node that ran its tasks (not the driver's) is killed: Ray reruns them, and the data set equals
    the local engine's, committed once, with no staging left."""
    import pyarrow.parquet as pq

    from bench.cluster import job_logs, job_status, kill_node, submit
    from ray_rec.data.manifest import read_manifest
    from ray_rec.data.prepare import PrepareOptions, prepare
    from ray_rec.data.synthetic import bulk_log

    raw = tmp_path / "raw"
    raw.mkdir()
    for i, chunk in enumerate(bulk_log(1_600_000, chunk_events=200_000, seed=5)):
        pq.write_table(chunk, raw / f"part-{i}.parquet")
        s3.client.upload_file(str(raw / f"part-{i}.parquet"), s3.bucket, f"cluster/big/part-{i}.parquet")
    local = prepare(PrepareOptions(input=str(raw), output=str(tmp_path / "local"), num_shards=4, engine="local"))
    out = s3.uri("cluster/big-data")
    # The driver takes a whole CPU node (2 CPUs), so every task runs on other nodes: there is one to lose.
    submitted = submit(cluster, "jobs/prepare.py", "--input", s3.uri("cluster/big"), "--output", out, "--engine", "ray",
                       "--num-shards", "4", entrypoint_cpus=2, wait=False)
    job_id = next(line.split("'")[1] for line in submitted.stdout.splitlines() if "submitted successfully" in line)
    deadline = time.monotonic() + 600
    while "read 1/8 files" not in job_logs(cluster, job_id):
        assert job_status(cluster, job_id) not in ("FAILED", "STOPPED", "SUCCEEDED"), job_logs(cluster, job_id)[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    driver = cluster.api(f"/api/jobs/{job_id}").get("driver_node_id")
    victim = next(n["node_id"] for n in cluster.worker_nodes() if n["node_id"] != driver)
    assert kill_node(victim) >= 3
    while (status := job_status(cluster, job_id)) not in ("FAILED", "STOPPED", "SUCCEEDED"):
        assert time.monotonic() < deadline, "the import did not end"
        time.sleep(1)
    assert status == "SUCCEEDED", job_logs(cluster, job_id)[-4000:]
    made = read_manifest(out)
    assert made.counts == local.counts and made.dropped == local.dropped and made.files == local.files
    assert not [f for f in storage.list_files(out) if f.startswith("_staging")]


def test_zz_idle_worker_nodes_are_removed_once_the_work_is_done(cluster, jobs):
    """After the jobs, the lost node's run and the Serve app (deleted by its test): the head alone
    again within the idle timeout (15 s here) and the autoscaler's reaction time."""
    watch = NodeWatch(cluster)
    try:
        watch.wait_for(lambda n: n == 0, 180)
    finally:
        watch.stop()
