"""Data at scale: import and stream generated logs of two sizes through a loopback S3 server.

For each size it writes a generated events log (Parquet, 1M events a file, a 50,000-item
catalog), then in fresh processes:
- `ray-rec prepare`'s code imports it to ``s3://`` on a local ``moto_server``: seconds, events/s,
  peak RSS of the importing process; then again with ``--engine ray`` on a local one-node Ray
  (same counts checked): events/s, the largest process's peak, every Ray process's together and the
  object-store pages;
- the Ray Data pipeline streams the training split back from S3 into training tensors exactly as a
  training worker does (`iter_batches` -> `shuffle_chunks` -> `length_buckets` -> `collate`; with
  the browsed negatives a `bce` model reads, the heaviest examples), on a
  local Ray whose object store is capped at `OBJECT_STORE_MB`: examples/s, the peak memory (PSS)
  of the driver and every Ray process together, and apart from it the object-store pages.
Next to the pipeline's throughput it prints the training step rate of the default model on the
same data (plain PyTorch, one process), as a ratio: above 1 means the pipeline keeps up.

    python -m bench.data_scale                       # 2M, 20M and 40M events
    python -m bench.data_scale --sizes 200000 2000000   # quicker
    python -m bench.data_scale --nodes 1 2 --sizes 2000000 20000000

``--nodes`` runs only the Ray engine, on a local multi-node Ray (`ray.cluster_utils.Cluster`: a
head that takes no work and that many worker nodes of ``--node-cpus`` logical CPUs, each its own
raylet and object store), against the local engine on the same log: events/s, and each node's peak
memory (the PSS of the processes its raylet started, object-store pages apart). On this 2-core
machine two nodes share the same two cores: the point is that the import spreads over them and
each node's memory stays flat, not a speed-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.output import machine, this_ray, write_result

OBJECT_STORE_MB = 2048  # the streaming run's Ray object store: whatever the data size, it must fit
# The generated users average about 40 clicks, right at the line where the history length would
# switch from 50 to 200 (`ray_rec.config.LONG_HISTORY_CLICKS`): pinned, so every size streams the
# same windows and the figures compare across runs (windows, as every stored row streamed).
PINNED = {"model.max_len": 50, "model.examples": "windows"}
# Examples as a `bce` model reads them, with up to 8 browsed negatives per step: the pipeline at its
# heaviest (the default loss does not read browses, and training then builds none).
HEAVIEST_LOSS = "bce"


def _pss_mb(pids: list[int]) -> tuple[float, float]:
    """(process memory, shared-memory pages) in MB, proportional set sizes summed over ``pids``.
    The second is Ray's object store (plasma, in /dev/shm): pages it has touched stay resident up
    to the store's size, so it is reported apart from the processes' own memory."""
    own = shm = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(("Pss_Anon:", "Pss_File:")):
                        own += int(line.split()[1])
                    elif line.startswith("Pss_Shmem:"):
                        shm += int(line.split()[1])
        except OSError:
            continue
    return own / 1024, shm / 1024


def _ray_pids() -> list[int]:
    """This process and every Ray process on the machine (the benchmark runs alone)."""
    pids = [os.getpid()]
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if "ray::" in cmd or "/ray/" in cmd or "raylet" in cmd or "gcs_server" in cmd:
            pids.append(int(entry))
    return pids


class PeakMemory:
    """Samples the total PSS of a set of processes in a background thread."""

    def __init__(self, pids: Any, every_s: float = 0.25) -> None:
        self.pids, self.every_s, self.peak, self.peak_shm = pids, every_s, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            own, shm = _pss_mb(self.pids())
            self.peak, self.peak_shm = max(self.peak, own), max(self.peak_shm, shm)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def vm_hwm_mb() -> float:
    """This process's peak RSS since exec (VmHWM). Not ru_maxrss: that survives exec on Linux, so
    a child forked from this benchmark's parent (which holds the loopback S3 server's objects in
    memory) would report the parent's size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def child_prepare(src: str, out: str) -> dict[str, Any]:
    from ray_rec.data.prepare import PrepareOptions, prepare

    t0 = time.monotonic()
    manifest = prepare(PrepareOptions(input=src, output=out, num_shards=8, engine="local"))
    seconds = time.monotonic() - t0
    return {"seconds": seconds, "events_per_s": manifest.counts.rows_read / seconds, "peak_rss_mb": vm_hwm_mb(),
            "counts": dataclasses.asdict(manifest.counts)}


