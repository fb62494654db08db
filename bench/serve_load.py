"""Serving load under Serve's two ingress paths, in one run: requests/s and p50/p99 latency of the
model app, a no-op Serve app with the same batching and deployment settings, and a bare uvicorn
app returning a constant, at concurrency 1, 8, 32 and 128.

The ingresses: Serve's default Python proxy, and HAProxy in front of the replicas' own ports
(`ray_rec.ray_session.FAST_INGRESS`, what `ray-rec serve` runs). Serve reads the choice when Ray
starts, so each round starts one fresh Ray per ingress in a child process, alternating with the
bare uvicorn run, so that drift of the machine over the run hits every setup alike; the figures
are the medians over ``--rounds``. Each child also records the CPU time the model replica, the
no-op replica and the ingress (Serve proxy, HAProxy) spend per request at concurrency 32, and the
model's p99 at concurrency 128 when 124 of the 128 connections open inside the measurement. Every
other figure is measured on open connections (`load`'s warm-up opens each client's).
Loopback only; every level sends a bounded number of requests.

``--by-user-id`` measures recommending by user id instead (HAProxy ingress, one Ray): the same
1,000 users' 39-click histories sent with every request, read from Redis (a real redis-server,
password and fsync-always persistence on) and read from the replica's memory, the three setups
alternating level by level in every round.

    python -m bench.serve_load [--requests 1000] [--rounds 3]
    python -m bench.serve_load --by-user-id [--requests 2000] [--rounds 3]
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

from bench.output import machine, this_ray, write_result

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


async def load(url: str, body: dict | list[dict], concurrency: int, total: int, warm: bool = True) -> dict[str, Any]:
    """``total`` POSTs of ``body`` (or of the bodies in turn) from ``concurrency`` clients, each on
    its own keep-alive connection. ``warm``: every client opens its connection (2 requests) before
    the measured ones, as clients of a long-running service hold theirs; else only 4 do, and the
    others open theirs inside the measurement, all at once."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    queue: Iterator[int] = iter(())
    bodies = body if isinstance(body, list) else [body]

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for i in queue:
            t0 = time.perf_counter()
            try:
                async with session.post(url, json=bodies[i % len(bodies)], timeout=aiohttp.ClientTimeout(total=60)) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors += 1
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        openers = concurrency if warm else min(concurrency, 4)
        queue = iter(range(openers * 2))  # warm-up: each opener's connection, a few requests
        await asyncio.gather(*(worker(session) for _ in range(openers)))
        queue = iter(range(total))
        t0 = time.perf_counter()
        latencies.clear()
        errors = 0  # only the measured requests count
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"rps": total / wall, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "errors": errors}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_pids() -> dict[str, int]:
    """Process ids of the model replica (batching on), the no-op replica, Serve's HTTP proxy and
    HAProxy on this node (those that run)."""
    from ray.util.state import list_actors

    wanted = {"RecommenderService": "model replica", "NoopService": "no-op replica", "ProxyActor": "proxy"}
    pids: dict[str, int] = {}
    for actor in list_actors(address=this_ray(), filters=[("state", "=", "ALIVE")], limit=1000):
        for key, name in wanted.items():
            batching = key != "RecommenderService" or "nobatch" not in (actor.name or "")
            if key in actor.class_name and batching and actor.pid is not None:
                pids.setdefault(name, actor.pid)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() == "haproxy":
                    pids.setdefault("haproxy", int(proc.name))
            except OSError:
                continue
    return pids


INGRESSES = {
    "default proxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"},
    "haproxy": None,  # `FAST_INGRESS`, as `ray-rec serve` sets it
}


