"""The benchmark suite in one command: run the benchmarks, then write BENCHMARKS.md and plots.

    python -m bench                 # the full figures: every stored quality row retrained (the
                                    # README's Benchmarks intro gives the runs and hours, from
                                    # quality_runs()), then the timing benchmarks (~2 hours)
    python -m bench --jobs 2        # the same, training two quality runs at a time with one
                                    # thread each, as most stored rows were (half the hours + 2)
    python -m bench --quick         # every benchmark at a small size (about 13 minutes), into
                                    # bench/results/quick/ so it never overwrites the full figures
    python -m bench --only serve scale   # some of them; the report is rebuilt from every result on disk
    python -m bench --report        # only rebuild BENCHMARKS.md and the plots from bench/results/

Each benchmark runs in its own process (a fresh Ray each) and writes JSON under the results
folder; the report reads only those files, so every figure in it names the command and machine
that produced it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.output import STORED
from bench.report import write_reliability, write_report

ROOT = Path(__file__).resolve().parent


def quality(dataset: str, *args: str) -> list[str]:
    return ["bench.model_quality", "--dataset", dataset, *args]


# Every stored quality row, remade with the seeds and schedule it shows (tests check the two agree).
# The MLP relevance validates every 3rd epoch (patience 2: the same 6 epochs without progress),
# as its full-catalog validation costs about 10x the dot model's.
FULL = {
    "quality": [
        *(c for d in ("Beauty", "Sports_and_Outdoors") for c in (
            quality(d, "--variants", "default", "sasrec", "--seeds", "0", "1", "2"),
            # Sampled softmax as the product trains it (with in-batch negatives), and with uniform draws alone.
            quality(d, "--variants", "loss=sampled_softmax", "--seeds", "0", "1"),
            quality(d, "--variants", "loss=sampled_softmax", "--set", "model.in_batch_negatives=false", "--seeds", "0", "1"),
            quality(d, "--variants", "relevance=mlp", "--patience", "2", "--eval-every", "3"))),
        # 64 negatives on Beauty's 12,101 items: the share 2048 negatives are of a catalog of about 390,000.
        quality("Beauty", "--variants", "loss=sampled_softmax", "--set", "model.num_negatives=64", "--seeds", "0"),
        quality("Beauty", "--variants", "enhancer=trend", "tracker=gru", "--seeds", "0", "1"),
        quality("Beauty", "--epochs", "200", "--patience", "10", "--variants", "default", "sasrec", "--seeds", "0", "1", "2"),
        quality("Sports_and_Outdoors", "--variants", "enhancer=trend", "tracker=gru"),
        # Both models twice and four times as wide as the default (README "Model quality": the width study).
        quality("Beauty", "--variants", "default", "sasrec", "--set", "model.dim=128", "--seeds", "0", "1", "2"),
        quality("Beauty", "--variants", "default", "sasrec", "--set", "model.dim=256", "--seeds", "0", "1"),
        quality("Sports_and_Outdoors", "--variants", "default", "sasrec", "--set", "model.dim=128", "--seeds", "0", "1"),
        # Both models as the product trains them: the learning rate halved on validation plateaus.
        quality("Beauty", "--variants", "default", "sasrec", "--set", "train.lr_patience=3", "--seeds", "0", "1", "2"),
        quality("Sports_and_Outdoors", "--variants", "default", "sasrec", "--set", "train.lr_patience=3", "--seeds", "0", "1", "2"),
        # ... and through the product's own epochs and patience (200, 10), as `ray-rec train` runs them.
        quality("Beauty", "--epochs", "200", "--patience", "10", "--variants", "default", "sasrec", "--set", "train.lr_patience=3",
                "--seeds", "0", "1", "2"),
        # Both at twice the width with the halving: the two changes that each moved the default more than SASRec.
        quality("Beauty", "--variants", "default", "sasrec", "--set", "model.dim=128", "--set", "train.lr_patience=3",
                "--seeds", "0", "1", "2"),
        # One tracker layer instead of two, with the halving: the default (Beauty: three seeds, Sports: two), and
        # SASRec-shaped with the same one block (Beauty, three seeds).
        quality("Beauty", "--variants", "default", "sasrec", "--set", "model.tracker_layers=1", "--set", "train.lr_patience=3",
                "--seeds", "0", "1", "2"),
        quality("Sports_and_Outdoors", "--variants", "default", "--set", "model.tracker_layers=1", "--set", "train.lr_patience=3",
                "--seeds", "0", "1"),
        # The same default trained under bf16 autocast (train.precision), against its fp32 row above.
        quality("Beauty", "--variants", "default", "--set", "model.tracker_layers=1", "--set", "train.lr_patience=3",
                "--set", "train.precision=bf16", "--seeds", "0", "1", "2"),
        # One example per next click (model.examples=prefixes), as the product trains short histories: the default
        # (three seeds), its spectral tracker, and SASRec-shaped with its two blocks on the same prefixes.
        quality("Beauty", "--variants", "default", "--set", "model.tracker_layers=1", "--set", "train.lr_patience=3",
                "--set", "model.examples=prefixes", "--seeds", "0", "1", "2"),
        quality("Beauty", "--variants", "default", "--set", "model.tracker_layers=1", "--set", "train.lr_patience=3",
                "--set", "model.examples=prefixes", "--set", "model.tracker=spectral", "--seeds", "0"),
        quality("Beauty", "--variants", "sasrec", "--set", "train.lr_patience=3", "--set", "model.examples=prefixes",
                "--seeds", "0"),
        # The default with BERT's post-norm block, as BSARec uses it (`model.block=post_norm`).
        quality("Beauty", "--variants", "default", "--set", "model.tracker_layers=1", "--set", "train.lr_patience=3",
                "--set", "model.examples=prefixes", "--set", "model.block=post_norm", "--seeds", "0", "1", "2"),
        # ... and with two tracker layers, as BSARec's two blocks (the bench's pinned depth).
        quality("Beauty", "--variants", "default", "--set", "train.lr_patience=3", "--set", "model.examples=prefixes",
                "--set", "model.block=post_norm", "--seeds", "0"),
        # ... and with BSARec's attention mixed with a frequency filter (`model.tracker=spectral`).
        quality("Beauty", "--variants", "default", "--set", "model.tracker_layers=1", "--set", "train.lr_patience=3",
                "--set", "model.examples=prefixes", "--set", "model.block=post_norm", "--set", "model.tracker=spectral",
                "--seeds", "0"),
        # ... and at BSARec's learning rate (half the default's).
        quality("Beauty", "--variants", "default", "--set", "model.tracker_layers=1", "--set", "train.lr_patience=3",
                "--set", "model.examples=prefixes", "--set", "model.block=post_norm", "--set", "train.lr=0.0005",
                "--seeds", "0"),
        # The default reading a moving average of the validations (`train.smoothing`), as the product does.
        *(quality(d, "--variants", "default", "--set", "model.tracker_layers=1", "--set", "train.lr_patience=3",
                  "--set", "model.examples=prefixes", "--set", "train.smoothing=0.5", "--seeds", "0")
          for d in ("Beauty", "Sports_and_Outdoors")),
        # ... and with the post-norm block as well: the default as it ships (Sports).
        quality("Sports_and_Outdoors", "--variants", "default", "--set", "model.tracker_layers=1", "--set", "train.lr_patience=3",
                "--set", "model.examples=prefixes", "--set", "train.smoothing=0.5", "--set", "model.block=post_norm", "--seeds", "0"),
    ],
    # The product as a user runs it (final fit included) against a plain SASRec, on the real next click, all
    # pre-norm but the last: the default as it was before it trained long histories on prefixes and read a
    # moving average of the validations (windows, raw validations), and before that under the schedule and
    # window it had before they followed the data's shape; the default on prefixes with raw validations (two
    # seeds); the default as it shipped before the post-norm block; the default as it is (post-norm, one seed).
    "next_click": [["bench.next_click", "--dataset", "ml-100k", "--variants", *v, "--seeds", "0", "1", "2"] for v in (
        ["default", "--set", "model.examples=windows", "--set", "train.smoothing=0", "--set", "model.block=pre_norm"],
        ["default", "--set", "train.patience_steps=0", "--set", "train.lr_patience_steps=0", "--set", "model.max_len=200",
         "--set", "model.examples=windows", "--set", "train.smoothing=0", "--set", "model.block=pre_norm"],
        ["plain-sasrec"], ["sasrec-all-windows"])] + [
        ["bench.next_click", "--dataset", "ml-100k", "--variants", "default", "--set", "model.examples=prefixes",
         "--set", "train.smoothing=0", "--set", "model.block=pre_norm", "--seeds", "0", "1"],
        ["bench.next_click", "--dataset", "ml-100k", "--variants", "default", "--set", "model.block=pre_norm", "--seeds", "0", "1", "2"],
        ["bench.next_click", "--dataset", "ml-100k", "--variants", "default", "--set", "model.block=post_norm", "--seeds", "0"]],
    "speed": [["bench.train_speed"], ["bench.shared_cores"], ["bench.loss_memory"], ["bench.sparse_items"], ["bench.ray_train_beauty"], ["bench.relevance_cost"],
              ["bench.enhancer_cost"]],
    "serve": [["bench.serve_load", "--requests", "1000", "--rounds", "3"], ["bench.serve_start", "--rounds", "3"],
              ["bench.serve_load", "--by-user-id", "--requests", "2000", "--rounds", "3"], ["bench.serve_kill", "--kills", "16", "--every", "15"]],
    "data": [["bench.data_scale", "--sizes", "2000000", "20000000", "40000000"],
             ["bench.data_scale", "--nodes", "1", "2", "--sizes", "20000000", "40000000"]],
    "reliability": [["bench.reliability"]],
    "cluster": [["bench.cluster"]],
    # The CPU baseline of the GPU check (bench/gpu_check.sh runs the GPU side on a GPU machine).
    "gpu": [["bench.gpu_check", "--device", "cpu", "--parts", "speed", "recommend", "pipeline", "ray_train", "serve"]],
    "explain": [["bench.explain", "--dataset", "Beauty"]],
    "scale": [["bench.topk_scale", "--catalogs", "10000", "100000", "1000000", "--requests", "200"],
              ["bench.recommend_many", "--users", "20000", "--items", "20000", "--rounds", "3"],
              ["bench.recommend_many", "--call", "evaluate", "--users", "2048", "--items", "1000000", "--rounds", "3"]],
}
QUICK = {
    "quality": [["bench.model_quality", "--dataset", "Beauty", "--epochs", "2", "--variants", "default", "sasrec"]],
    "next_click": [["bench.next_click", "--dataset", "ml-100k", "--variants", "default", "--set", "train.epochs=2"]],
    "speed": [["bench.train_speed", "--synthetic", "--epochs", "2", "--rounds", "1"],
              ["bench.shared_cores", "--synthetic", "--epochs", "2", "--rounds", "1"],
              ["bench.loss_memory", "--sizes", "20000x1280"], ["bench.sparse_items", "--items", "200000", "--steps", "3"],
              ["bench.relevance_cost", "--steps", "3"],
              ["bench.enhancer_cost", "--steps", "2", "--rounds", "1", "--long-events", "100000"]],
    "serve": [["bench.serve_load", "--requests", "100", "--rounds", "1"], ["bench.serve_start", "--rounds", "1"],
              ["bench.serve_load", "--by-user-id", "--requests", "100", "--rounds", "1"], ["bench.serve_kill", "--kills", "2", "--every", "8"]],
    "data": [["bench.data_scale", "--sizes", "200000", "400000"],
             ["bench.data_scale", "--nodes", "1", "2", "--sizes", "200000", "400000"]],
    "cluster": [["bench.cluster", "--epochs", "3"]],
    "gpu": [["bench.gpu_check", "--device", "cpu", "--quick"]],
    "explain": [["bench.explain", "--dataset", "Beauty", "--set", "train.epochs=1", "--users", "200", "--requests", "100",
                 "--rounds", "1"]],
    "scale": [["bench.topk_scale", "--catalogs", "10000", "100000", "--requests", "100", "--repeats", "10"],
              ["bench.recommend_many", "--users", "2000", "--items", "5000", "--rounds", "1"],
              ["bench.recommend_many", "--call", "evaluate", "--users", "1024", "--items", "100000", "--rounds", "1"]],
}


def quality_runs(results: Path = STORED) -> tuple[int, float]:
    """The training runs the full suite's quality commands make (a run per variant and seed), and
    their seconds as the stored rows record them (each row's mean per seed, times its seeds)."""
    from bench.model_quality import parse_args, row_name

    plan = [parse_args(cmd[1:]) for cmd in FULL["quality"]]
    rows = {d: json.loads((results / f"model_quality_{d}.json").read_text())["rows"] for d in {a.dataset for a in plan}}
    runs, seconds = 0, 0.0
    for args in plan:
        for variant in args.variants:
            row = rows[args.dataset][row_name(variant, args.epochs, args.patience, args.eval_every, args.set)]
            runs += len(args.seeds)
            seconds += row["seconds"] * len(args.seeds)
    return runs, seconds


def run(name: str, cmd: list[str], env: dict[str, str]) -> int:
    """Run one benchmark command in its own process; its exit status."""
    print(f"== {' '.join(['python -m', *cmd])}", flush=True)
    t0 = time.monotonic()
    rc = subprocess.call([sys.executable, "-m", *cmd], env=env)
    print(f"== {name}: rc {rc} in {time.monotonic() - t0:.0f} s: {' '.join(cmd)}", flush=True)
    return rc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, results in bench/results/quick/")
    parser.add_argument("--only", nargs="+", choices=list(FULL), help="run only these benchmarks")
    parser.add_argument("--report", action="store_true", help="do not run anything; rebuild the report")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run this many quality commands at a time, the cores shared out among them "
                             "(timing benchmarks always run alone)")
    args = parser.parse_args()
    results = STORED / ("quick" if args.quick else "")
    results.mkdir(parents=True, exist_ok=True)
    plan = QUICK if args.quick else FULL
    failed: list[str] = []
    if not args.report:
        env = {**os.environ, "RAY_REC_BENCH_RESULTS": str(results)}
        for name in args.only or list(plan):
            jobs = max(1, args.jobs) if name == "quality" else 1
            # Side by side, each training process gets its share of the cores (unless the user set it).
            cmd_env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs)), **env} if jobs > 1 else env
            with ThreadPoolExecutor(jobs) as pool:
                rcs = list(pool.map(functools.partial(run, name, env=cmd_env), plan[name]))
            failed += [" ".join(cmd) for cmd, rc in zip(plan[name], rcs) if rc != 0]
    out = write_report(results, ROOT.parent / "BENCHMARKS.md" if not args.quick else results / "BENCHMARKS.md", quick=args.quick)
    print(f"wrote {out}")
    if not args.quick:
        print(f"wrote {write_reliability(results, ROOT.parent / 'RELIABILITY.md')}")
    if failed:
        raise SystemExit(f"failed: {'; '.join(failed)}")


if __name__ == "__main__":
    main()