def child_prepare_ray(src: str, out: str) -> dict[str, Any]:
    """The Ray engine on a local one-node Ray (object store capped at `OBJECT_STORE_MB`): seconds,
    events/s, the largest process's peak and the peak of every process together, object-store pages apart."""
    import ray

    from ray_rec.data.prepare import PrepareOptions, prepare
    from ray_rec.ray_session import init_ray, local_cpus

    ray.init(address="local", num_cpus=local_cpus(1), object_store_memory=OBJECT_STORE_MB * 2**20, logging_level=logging.WARNING)
    init_ray(1)
    largest = 0.0

    def pids() -> list[int]:
        nonlocal largest
        found = _ray_pids()
        largest = max([largest, *(_pss_mb([p])[0] for p in found)])
        return found

    with PeakMemory(pids) as peak:
        t0 = time.monotonic()
        manifest = prepare(PrepareOptions(input=src, output=out, num_shards=8, engine="ray"))
        seconds = time.monotonic() - t0
    ray.shutdown()
    return {"seconds": seconds, "events_per_s": manifest.counts.rows_read / seconds, "peak_process_mb": largest,
            "peak_pss_mb": peak.peak, "peak_object_store_pages_mb": peak.peak_shm, "counts": dataclasses.asdict(manifest.counts)}


def child_stream(data: str) -> dict[str, Any]:
    import numpy as np
    import ray

    from ray_rec.config import for_data, load_config
    from ray_rec.data.examples import BUCKET_WINDOW, browse_width, collate, length_buckets, shuffle_chunks
    from ray_rec.data.manifest import read_manifest
    from ray_rec.data.pipeline import example_chunks, limit_memory, training_sequences
    from ray_rec.ray_session import init_ray, local_cpus

    ray.init(address="local", num_cpus=local_cpus(1), object_store_memory=OBJECT_STORE_MB * 2**20, logging_level=logging.WARNING)
    init_ray(1)  # the rest of ray-rec's set-up
    cfg = load_config(None, PINNED)
    m = read_manifest(data)
    mcfg = for_data(cfg.model, m)
    limit_memory(cfg.data.pipeline_memory_mb)  # as `ray-rec train` does
    ds = training_sequences(data, 0, m)
    size = BUCKET_WINDOW * cfg.train.batch_for(mcfg)
    rng = np.random.default_rng(0)
    with PeakMemory(_ray_pids) as peak:
        t0, n, first = time.monotonic(), 0, None
        chunks = example_chunks(ds, m, mcfg, browse_width(m, HEAVIEST_LOSS), size)
        for chunk in shuffle_chunks(chunks, size, cfg.data.shuffle_buffer, rng):
            for batch in length_buckets(chunk, cfg.train.batch_for(mcfg), rng):
                n += int(collate(batch)["items"].shape[0])
            first = first or time.monotonic() - t0
        seconds = time.monotonic() - t0
    return {"examples": n, "seconds": seconds, "first_chunk_s": first, "examples_per_s": n / seconds, "peak_pss_mb": peak.peak,
            "peak_object_store_pages_mb": peak.peak_shm, "object_store_mb": OBJECT_STORE_MB}