def child(ingress: str, model_uri: str, requests: int, out: str) -> None:
    """One fresh Ray and Serve under ``ingress``: every setup at every level, then CPU per
    request at concurrency 32; the rows to ``out`` as JSON."""
    import ray
    from ray import serve

    from bench.noop_app import build_noop_app
    from ray_rec.serve.app import build_app
    from ray_rec.serve.schemas import ServeArgs

    clicks = [f"i{i}" for i in range(1, 40)]
    history = {"history": clicks, "k": 10}
    score = {"history": clicks, "candidates": [f"i{i}" for i in range(100, 200)]}
    port = free_port()
    ray.init(address="local", num_cpus=4, logging_level=logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows: dict[str, dict[int, Any]] = {}
    cpu: dict[str, dict[str, float]] = {}
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
        targets["model /v1/score, batching on"] = f"http://127.0.0.1:{port}/model/v1/score"
        for name, url in targets.items():
            body = score if "score" in name else history
            for c in LEVELS:
                r = asyncio.run(load(url, body, c, requests))
                rows.setdefault(name, {})[c] = r
                print(f"[{ingress}] {name:30} c={c:<4} {r['rps']:7.0f} req/s  p50 {r['p50_ms']:6.1f} ms  "
                      f"p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}", flush=True)
        cold = asyncio.run(load(targets["model, batching on"], history, 128, requests, warm=False))
        print(f"[{ingress}] model, c=128, connections opened while measured: p99 {cold['p99_ms']:.1f} ms", flush=True)
        pids = serve_pids() if sys.platform == "linux" else {}
        for name in ("model, batching on", "no-op Serve, batching on"):
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            asyncio.run(load(targets[name], history, 32, requests))
            cpu[name] = {k: (cpu_seconds(p) - before[k]) * 1000 / requests for k, p in pids.items()}
    finally:
        serve.shutdown()
        ray.shutdown()
    Path(out).write_text(json.dumps({"rows": rows, "cpu_ms_per_request": cpu, "cold_c128": cold}))


USERS, CLICKS = 1000, 39
BY_ID_SETUPS = ("recommend with the history", "recommend by user id (redis)", "recommend by user id (memory)")


def by_id_child(model_uri: str, requests: int, rounds: int, out: str) -> None:
    """One Ray behind HAProxy with the app twice (user state in Redis; in the replica's memory),
    both holding the same users' histories; every round runs each setup at each level in turn."""
    import random

    import ray
    import requests as http
    from ray import serve

    from bench.redis_server import RedisServer
    from ray_rec.serve.app import build_app
    from ray_rec.serve.schemas import ServeArgs

    redis = RedisServer(Path(tempfile.mkdtemp()))
    redis.start()
    os.environ["BENCH_REDIS_URL"], os.environ["BENCH_REDIS_PASSWORD"] = redis.url, redis.password  # before Ray starts
    rng = random.Random(0)
    users = {f"u{u}": [f"i{rng.randrange(1, 5000)}" for _ in range(CLICKS)] for u in range(USERS)}
    port = free_port()
    ray.init(address="local", num_cpus=4, logging_level=logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    try:
        redis_state = {"backend": "redis", "url_env": "BENCH_REDIS_URL", "password_env": "BENCH_REDIS_PASSWORD"}
        serve.run(build_app(ServeArgs(model_uri=model_uri, state=redis_state)), name="redis", route_prefix="/redis")
        serve.run(build_app(ServeArgs(model_uri=model_uri)), name="memory", route_prefix="/memory")
        for app in ("redis", "memory"):  # the same events through the API, 1,000 users at a time
            events: list[Any] = [{"user_id": u, "item_id": item, "timestamp": 1_700_000_000 + 60 * j}
                                 for u, clicks in users.items() for j, item in enumerate(clicks)]
            for start in range(0, len(events), 5000):
                http.post(f"{base}/{app}/v1/events", json={"events": events[start:start + 5000]}, timeout=60).raise_for_status()
        stamps = [1_700_000_000 + 60 * j for j in range(CLICKS)]
        bodies: dict[str, tuple[str, list[Any]]] = {
            BY_ID_SETUPS[0]: ("/redis", [{"history": c, "timestamps": stamps, "k": 10} for c in users.values()]),
            BY_ID_SETUPS[1]: ("/redis", [{"user_id": u, "k": 10} for u in users]),
            BY_ID_SETUPS[2]: ("/memory", [{"user_id": u, "k": 10} for u in users]),
        }
        same = [http.post(f"{base}{prefix}/v1/recommend", json=dict(b[7]), timeout=30).json()["items"] for prefix, b in bodies.values()]
        assert same[0] == same[1] == same[2], "the three setups answer differently"
        runs: list[dict[str, dict[int, Any]]] = []
        for n in range(rounds):
            row: dict[str, dict[int, Any]] = {}
            for c in LEVELS:
                for name, (prefix, b) in bodies.items():
                    row.setdefault(name, {})[c] = res = asyncio.run(load(f"{base}{prefix}/v1/recommend", b, c, requests))
                    print(f"round {n + 1} {name:32} c={c:<4} {res['rps']:7.0f} req/s  p50 {res['p50_ms']:6.1f} ms  "
                          f"p99 {res['p99_ms']:7.1f} ms  errors {res['errors']}", flush=True)
            runs.append(row)
    finally:
        serve.shutdown()
        ray.shutdown()
        redis.kill()
    Path(out).write_text(json.dumps(runs))


def by_id_main(model_uri: str, requests: int, rounds: int) -> None:
    from ray_rec.ray_session import FAST_INGRESS

    env = {**os.environ, **FAST_INGRESS, "RAY_worker_niceness": "0"}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "bench.serve_load", "--child", "by-user-id", "--model", model_uri,
                        "--requests", str(requests), "--rounds", str(rounds), "--out", out.name], env=env, check=True)
        runs = [{name: {int(c): v for c, v in levels.items()} for name, levels in row.items()}
                for row in json.loads(Path(out.name).read_text())]
    rows = {name: medians([run[name] for run in runs]) for name in BY_ID_SETUPS}
    explicit = rows[BY_ID_SETUPS[0]]
    summary = {name: {"rps_ratio_c32": statistics.median(run[name][32]["rps"] / run[BY_ID_SETUPS[0]][32]["rps"] for run in runs),
                      "p99_ratio_c32": statistics.median(run[name][32]["p99_ms"] / run[BY_ID_SETUPS[0]][32]["p99_ms"] for run in runs)}
               for name in BY_ID_SETUPS[1:]}
    print(json.dumps({"with_history_c32": explicit[32], **summary}, indent=2))
    write_result("serve_by_user_id.json", {
        "machine": machine(), "requests_per_level": requests, "rounds": rounds, "users": USERS, "clicks": CLICKS,
        "rows": rows, "raw_rounds": runs, "summary": summary,
        "command": f"python -m bench.serve_load --by-user-id --requests {requests} --rounds {rounds}"})


