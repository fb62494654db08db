"""The benchmark suite in one command: run the benchmarks, then write BENCHMARKS.md and plots.

    python -m bench                 # the full figures (about 4.5 hours on a 2-core machine)
    python -m bench --quick         # every benchmark at a small size (about 10 minutes), into
                                    # bench/results/quick/ so it never overwrites the full figures
    python -m bench --only serve scale   # some of them; the report is rebuilt from every result on disk
    python -m bench --report        # only rebuild BENCHMARKS.md and the plots from bench/results/

Each benchmark runs in its own process (a fresh Ray each) and writes JSON under the results
folder; the report reads only those files, so every figure in it names the command and machine
that produced it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.model_quality import VARIANTS
from bench.report import write_reliability, write_report

ROOT = Path(__file__).resolve().parent
FULL = {
    # The MLP relevance validates every 3rd epoch (patience 2: the same 6 epochs without progress),
    # as its stored row did: its full-catalog validation costs 23x the dot model's.
    "quality": [["bench.model_quality", "--dataset", "Beauty", "--variants", *(v for v in VARIANTS if v != "relevance=mlp")],
                ["bench.model_quality", "--dataset", "Beauty", "--variants", "relevance=mlp", "--patience", "2", "--eval-every", "3"],
                ["bench.model_quality", "--dataset", "Sports_and_Outdoors", "--variants", "default", "sasrec"]],
    "speed": [["bench.train_speed"], ["bench.shared_cores"], ["bench.loss_memory"], ["bench.ray_train_beauty"], ["bench.relevance_cost"]],
    "serve": [["bench.serve_load"]],
    "data": [["bench.data_scale"]],
    "scale": [["bench.topk_scale"]],
}
QUICK = {
    "quality": [["bench.model_quality", "--dataset", "Beauty", "--epochs", "2", "--variants", "default", "sasrec"]],
    "speed": [["bench.train_speed", "--synthetic", "--epochs", "2", "--rounds", "1"],
              ["bench.shared_cores", "--synthetic", "--epochs", "2", "--rounds", "1"],
              ["bench.loss_memory", "--sizes", "20000x1280"], ["bench.relevance_cost", "--steps", "3"]],
    "serve": [["bench.serve_load", "--requests", "100"]],
    "data": [["bench.data_scale", "--sizes", "200000", "400000"]],
    "scale": [["bench.topk_scale", "--catalogs", "10000", "100000", "--requests", "100", "--repeats", "10"]],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, results in bench/results/quick/")
    parser.add_argument("--only", nargs="+", choices=list(FULL), help="run only these benchmarks")
    parser.add_argument("--report", action="store_true", help="do not run anything; rebuild the report")
    args = parser.parse_args()
    results = ROOT / "results" / ("quick" if args.quick else "")
    results.mkdir(parents=True, exist_ok=True)
    plan = QUICK if args.quick else FULL
    failed = []
    if not args.report:
        for name in args.only or list(plan):
            for cmd in plan[name]:
                print(f"== {' '.join(['python -m', *cmd])}", flush=True)
                t0 = time.monotonic()
                rc = subprocess.call([sys.executable, "-m", *cmd], env={**os.environ, "RAY_REC_BENCH_RESULTS": str(results)})
                print(f"== {name}: rc {rc} in {time.monotonic() - t0:.0f} s", flush=True)
                if rc != 0:
                    failed.append(" ".join(cmd))
    out = write_report(results, ROOT.parent / "BENCHMARKS.md" if not args.quick else results / "BENCHMARKS.md", quick=args.quick)
    print(f"wrote {out}")
    if not args.quick:
        print(f"wrote {write_reliability(results, ROOT.parent / 'RELIABILITY.md')}")
    if failed:
        raise SystemExit(f"failed: {'; '.join(failed)}")


if __name__ == "__main__":
    main()