def child_train_rate(data: str, steps: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from ray_rec.config import for_data, load_config
    from ray_rec.data.examples import BUCKET_WINDOW, browse_width, collate, length_buckets, training_examples
    from ray_rec.data.local import read_split
    from ray_rec.data.manifest import read_manifest
    from ray_rec.model.interest_model import InterestModel
    from ray_rec.train.fit import train_step
    from ray_rec.train.optim import make_optimizer

    cfg = load_config(None, PINNED)
    m = read_manifest(data)
    mcfg = for_data(cfg.model, m)
    table = read_split(data, "train").slice(0, 40_000)
    examples = training_examples(table, mcfg.history_len, mcfg.time_buckets, browse_width(m, HEAVIEST_LOSS))
    rng = np.random.default_rng(0)
    rows = rng.permutation(len(examples["items"]))[: BUCKET_WINDOW * cfg.train.batch_for(mcfg)]
    batches = [collate(b) for b in length_buckets({k: v[rows] for k, v in examples.items()}, cfg.train.batch_for(mcfg), rng)]
    torch.manual_seed(0)
    model = InterestModel(mcfg)
    opt = make_optimizer(model, cfg.train)
    for batch in batches[:3]:  # warm-up
        train_step(model, batch, opt, cfg.train.grad_clip)
    t0, n = time.monotonic(), 0
    for i in range(steps):
        batch = batches[i % len(batches)]
        train_step(model, batch, opt, cfg.train.grad_clip)
        n += int(batch["items"].shape[0])
    return {"examples_per_s": n / (time.monotonic() - t0), "steps": steps, "catalog": m.counts.items}


def child_prepare_nodes(src: str, out: str, nodes: str, node_cpus: str) -> dict[str, Any]:
    """The Ray engine on a local cluster of ``nodes`` worker nodes: seconds, events/s, each node's
    peak (its raylet's processes together, and its largest process) and the tasks each node ran."""
    import psutil
    import ray
    from ray.cluster_utils import Cluster

    from ray_rec.data.prepare import PrepareOptions, prepare
    from ray_rec.ray_session import init_ray

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=int(node_cpus), object_store_memory=OBJECT_STORE_MB // 2 * 2**20)
               for _ in range(int(nodes))]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    init_ray(1)
    raylets = [w.all_processes["raylet"][0].process.pid for w in workers]
    largest = [0.0] * len(workers)

    def tree(pid: int) -> list[int]:
        try:
            return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    peaks = []
    for i, raylet in enumerate(raylets):
        def pids(i: int = i, raylet: int = raylet) -> list[int]:
            found = tree(raylet)
            largest[i] = max([largest[i], *(_pss_mb([p])[0] for p in found)])
            return found
        peaks.append(PeakMemory(pids))
    for p in peaks:
        p.__enter__()
    try:
        t0 = time.monotonic()
        manifest = prepare(PrepareOptions(input=src, output=out, num_shards=8, engine="ray"))
        seconds = time.monotonic() - t0
    finally:
        for p in peaks:
            p.__exit__(None, None, None)
    from ray.util.state import list_tasks

    by_node: dict[str, int] = {}
    ids = {w.node_id: f"node {i + 1}" for i, w in enumerate(workers)}
    for task in list_tasks(address=this_ray(), filters=[("state", "=", "FINISHED")], limit=10_000, detail=True):
        if task.name in ("_read_file", "_split_task"):
            by_node[ids.get(task.node_id, "head")] = by_node.get(ids.get(task.node_id, "head"), 0) + 1
    ray.shutdown()
    cluster.shutdown()
    return {"nodes": int(nodes), "node_cpus": int(node_cpus), "seconds": seconds,
            "events_per_s": manifest.counts.rows_read / seconds, "counts": dataclasses.asdict(manifest.counts),
            "node_peak_pss_mb": [p.peak for p in peaks], "node_peak_object_store_pages_mb": [p.peak_shm for p in peaks],
            "node_largest_process_mb": largest, "tasks_by_node": by_node}


def nodes_main(sizes: list[int], nodes: list[int], node_cpus: int) -> None:
    """``--nodes``: the local engine and the Ray engine on 1..N local nodes, for each size."""
    import pyarrow.parquet as pq

    from ray_rec import storage
    from ray_rec.data.synthetic import bulk_log
    from ray_rec.demo import BUCKET, loopback_s3

    rows: dict[str, Any] = {}
    with loopback_s3():
        for size in sizes:
            with tempfile.TemporaryDirectory(prefix="ray-rec-scale-") as tmp:
                src = f"s3://{BUCKET}/logs-{size}"  # every node reads the log from S3
                for i, chunk in enumerate(bulk_log(size)):
                    pq.write_table(chunk, f"{tmp}/events-{i:04d}.parquet")
                    storage.write_bytes(f"{src}/events-{i:04d}.parquet", Path(f"{tmp}/events-{i:04d}.parquet").read_bytes())
                data = f"s3://{BUCKET}/nodes-{size}"
                local = _child("prepare", src, data)
                row: dict[str, Any] = {"local": local}
                print(f"[{size:,} events] local engine: {local['events_per_s']:,.0f} events/s", flush=True)
                for n in nodes:
                    got = _child("prepare_nodes", src, f"{data}-{n}-nodes", str(n), str(node_cpus))
                    if got["counts"] != local["counts"]:
                        raise SystemExit(f"the engines disagree: local {local['counts']}, {n} nodes {got['counts']}")
                    print(f"[{size:,} events] Ray engine on {n} node(s) of {node_cpus} CPUs: {got['events_per_s']:,.0f} events/s "
                          f"({got['events_per_s'] / local['events_per_s']:.2f}x local); per node peak "
                          f"{', '.join(f'{m:,.0f}' for m in got['node_peak_pss_mb'])} MB (largest process "
                          f"{', '.join(f'{m:,.0f}' for m in got['node_largest_process_mb'])} MB), tasks {got['tasks_by_node']}",
                          flush=True)
                    row[f"{n} nodes"] = got
                rows[str(size)] = row
    write_result("data_scale_nodes.json", {
        "machine": machine(), "node_cpus": node_cpus, "sizes": rows,
        "command": f"python -m bench.data_scale --nodes {' '.join(map(str, nodes))} --sizes {' '.join(map(str, sizes))}"})


