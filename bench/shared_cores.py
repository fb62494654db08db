"""Training on cores shared with other work: OpenMP threads that spin against threads that sleep.

A Ray training worker rarely has its node to itself: Ray Data tasks, Serve replicas, Ray's own
processes or another job run beside it. `ray_rec.ray_session.worker_env` sets
``OMP_WAIT_POLICY=PASSIVE`` for every worker of the job. This measures why: the plain training
loop (the default model, batch 128, one intra-op thread per core) runs in a fresh process per run,
with the OpenMP wait policy left unset (the library default: spin a while, then sleep) or
``PASSIVE``, on idle cores and with ``--busy`` cores held by busy-loop processes; a one-thread run
is the reference for the busy case. Conditions alternate within each round (the machine's speed
drifts between rounds), and ratios are taken within the round, then the median over rounds.

    python -m bench.shared_cores                 # Amazon Beauty from ../shared/data
    python -m bench.shared_cores --synthetic     # a generated log instead
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from statistics import median

from bench.model_quality import prepared
from bench.output import machine, write_result

SPIN = [sys.executable, "-c", "while True: pass"]


@contextmanager
def busy(n: int) -> Iterator[None]:
    """``n`` processes that each hold a core for as long as the block runs."""
    procs = [subprocess.Popen(SPIN) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run(data: str, epochs: int, threads: int, policy: str | None) -> float:
    """Examples/s of the plain loop in a fresh process (OpenMP reads its settings at start)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, "-m", "bench.shared_cores", "--child", data, "--epochs", str(epochs), "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def child(data: str, epochs: int, threads: int) -> None:
    import torch

    from bench.train_speed import plain_loop

    torch.set_num_threads(threads)
    print(plain_loop(data, {"train.batch_size": 128}, epochs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy", type=int, default=1, help="cores held by busy loops in the shared runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.epochs, args.threads)
    from bench.train_speed import synthetic_dataset
    from ray_rec.ray_session import usable_cores

    data, name = (synthetic_dataset(), "synthetic") if args.synthetic else (prepared("Beauty"), "Beauty")
    n = usable_cores()
    # (label, busy cores, threads, wait policy); the unset policy and PASSIVE alternate.
    shared = f"{args.busy} of {n} cores busy"
    conditions = [("idle cores, policy unset", 0, n, None), ("idle cores, PASSIVE", 0, n, "PASSIVE"),
                  (f"{shared}, policy unset", args.busy, n, None), (f"{shared}, PASSIVE", args.busy, n, "PASSIVE"),
                  (f"{shared}, 1 thread", args.busy, 1, None)]
    rates: dict[str, list[float]] = {c[0]: [] for c in conditions}
    for r in range(args.rounds):
        for label, held, threads, policy in conditions:
            with busy(held):
                rates[label].append(run(data, args.epochs, threads, policy))
            print(f"round {r + 1}, {label} ({threads} threads): {rates[label][-1]:,.0f} examples/s", flush=True)

    def ratio(a: str, b: str) -> float:
        return median(x / y for x, y in zip(rates[a], rates[b]))

    idle = ratio("idle cores, PASSIVE", "idle cores, policy unset")
    busy_ratio = ratio(f"{shared}, PASSIVE", f"{shared}, policy unset")
    print(f"PASSIVE / unset: idle cores {idle:.2f}x, {shared} {busy_ratio:.2f}x", flush=True)
    report = {"dataset": name, "machine": machine(n), "threads": n, "busy": args.busy,
              "rows": [{"label": c[0], "threads": c[2], "examples_per_s": median(rates[c[0]]), "runs": rates[c[0]]}
                       for c in conditions],
              "passive_vs_unset_idle": idle, "passive_vs_unset_shared": busy_ratio,
              "command": " ".join(["python -m bench.shared_cores", *sys.argv[1:]])}
    write_result(f"shared_cores_{name}.json", report, indent=1)


if __name__ == "__main__":
    main()