def run_child(ingress: str, model_uri: str, requests: int) -> dict[str, Any]:
    from ray_rec.ray_session import FAST_INGRESS

    env = {**os.environ, **(INGRESSES[ingress] or FAST_INGRESS), "RAY_worker_niceness": "0"}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "bench.serve_load", "--child", ingress, "--model", model_uri,
                        "--requests", str(requests), "--out", out.name], env=env, check=True)
        return dict(json.loads(Path(out.name).read_text()))


def medians(runs: list[dict[int, Any]]) -> dict[int, Any]:
    """Level by level, the median of each figure over the rounds (errors: the sum)."""
    out: dict[int, Any] = {}
    for c in runs[0]:
        rows = [r[c] for r in runs]
        out[c] = {k: statistics.median(row[k] for row in rows) for k in ("rps", "p50_ms", "p99_ms")}
        out[c]["errors"] = sum(row["errors"] for row in rows)
    return out


UVICORN_APP = '''
from fastapi import FastAPI
app = FastAPI()
@app.post("/v1/recommend")
async def recommend(body: dict):
    return {"model_version": "constant", "items": []}
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per setup and concurrency level")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running every ingress and bare uvicorn once")
    parser.add_argument("--by-user-id", action="store_true", help="recommend by user id (Redis, memory) against "
                                                                   "recommend with the history, instead")
    parser.add_argument("--child", choices=[*INGRESSES, "by-user-id"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "by-user-id":
        by_id_child(args.model, args.requests, args.rounds, args.out)
        return
    if args.child:
        child(args.child, args.model, args.requests, args.out)
        return

    tmp = tempfile.mkdtemp()
    model_uri = small_artifact(tmp)
    if args.by_user_id:
        by_id_main(model_uri, args.requests, args.rounds)
        return
    from ray_rec import load_model
    from ray_rec.predict import Query

    rec = load_model(model_uri)
    idx = rec.vocab.lookup([f"i{i}" for i in range(1, 40)])[0]
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 5:
        rec.predict([Query(idx, k=10) for _ in range(32)])
        n += 32
    model_only = n / (time.perf_counter() - t0)
    print(f"model only (one replica's forward passes, batches of 32 recommend jobs): {model_only:,.0f} requests/s", flush=True)

    uv_port = free_port()
    Path(tmp, "bare.py").write_text(UVICORN_APP)
    bare = subprocess.Popen([sys.executable, "-m", "uvicorn", "bare:app", "--port", str(uv_port), "--log-level", "warning"],
                            cwd=tmp)
    time.sleep(2)
    rounds: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            row: dict[str, Any] = {}
            for ingress in INGRESSES:
                row[ingress] = run_child(ingress, model_uri, args.requests)
            row["bare uvicorn"] = {c: asyncio.run(load(f"http://127.0.0.1:{uv_port}/v1/recommend", {"history": ["i1"], "k": 10},
                                                       c, args.requests)) for c in LEVELS}
            print(f"round {r + 1}: bare uvicorn c=32 {row['bare uvicorn'][32]['rps']:,.0f} req/s", flush=True)
            rounds.append(row)
    finally:
        bare.terminate()
    rows: dict[str, dict[int, Any]] = {}
    for ingress in INGRESSES:
        for setup in rounds[0][ingress]["rows"]:
            rows[f"{setup} ({ingress})"] = medians([{int(c): v for c, v in rd[ingress]["rows"][setup].items()} for rd in rounds])
    rows["bare uvicorn"] = medians([rd["bare uvicorn"] for rd in rounds])
    summary: dict[str, Any] = {"model_only_rps": model_only}
    for ingress in INGRESSES:
        model, noop = rows[f"model, batching on ({ingress})"], rows[f"no-op Serve, batching on ({ingress})"]
        summary[ingress] = {
            "model_rps_c32": model[32]["rps"], "model_p99_c32": model[32]["p99_ms"],
            "model_over_bare_c32": statistics.median(rd[ingress]["rows"]["model, batching on"]["32"]["rps"]
                                                     / rd["bare uvicorn"][32]["rps"] for rd in rounds),
            "model_over_noop_c32": statistics.median(rd[ingress]["rows"]["model, batching on"]["32"]["rps"]
                                                     / rd[ingress]["rows"]["no-op Serve, batching on"]["32"]["rps"] for rd in rounds),
            "noop_rps_c32": noop[32]["rps"], "model_p99_c128": model[128]["p99_ms"], "model_errors_c128": model[128]["errors"],
            "model_p99_c128_cold": statistics.median(rd[ingress]["cold_c128"]["p99_ms"] for rd in rounds),
            "batching_gain_c128": model[128]["rps"] / rows[f"model, batching off ({ingress})"][128]["rps"],
            "cpu_ms_per_request": {setup: {k: statistics.median(rd[ingress]["cpu_ms_per_request"][setup].get(k, 0.0) for rd in rounds)
                                           for k in rounds[0][ingress]["cpu_ms_per_request"][setup]}
                                   for setup in rounds[0][ingress]["cpu_ms_per_request"]},
        }
    summary["haproxy_over_default_c32"] = summary["haproxy"]["model_rps_c32"] / summary["default proxy"]["model_rps_c32"]
    print(json.dumps(summary, indent=2))
    report = {"machine": machine(), "requests_per_level": args.requests, "rounds": args.rounds,
              "rows": rows, "raw_rounds": rounds, "summary": summary,
              "command": f"python -m bench.serve_load --requests {args.requests} --rounds {args.rounds}"}
    write_result("serve_load.json", report)


if __name__ == "__main__":
    main()