def _child(kind: str, *args: str) -> dict[str, Any]:
    """Run one measurement in a fresh process (so peak memory is its own) and return its JSON."""
    out = subprocess.run([sys.executable, "-m", "bench.data_scale", "--child", kind, *args], capture_output=True,
                         text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{kind} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000_000, 20_000_000, 40_000_000])
    parser.add_argument("--nodes", type=int, nargs="+", help="only the Ray engine, on a local cluster of each of these "
                                                               "numbers of worker nodes")
    parser.add_argument("--node-cpus", type=int, default=2, help="logical CPUs of each worker node (--nodes)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        children: dict[str, Callable[..., dict[str, Any]]] = {
            "prepare": child_prepare, "prepare_ray": child_prepare_ray, "prepare_nodes": child_prepare_nodes,
            "stream": child_stream, "train_rate": lambda d: child_train_rate(d, 60)}
        fn = children[kind]
        print(json.dumps(fn(*rest)), flush=True)
        return
    if args.nodes:
        nodes_main(args.sizes, args.nodes, args.node_cpus)
        return
    import pyarrow.parquet as pq

    from ray_rec.data.synthetic import bulk_log
    from ray_rec.demo import BUCKET, loopback_s3

    rows: dict[str, Any] = {}
    with loopback_s3():
        for size in args.sizes:
            with tempfile.TemporaryDirectory(prefix="ray-rec-scale-") as tmp:
                t0 = time.monotonic()
                for i, chunk in enumerate(bulk_log(size)):
                    pq.write_table(chunk, f"{tmp}/events-{i:04d}.parquet")
                gen_s = time.monotonic() - t0
                print(f"[{size:,} events] generated in {gen_s:.0f} s", flush=True)
                data = f"s3://{BUCKET}/scale-{size}"
                imp = _child("prepare", tmp, data)
                print(f"[{size:,} events] import to S3: {imp['seconds']:.0f} s ({imp['events_per_s']:,.0f} events/s), "
                      f"peak RSS {imp['peak_rss_mb']:,.0f} MB", flush=True)
                on_ray = _child("prepare_ray", tmp, data + "-ray")
                if on_ray["counts"] != imp["counts"]:
                    raise SystemExit(f"the engines disagree: local {imp['counts']}, ray {on_ray['counts']}")
                print(f"[{size:,} events] import to S3 on Ray (one node): {on_ray['seconds']:.0f} s ({on_ray['events_per_s']:,.0f} events/s, "
                      f"{on_ray['events_per_s'] / imp['events_per_s']:.2f}x the local engine), largest process {on_ray['peak_process_mb']:,.0f} MB, "
                      f"all processes {on_ray['peak_pss_mb']:,.0f} MB + object store pages {on_ray['peak_object_store_pages_mb']:,.0f} MB", flush=True)
                stream = _child("stream", data)
                print(f"[{size:,} events] stream from S3: {stream['examples']:,} examples in {stream['seconds']:.1f} s "
                      f"({stream['examples_per_s']:,.0f}/s), peak memory of the driver and Ray processes {stream['peak_pss_mb']:,.0f} MB "
                      f"+ object store pages {stream['peak_object_store_pages_mb']:,.0f} MB (store capped at {OBJECT_STORE_MB:,} MB)",
                      flush=True)
                rows[str(size)] = {"generate_s": gen_s, "import": imp, "import_ray": on_ray, "stream": stream}
        largest = str(max(args.sizes))
        train = _child("train_rate", f"s3://{BUCKET}/scale-{largest}")
        ratio = rows[largest]["stream"]["examples_per_s"] / train["examples_per_s"]
        print(f"default model training step rate ({train['catalog']:,}-item catalog): {train['examples_per_s']:,.0f} examples/s; "
              f"pipeline / training = {ratio:.1f}x", flush=True)
    sizes = sorted(rows, key=int)
    report = {
        "machine": machine(),
        "command": "python -m bench.data_scale --sizes " + " ".join(sizes),
        "sizes": rows,
        "train_step": train,
        "pipeline_over_training": ratio,
        "import_peak_growth": rows[sizes[-1]]["import"]["peak_rss_mb"] / rows[sizes[-2]]["import"]["peak_rss_mb"],
        "stream_peak_growth": rows[sizes[-1]]["stream"]["peak_pss_mb"] / rows[sizes[-2]]["stream"]["peak_pss_mb"],
        "import_ray_peak_growth": rows[sizes[-1]]["import_ray"]["peak_process_mb"] / rows[sizes[-2]]["import_ray"]["peak_process_mb"],
    }
    print(f"peak memory, {int(sizes[-1]):,} vs {int(sizes[-2]):,} events: import {report['import_peak_growth']:.2f}x, "
          f"import on Ray (largest process) {report['import_ray_peak_growth']:.2f}x, stream {report['stream_peak_growth']:.2f}x "
          "(flat = about 1x)")
    write_result("data_scale.json", report)


if __name__ == "__main__":
    main()
