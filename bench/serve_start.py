"""Serve start-up on busy cores: `ray-rec serve`'s start path at Ray's worker priority and at ray-rec's.

Ray starts its worker processes, the Serve proxy and replicas among them, at niceness 15. When
every core is held by work at normal priority (a training run; busy-loop processes here), such a
process gets a few percent of a core: the proxy cannot answer Serve's 5 s readiness checks while
it imports, is killed and restarted, and `serve.start` fails. A local Ray
that ray-rec starts to serve (`init_ray(serving=True)`: `ray-rec serve`, the demo) runs its
workers at niceness 0 instead.

Each start runs in a fresh process with its own local Ray, as `ray-rec serve` does: `init_ray`,
`serve.start` + `serve.run` of a small trained artifact, then one `/v1/recommend` request; the
time is from before `init_ray` to that request's answer. Conditions (idle cores or ``--busy``
busy-loop processes; Ray's worker priority or ray-rec's) alternate within each round.

The busy loops run in the start's own session. Linux's autogroup (``sched_autogroup_enabled``)
first shares the CPU out between sessions, and niceness only orders processes within one; work in
the same container (a non-root CPU cgroup, where autogroup does not apply) or started from the
same shell session competes with Ray's workers directly, and that is the case measured here.

    python -m bench.serve_start [--rounds 3] [--busy N]
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
import time
from statistics import median
from typing import Any

from bench.output import machine, write_result
from bench.serve_load import free_port, small_artifact
from bench.shared_cores import busy
from ray_rec.ray_session import usable_cores

WORKERS = {"Ray's default (niceness 15)": False, "ray-rec serving (niceness 0)": True}


def child(model: str, serving: bool) -> None:
    """One start, as `ray-rec serve` does it; prints one JSON line."""
    import urllib.request

    import ray
    from ray import serve

    from ray_rec.ray_session import init_ray
    from ray_rec.serve.local import start

    t0 = time.perf_counter()
    result: dict[str, Any] = {"ok": False}
    try:
        init_ray(1, serving=serving)
        url = start(model, port=free_port())
        body = json.dumps({"history": ["i1", "i2", "i3"], "k": 5}).encode()
        req = urllib.request.Request(url + "/v1/recommend", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
        result = {"ok": True}
    except Exception as e:  # the failure is the measurement: report it, then clean up
        result["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result), flush=True)
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def one_start(model: str, serving: bool, timeout_s: float) -> dict[str, Any]:
    """A start in a fresh process (its own local Ray); killed with its Ray after ``timeout_s``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    cmd = [sys.executable, "-m", "bench.serve_start", "--child", model, *(["--serving"] if serving else [])]
    # Its own process group (to kill it with its Ray), in this session: the busy loops' autogroup.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            process_group=0)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # with its GCS and raylet (its group); their workers exit with them
        proc.communicate()
        return {"ok": False, "seconds": timeout_s, "error": f"no answer within {timeout_s:.0f} s"}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        last = next((line for line in reversed(err.splitlines()) if line.strip()), "")
        return {"ok": False, "seconds": float("nan"), "error": f"the start process exited with {proc.returncode}: {last}"}
    return dict(json.loads(lines[-1]))


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per condition: starts answered, their median seconds, and each failure's seconds."""
    rows = []
    for load in ("idle", "busy"):
        for workers in WORKERS:
            these = [r for r in runs if r["load"] == load and r["workers"] == workers]
            ok = [r["seconds"] for r in these if r["ok"]]
            failures: dict[str, list[float]] = {}
            for r in these:
                if not r["ok"]:
                    failures.setdefault(r["error"], []).append(r["seconds"])
            rows.append({"load": load, "workers": workers, "answered": len(ok), "starts": len(these),
                         "median_s": median(ok) if ok else None, "failures": failures})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=usable_cores(),
                        help="busy-loop processes in the busy condition (default: one per usable core)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a start counts as hung")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--serving", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.serving)
        return

    model = small_artifact(tempfile.mkdtemp(prefix="serve-start-"))
    runs: list[dict[str, Any]] = []
    for rnd in range(1, args.rounds + 1):
        for load in ("idle", "busy"):
            for workers, serving in WORKERS.items():
                with busy(args.busy) if load == "busy" else contextlib.nullcontext():
                    r = one_start(model, serving, args.timeout)
                runs.append({"round": rnd, "load": load, "workers": workers, **r})
                outcome = f"answered in {r['seconds']:.1f} s" if r["ok"] else f"FAILED after {r['seconds']:.1f} s: {r['error']}"
                print(f"round {rnd}, {load} cores, workers at {workers}: {outcome}", flush=True)
    summary = summarise(runs)
    print(json.dumps(summary, indent=2))
    report = {"machine": machine(), "busy": args.busy, "runs": runs,
              "summary": summary, "command": f"python -m bench.serve_start --rounds {args.rounds}"}
    write_result("serve_start.json", report)


if __name__ == "__main__":
    main()
