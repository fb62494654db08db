"""A replica SIGKILLed under load behind the HAProxy ingress, many times over: the requests that
fail for two kinds of client, side by side in one run.

Two replicas of a small model (`bench.serve_load.small_artifact`) behind HAProxy, as `ray-rec
serve` runs it; 8 clients post ``/v1/recommend`` in a loop, 4 with `ray_rec.serve.client`'s
`retrying_session` and 4 with a `requests` session that resends a request only when its connection
failed, at once (urllib3's retries, up to the same 3 tries). Every ``--every`` seconds one replica
is SIGKILLed and Serve starts another. A failed request is any answer but 200 (or an exception)
after the client's own resends. HAProxy's log, sent to a UDP listener in this process, counts the
ingress's own error answers by status and termination state (e.g. ``502 SH--``: the replica reset
the connection before answering).

    python -m bench.serve_kill [--kills 16] [--every 15]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Collection
from typing import Any

from bench.output import machine, this_ray, write_result
from bench.serve_load import free_port, small_artifact

CLIENTS = ("retrying_session", "resend on connection failure only")
INGRESS_ERROR = re.compile(r'\s(5\d\d) \d+ \S+ \S+ (\S{4}) ')  # HAProxy's httplog: status, bytes, cookies, term state


def immediate_session() -> Any:
    """A `requests` session that resends a request whose connection failed, at once, up to 3 tries."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=Retry(total=2, status=0, allowed_methods=None, raise_on_status=False)))
    return session


def listen(sock: socket.socket, counts: Counter, stop: threading.Event) -> None:
    """Count HAProxy's 5xx log lines by "status term-state" until ``stop``."""
    sock.settimeout(0.5)
    while not stop.is_set():
        try:
            line = sock.recv(65535).decode(errors="replace")
        except TimeoutError:
            continue
        match = INGRESS_ERROR.search(line)
        if match and "http_frontend" in line:
            counts[f"{match.group(1)} {match.group(2)}"] += 1


def replica_pids(app: str, count: int, killed: Collection[int] = (), timeout_s: float = 120) -> list[int]:
    """Process ids of the ``count`` live replicas of Serve app ``app``, leaving out the ``killed``
    ones, asked again until Ray's state API lists them (it lags Serve: a killed replica stays listed
    as alive for a while, a new one comes in late)."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while True:
        # The state API keeps its first `limit` matches (default 100) in actor-id order, which is random.
        actors = list_actors(address=this_ray(), filters=[("state", "=", "ALIVE")], detail=True, limit=10_000)
        pids = sorted(a.pid for a in actors if "RecommenderService" in (a.class_name or "") and f"{app}#" in (a.name or "")
                      and a.pid and a.pid not in killed)
        if len(pids) == count or time.monotonic() > deadline:
            return pids
        time.sleep(1)


def run(model_uri: str, kills: int, every: float) -> dict[str, Any]:
    """Start Ray and the two replicas, load them, kill one every ``every`` s ``kills`` times: each client kind's outcomes."""
    import ray
    import requests
    from ray import serve

    from ray_rec.ray_session import SERVING_WORKERS, worker_env
    from ray_rec.serve.app import RecommenderService, deployment_options
    from ray_rec.serve.client import retrying_session
    from ray_rec.serve.schemas import ServeArgs

    ray.init(address="local", num_cpus=6, logging_level=logging.WARNING, runtime_env={"env_vars": worker_env()},
             _system_config=SERVING_WORKERS)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = ServeArgs(model_uri=model_uri)
    app = RecommenderService.options(**{**deployment_options(args), "num_replicas": 2}).bind(args.model_dump())  # type: ignore[attr-defined]
    serve.run(app, name="two", route_prefix="/two")
    url = f"http://127.0.0.1:{port}/two/v1/recommend"
    stop, lock = threading.Event(), threading.Lock()
    outcomes: dict[str, Counter] = {name: Counter() for name in CLIENTS}

    def client(i: int, kind: str) -> None:
        session = retrying_session() if kind == CLIENTS[0] else immediate_session()
        while not stop.is_set():
            try:
                outcome = str(session.post(url, json={"history": [f"i{i + 1}"], "k": 3}, timeout=40).status_code)
            except requests.RequestException as exc:
                outcome = type(exc).__name__
            with lock:
                outcomes[kind][outcome] += 1

    threads = [threading.Thread(target=client, args=(i, CLIENTS[i % 2])) for i in range(8)]
    try:
        for t in threads:
            t.start()
        killed: set[int] = set()
        for k in range(kills):
            pids = replica_pids("two", 2, killed)
            time.sleep(every)
            os.kill(pids[0], signal.SIGKILL)
            killed.add(pids[0])
            with lock:
                failed = {kind: sum(n for o, n in c.items() if o != "200") for kind, c in outcomes.items()}
            print(f"kill {k + 1}/{kills}: failed so far {failed}", flush=True)
        time.sleep(every)
    finally:
        stop.set()
        for t in threads:
            t.join()
        serve.shutdown()
        ray.shutdown()
    return {kind: {"requests": sum(c.values()), "failed": sum(n for o, n in c.items() if o != "200"),
                   "outcomes": dict(c)} for kind, c in outcomes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=16, help="replicas SIGKILLed, one every --every seconds")
    parser.add_argument("--every", type=float, default=15, help="seconds of load before each kill, and after the last")
    parser.add_argument("--model", help="a model artifact to serve (default: train `small_artifact`'s)")
    args = parser.parse_args()

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    os.environ["RAY_SERVE_HAPROXY_LOG_TARGET"] = f"127.0.0.1:{sock.getsockname()[1]}"
    from ray_rec.ray_session import use_fast_ingress

    use_fast_ingress()  # before Ray starts, as `ray-rec serve` does
    counts: Counter = Counter()
    stop = threading.Event()
    listener = threading.Thread(target=listen, args=(sock, counts, stop), daemon=True)
    listener.start()
    started = time.monotonic()
    clients = run(args.model or small_artifact(tempfile.mkdtemp()), args.kills, args.every)
    stop.set()
    listener.join()
    report = {"machine": machine(), "kills": args.kills, "every_s": args.every, "clients": clients,
              "ingress_errors": dict(counts), "seconds": round(time.monotonic() - started),
              "command": f"python -m bench.serve_kill --kills {args.kills} --every {args.every:g}"
                         + (f" --model {args.model}" if args.model else "")}
    print(report)
    write_result("serve_kill.json", report)


if __name__ == "__main__":
    main()
