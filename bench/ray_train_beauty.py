"""Full training runs on Amazon Beauty through the product's own commands, with 1 and 2 workers.

For each worker count: `ray-rec train` with the default config (early stopping on validation
NDCG@10), then `ray-rec evaluate` on the test split. Records wall time, epochs, the workers'
examples/s over the epochs after the first, and the test metrics (full ranking, seen items
excluded; 100 sampled negatives; popularity on the same users).

    python -m bench.ray_train_beauty [--workers 1 2] [--set train.patience=5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.model_quality import prepared
from bench.output import RESULTS, machine, write_json
from ray_rec.config import for_data, load_config, parse_overrides
from ray_rec.data.manifest import read_manifest
from ray_rec.train.worker import worker_batch

CLI = [sys.executable, "-m", "ray_rec.cli"]


def run(data: str, workers: int, sets: list[str]) -> dict:
    out = tempfile.mkdtemp(prefix=f"ray-rec-beauty-{workers}w-")
    extra = [a for s in sets for a in ("--set", s)] + ["--no-final-fit"]  # its figures are the split run's
    t0 = time.monotonic()
    subprocess.run([*CLI, "train", "--data", data, "--output", out, "--workers", str(workers), *extra], check=True)
    return summarise(data, out, workers, time.monotonic() - t0)


def batch(data: str, workers: int, sets: list[str]) -> dict[str, int]:
    """A step's examples, all workers together, and each worker's share, under ``sets``."""
    cfg = load_config(None, parse_overrides(sets))
    step = cfg.train.batch_for(for_data(cfg.model, read_manifest(data)))
    return {"step": step, "worker": worker_batch(step, workers)}


def summarise(data: str, out: str, workers: int, wall: float) -> dict:
    """The record of a finished run in ``out``: its metrics file, then `ray-rec evaluate` on test."""
    rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    rate = sum(r["examples_per_s"] * r["train_s"] for r in steady) / sum(r["train_s"] for r in steady)
    t1 = time.monotonic()
    ev = subprocess.run([*CLI, "evaluate", "--data", data, "--model", f"{out}/model"], check=True, capture_output=True, text=True)
    evaluate_s = time.monotonic() - t1
    metrics = json.loads([line for line in ev.stdout.splitlines() if line.startswith("{")][-1])
    best = max(rows, key=lambda r: r.get("val_NDCG@10", -1))
    return {"workers": workers, "wall_s": wall, "epochs": len(rows), "best_epoch": best["epoch"], "examples_per_s": rate,
            "train_s": sum(r["train_s"] for r in rows), "evaluate_s": evaluate_s, "test": metrics, "history": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--set", action="append", default=[], help="config override for both runs, SECTION.FIELD=VALUE")
    parser.add_argument("--existing", action="append", default=[], metavar="WORKERS=DIR:WALL_S",
                        help="record a run that already finished in DIR (wall seconds as its train command printed)")
    args = parser.parse_args()
    data = prepared("Beauty")
    out_file = RESULTS / "ray_train_Beauty.json"
    runs = json.loads(out_file.read_text())["runs"] if out_file.exists() else {}  # runs of other worker counts stay
    done = {}
    for spec in args.existing:
        w, _, rest = spec.partition("=")
        folder, _, wall = rest.rpartition(":")
        done[int(w)] = summarise(data, folder, int(w), float(wall))
    for w in args.workers:
        r = done.get(w) or run(data, w, args.set)
        r["batch"] = batch(data, w, args.set)
        r["command"] = f"python -m bench.ray_train_beauty --workers {w}" + "".join(f" --set {s}" for s in args.set)
        runs[str(w)] = r
        full = r["test"]["full_ranking"]
        print(f"[{w} worker(s)] {r['wall_s']:.0f} s wall, {r['epochs']} epochs (best {r['best_epoch']}), "
              f"{r['examples_per_s']:,.0f} examples/s; test {json.dumps({k: full[k] for k in ('HR@10', 'NDCG@10') if k in full})}",
              flush=True)
        report = {"dataset": "Beauty", "machine": machine(), "runs": runs,
                  "command": "python -m bench.ray_train_beauty (one row per --workers value; see each run's command)"}
        write_json(out_file, report)  # after every run, so a later failure loses nothing


if __name__ == "__main__":
    main()
