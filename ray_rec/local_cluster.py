"""A multi-node Ray cluster on one machine, shaped like `cluster.yaml`, to try a deployment locally
and to test the paths that only differ on a cluster.

Ray's own harness: `ray start --head --autoscaling-config=...` with the fake multi-node node
provider (`RAY_FAKE_CLUSTER=1`) that Ray tests its autoscaler with, under autoscaler v2 (KubeRay's).
The autoscaler starts and
stops real worker nodes (each its own raylet, object store and worker processes) on this machine
as the load asks, exactly as it would launch machines: a head that takes no work, a CPU worker
type and a training worker type, both scaling from zero. The training type stands in for
`cluster.yaml`'s GPU type through the custom resource ``TRAIN_SLOT``: a run asks for it with
``ray-rec train --resources-per-worker '{"CPU": 1, "train_slot": 1}'`` as it asks for a GPU with
``--gpu``. Token authentication is on, with a token file of the cluster's own.

Every process the cluster starts names its folder or its Ray temp dir (`ray_temp_dir`), and `stop`
ends only those: unlike `ray stop`, it leaves any other Ray on the machine alone.

    ray-rec local-cluster up   [--folder DIR]     # prints the address and the token's path
    ray-rec local-cluster down [--folder DIR]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_rec.errors import TrainingError
from ray_rec.ray_session import FAST_INGRESS

TRAIN_SLOT = "train_slot"
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # the fake provider's id of the head
DEFAULT_FOLDER = Path.home() / ".ray_rec" / "local-cluster"
OWN_FILES = ("auth_token", "autoscaler.yaml", "cluster.json")  # all a cluster keeps in its folder


class LocalClusterError(TrainingError):
    """The local cluster could not be started, reached or stopped."""


@dataclass(frozen=True)
class NodeType:
    """One worker node type: its logical resources and how many of it the autoscaler may start."""

    cpus: int
    max_workers: int
    resources: dict[str, float] = field(default_factory=dict)
    object_store_mb: int = 512


# `cluster.yaml`'s worker types at laptop size, each from zero nodes: logical CPUs, not cores (Ray
# schedules on them).
NODE_TYPES = {
    "cpu_worker": NodeType(cpus=2, max_workers=3),
    "train_worker": NodeType(cpus=2, max_workers=2, resources={TRAIN_SLOT: 1}),
}


@dataclass
class LocalCluster:
    """A started cluster: where to reach it and how to stop it."""

    folder: Path
    gcs_port: int
    dashboard_port: int

    @property
    def address(self) -> str:
        """The job API's address (``ray job submit --address``, ``serve deploy -a``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        """What ``ray.init(address=...)`` and ``ray start --address`` take."""
        return f"{_node_ip()}:{self.gcs_port}"

    @property
    def token_path(self) -> Path:
        return self.folder / "auth_token"

    def client_env(self) -> dict[str, str]:
        """This process's environment, with which Ray clients (CLI, ``JobSubmissionClient``,
        ``ray.init``) carry the cluster's token."""
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        return env

    def api(self, path: str) -> Any:
        """GET ``path`` of the dashboard's HTTP API with the cluster's token; the decoded JSON.

        Raises:
            LocalClusterError: the dashboard does not answer, or not with JSON.
        """
        request = urllib.request.Request(f"{self.address}{path}",
                                         headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.load(answer)
        except (OSError, ValueError) as exc:
            raise LocalClusterError(f"the local cluster's dashboard at {self.address} did not answer {path}: {exc}") from None

    def worker_nodes(self) -> list[dict[str, Any]]:
        """The alive worker nodes, ``{"node_id", "type", "resources"}`` each (the dashboard's state API).

        Raises:
            LocalClusterError: the dashboard does not answer.
        """
        rows = self.api("/api/v0/nodes?detail=1&limit=1000")["data"]["result"]["result"]
        return [{"node_id": n["node_id"], "type": node_type_of(n["resources_total"]), "resources": n["resources_total"]}
                for n in rows if n["state"] == "ALIVE" and not n["is_head_node"]]

    def stop(self) -> None:
        """End every process of this cluster (head, autoscaler, worker nodes, Serve's HAProxy)."""
        stop(self.folder)


def __getattr__(name: str) -> Any:
    """``LocalNodeProvider`` (the autoscaler loads it by name), built on first use: it derives
    from a module of Ray's autoscaler internals that nothing else here needs."""
    if name == "LocalNodeProvider":
        return _local_node_provider()
    raise AttributeError(name)


def _local_node_provider() -> type:
    import ray
    from ray._common.network_utils import build_address
    from ray._private import ray_constants
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
    from ray.autoscaler.tags import (
        NODE_KIND_WORKER,
        STATUS_UP_TO_DATE,
        TAG_RAY_NODE_KIND,
        TAG_RAY_NODE_NAME,
        TAG_RAY_NODE_STATUS,
        TAG_RAY_USER_NODE_TYPE,
    )

    class LocalNodeProvider(FakeMultiNodeProvider):
        """Ray's fake multi-node provider, but each node unpacks runtime envs (a job's working dir)
        into a folder of its own, as each machine of a real cluster has its own disk. In the one
        folder the nodes share otherwise, a node that starts unpacks a job's working dir over the
        copy that a running driver on another node works in, and the driver loses its working
        folder mid-run. (The nodes still share one Ray temp dir: the job API reads a driver's log
        where the head would.)"""

        def _create_node_with_resources_and_labels(self, node_config: Any, tags: Any, count: Any,
                                                   resources: Any, labels: Any) -> None:
            resources = dict(resources)
            with self.lock:
                node_type = tags[TAG_RAY_USER_NODE_TYPE]
                next_id = self._next_hex_node_id()
                gcs = self._gcs_address or build_address(ray._private.services.get_node_ip_address(), 6379)
                params = ray._private.parameter.RayParams(
                    min_worker_port=0, max_worker_port=0, dashboard_port=None, dashboard_agent_listen_port=0,
                    num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0),
                    object_store_memory=resources.pop("object_store_memory", None),
                    resources=resources, labels=labels, redis_address=gcs, gcs_address=gcs,
                    runtime_env_dir_name=f"runtime_resources_{next_id[-5:]}",
                    env_vars={
                        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": next_id, "RAY_CLOUD_INSTANCE_ID": next_id,
                        "RAY_NODE_TYPE_NAME": node_type,
                        ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                        ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels),
                    },
                )
                node = ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
                self._nodes[next_id] = {"node": node, "tags": {  # type: ignore[dict-item]
                    TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: node_type,
                    TAG_RAY_NODE_NAME: next_id, TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE, **tags}}

    return LocalNodeProvider


