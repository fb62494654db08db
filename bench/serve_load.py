"""Serving load: requests/s and p50/p99 latency of the Serve app against two ceilings measured in
the same run (a no-op Serve app with the same batching and deployment settings, and a bare
uvicorn app returning a constant), at concurrency 1, 8, 32 and 128, batching on and off.
Loopback only; every level sends a bounded number of requests.

The headline (model / no-op at concurrency 32) comes from ``--rounds`` extra runs that alternate
the two apps, so drift of the machine over the run hits both sides alike; each round also records
the CPU time the model replica, the no-op replica and the Serve proxy spend per request.

    python -m bench.serve_load [--requests 400] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.output import machine, write_result

LEVELS = (1, 8, 32, 128)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def small_artifact(folder: str) -> str:
    """A model trained for two epochs on synthetic data (5,000 items), saved as an artifact."""
    import pyarrow.parquet as pq

    from ray_rec.config import load_config
    from ray_rec.data.prepare import PrepareOptions, prepare
    from ray_rec.data.synthetic import SyntheticSpec, generate
    from ray_rec.model.artifact import save_model
    from ray_rec.train.local import train_local
    from ray_rec.vocab import Vocabulary

    log, _ = generate(SyntheticSpec(users=3000, items=5000, topics=50))
    pq.write_table(log, f"{folder}/events.parquet")
    prepare(PrepareOptions(input=f"{folder}/events.parquet", output=f"{folder}/data", num_shards=2))
    run = train_local(f"{folder}/data", load_config(None, {"train.epochs": 2}), evaluate_test=False, log=lambda m: None)
    save_model(run.model, Vocabulary.load(f"{folder}/data"), f"{folder}/model")
    return f"{folder}/model"


async def load(url: str, body: dict, concurrency: int, total: int) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    queue: Iterator[int] = iter(())

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for _ in queue:
            t0 = time.perf_counter()
            try:
                async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=60)) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors += 1
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        queue = iter(range(min(concurrency, 4) * 4))  # warm-up: open connections, a few requests
        await asyncio.gather(*(worker(session) for _ in range(min(concurrency, 4))))
        queue = iter(range(total))
        t0 = time.perf_counter()
        latencies.clear()
        errors = 0  # only the measured requests count
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"rps": total / wall, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "errors": errors}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def replica_pids() -> dict[str, int]:
    """Process ids of the model replica, the no-op replica and the HTTP proxy on this node."""
    from ray.util.state import list_actors

    wanted = {"RecommenderService": "model replica", "NoopService": "no-op replica", "ProxyActor": "proxy"}
    pids: dict[str, int] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        for key, name in wanted.items():
            batching = key != "RecommenderService" or "nobatch" not in (actor.name or "")
            if key in actor.class_name and batching and actor.pid is not None:
                pids.setdefault(name, actor.pid)
    return pids


def interleaved(urls: dict[str, str], body: dict, concurrency: int, total: int, rounds: int) -> dict[str, Any]:
    """Alternate the no-op and model apps ``rounds`` times; ratios per round and their median."""
    pids = replica_pids() if sys.platform == "linux" else {}
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        row: dict[str, Any] = {}
        for name, url in urls.items():
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            res = asyncio.run(load(url, body, concurrency, total))
            res["cpu_ms_per_request"] = {k: (cpu_seconds(p) - before[k]) * 1000 / total for k, p in pids.items()}
            row[name] = res
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in res["cpu_ms_per_request"].items())
            print(f"round {r + 1} {name:8} c={concurrency} {res['rps']:6.0f} req/s  p99 {res['p99_ms']:6.1f} ms  "
                  f"CPU ms/request: {cpu}", flush=True)
        row["rps_ratio"] = row["model"]["rps"] / row["no-op"]["rps"]
        row["p99_ratio"] = row["model"]["p99_ms"] / row["no-op"]["p99_ms"]
        runs.append(row)
    return {"concurrency": concurrency, "runs": runs,
            "rps_ratio": statistics.median(r["rps_ratio"] for r in runs),
            "p99_ratio": statistics.median(r["p99_ratio"] for r in runs)}


UVICORN_APP = '''
from fastapi import FastAPI
app = FastAPI()
@app.post("/v1/recommend")
async def recommend(body: dict):
    return {"model_version": "constant", "items": []}
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--rounds", type=int, default=3, help="alternating no-op / model runs at concurrency 32")
    args = parser.parse_args()
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    from ray import serve

    from bench.noop_app import build_noop_app
    from ray_rec.serve.app import build_app
    from ray_rec.serve.schemas import ServeArgs

    tmp = tempfile.mkdtemp()
    model_uri = small_artifact(tmp)
    clicks = [f"i{i}" for i in range(1, 40)]
    history = {"history": clicks, "k": 10}
    score = {"history": clicks, "candidates": [f"i{i}" for i in range(100, 200)]}

    from ray_rec import load_model
    from ray_rec.predict import Query

    rec = load_model(model_uri)
    idx = rec.vocab.lookup(clicks)[0]
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 5:
        rec.predict([Query(idx, k=10) for _ in range(32)])
        n += 32
    model_only = n / (time.perf_counter() - t0)
    print(f"model only (one replica's forward passes, batches of 32 recommend jobs): {model_only:,.0f} requests/s", flush=True)

    port = free_port()
    uv_port = free_port()
    app_file = Path(tmp, "bare.py")
    app_file.write_text(UVICORN_APP)
    bare = subprocess.Popen([sys.executable, "-m", "uvicorn", "bare:app", "--port", str(uv_port), "--log-level", "warning"],
                            cwd=tmp)
    ray.init(address="local", num_cpus=4, logging_level=logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows: dict[str, dict[int, Any]] = {}
    try:
        setups = {
            "model, batching on": (build_app(ServeArgs(model_uri=model_uri)), "/model"),
            "model, batching off": (build_app(ServeArgs(model_uri=model_uri, batching=False)), "/nobatch"),
            "no-op Serve, batching on": (build_noop_app(32, 0.005), "/noop"),
        }
        for app, prefix in setups.values():
            serve.run(app, name=prefix.strip("/"), route_prefix=prefix)
        time.sleep(2)
        targets = {name: f"http://127.0.0.1:{port}{prefix}/v1/recommend" for name, (_, prefix) in setups.items()}
        targets["bare uvicorn"] = f"http://127.0.0.1:{uv_port}/v1/recommend"
        targets["model /v1/score, batching on"] = f"http://127.0.0.1:{port}/model/v1/score"
        for name, url in targets.items():
            body = score if "score" in name else history
            for c in LEVELS:
                r = asyncio.run(load(url, body, c, args.requests))
                rows.setdefault(name, {})[c] = r
                print(f"{name:32} c={c:<4} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}", flush=True)
        pairs = {"no-op": targets["no-op Serve, batching on"], "model": targets["model, batching on"]}
        alternating = interleaved(pairs, history, 32, args.requests, args.rounds)
    finally:
        bare.terminate()
        serve.shutdown()
        ray.shutdown()
    summary = {
        "rps_ratio_c32": alternating["rps_ratio"],  # median over the alternating rounds
        "p99_ratio_c32": alternating["p99_ratio"],
        "batching_gain_c128": rows["model, batching on"][128]["rps"] / rows["model, batching off"][128]["rps"],
        "model_only_rps": model_only,
    }
    print(json.dumps(summary, indent=2))
    report = {"machine": machine(), "requests_per_level": args.requests,
              "rows": rows, "alternating_c32": alternating, "summary": summary,
              "command": f"python -m bench.serve_load --requests {args.requests} --rounds {args.rounds}"}
    write_result("serve_load.json", report)


if __name__ == "__main__":
    main()