def node_type_of(resources: dict[str, float]) -> str:
    """The node type (of `NODE_TYPES`) whose custom resources a node has; the one without any, else."""
    for name, t in NODE_TYPES.items():
        if t.resources and all(resources.get(k) == v for k, v in t.resources.items()):
            return name
    return next(name for name, t in NODE_TYPES.items() if not t.resources)


def _node_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def autoscaler_config(gcs_address: str, idle_timeout_minutes: float) -> dict[str, Any]:
    """The cluster-launcher config the fake multi-node provider reads (keys it ignores stay empty)."""
    types: dict[str, Any] = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, t in NODE_TYPES.items():
        types[name] = {
            "resources": {"CPU": t.cpus, "object_store_memory": t.object_store_mb * 1024 * 1024, **t.resources},
            "node_config": {}, "min_workers": 0, "max_workers": t.max_workers,
        }
    return {
        "cluster_name": "ray-rec-local",
        "max_workers": sum(t.max_workers for t in NODE_TYPES.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        # "external": the fake provider (as `LocalNodeProvider`) without the example config the
        # "fake_multinode" type reads its defaults from (the wheel does not ship it).
        "provider": {"type": "external", "module": "ray_rec.local_cluster.LocalNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address,
                     "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID},
        "docker": {}, "auth": {}, "available_node_types": types, "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def start(
    folder: Path = DEFAULT_FOLDER,
    idle_timeout_minutes: float = 1.0,
    env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> LocalCluster:
    """Start the head (no work on it) with the autoscaler; worker nodes come as work asks for them.

    ``env`` adds variables to every process of the cluster (e.g. where S3 is): Ray's worker
    processes read them at start. Serve's HAProxy ingress is on, as on `cluster.yaml`.

    Raises:
        LocalClusterError: a cluster already runs from ``folder``, or the head did not start.
    """
    folder = Path(folder).absolute()
    if (folder / "cluster.json").exists():
        raise LocalClusterError(f"a local cluster already runs from {folder}: `ray-rec local-cluster down` first")
    others = sorted(set(os.listdir(folder)) - set(OWN_FILES)) if folder.is_dir() else []
    if others:
        raise LocalClusterError(f"{folder} holds files of its own ({', '.join(others[:3])}): choose a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ray_temp_dir(folder), ignore_errors=True)
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    gcs_port, dashboard_port = free_port(), free_port()
    config = folder / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(autoscaler_config(f"{_node_ip()}:{gcs_port}", idle_timeout_minutes)))
    cluster_env = {**os.environ, **FAST_INGRESS, **(env or {}), "RAY_FAKE_CLUSTER": "1",
                   "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                   # Autoscaler v2 (KubeRay's): a node whose raylet dies is terminated and replaced.
                   "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                   "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
    cluster_env.pop("RAY_ADDRESS", None)
    ray_bin = Path(sys.executable).parent / "ray"
    cmd = [str(ray_bin), "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
           "--dashboard-host=127.0.0.1", "--num-cpus=0", "--object-store-memory=536870912",
           # Free ports, not Ray's fixed defaults: another Ray on this machine may hold those.
           f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}", f"--temp-dir={ray_temp_dir(folder)}",
           f"--autoscaling-config={config}", "--disable-usage-stats"]
    out = subprocess.run(cmd, env=cluster_env, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        stop(folder)
        raise LocalClusterError(f"the head did not start:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    cluster = LocalCluster(folder, gcs_port, dashboard_port)
    (folder / "cluster.json").write_text(json.dumps({"gcs_port": gcs_port, "dashboard_port": dashboard_port}))
    deadline = time.monotonic() + timeout_s
    while True:  # `ray start` returns before the dashboard (the job API) listens
        try:
            cluster.worker_nodes()
            return cluster
        except LocalClusterError as exc:
            if time.monotonic() > deadline:
                stop(folder)
                raise LocalClusterError(f"the head's dashboard never answered: {exc}") from None
            time.sleep(0.5)


def attach(folder: Path = DEFAULT_FOLDER) -> LocalCluster:
    """The cluster started from ``folder``.

    Raises:
        LocalClusterError: none runs from there.
    """
    folder = Path(folder).absolute()
    try:
        facts = json.loads((folder / "cluster.json").read_text())
    except FileNotFoundError:
        raise LocalClusterError(f"no local cluster runs from {folder}: `ray-rec local-cluster up` starts one") from None
    return LocalCluster(folder, facts["gcs_port"], facts["dashboard_port"])


def ray_temp_dir(folder: Path) -> Path:
    """Ray's temp dir for the cluster of ``folder``: short, since Ray's Unix socket paths under it
    must stay within 107 bytes, and named after the folder."""
    return Path(tempfile.gettempdir()) / f"ray-rec-{hashlib.sha1(str(folder).encode()).hexdigest()[:10]}"


def processes_with(*marks: str) -> list[int]:
    """Other processes whose command line or environment contains one of ``marks``."""
    encoded = [m.encode() for m in marks]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            seen = (entry / "cmdline").read_bytes() + b"\0" + (entry / "environ").read_bytes()
            if any(mark in seen for mark in encoded):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop(folder: Path = DEFAULT_FOLDER, grace_s: float = 5.0) -> None:
    """End every process of the cluster run from ``folder`` (SIGTERM, then SIGKILL), and forget it."""
    folder = Path(folder).absolute()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        # Every process Ray starts for the cluster gets the temp dir or the token path.
        pids = processes_with(str(folder), str(ray_temp_dir(folder)))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and _alive(p)]
            time.sleep(0.2)
        if not pids:
            break
    (folder / "cluster.json").unlink(missing_ok=True)
    shutil.rmtree(ray_temp_dir(folder), ignore_errors=True)


def _alive(pid: int) -> bool:
    """False for a zombie (its parent has not reaped it yet) or a gone process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
