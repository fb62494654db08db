"""Model quality on the Amazon sequence files under the standard protocol.

Leave-one-out (last item = test, second-to-last = validation), full ranking over all items with
the user's seen items excluded, HR@k / NDCG@k on test for the default model and its ablations,
each trained in this process with the plain PyTorch loop and early stopping on validation NDCG@10.

    python -m bench.model_quality                         # Beauty, every variant
    python -m bench.model_quality --variants default sasrec --dataset Sports_and_Outdoors
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.output import RESULTS, STORED, machine, write_json
from ray_rec.config import load_config, parse_overrides
from ray_rec.data.manifest import read_manifest
from ray_rec.data.prepare import PrepareOptions, prepare

# The shared data sets beside the checkout; RAY_REC_SHARED_DATA names another folder holding <dataset>.txt
# (a GPU machine gets Beauty.txt carried with the tree, see bench/gpu_check.sh).
SHARED = Path(os.environ.get("RAY_REC_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon")
# Prepared data sets are cached apart from the results (bench.output.RESULTS).
CACHE = STORED / "cache"

# Each variant changes only what its name says against the default model.
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    # The SASRec-shaped baseline is also the enhancer=none ablation: transformer, no enhancer, dot,
    # full cross-entropy (the default auxiliary-loss weight is 0 already).
    "sasrec": {"model.enhancer": "none", "model.aux_loss_weight": 0.0},
    "enhancer=trend": {"model.enhancer": "trend"},
    "tracker=gru": {"model.tracker": "gru"},
    "relevance=mlp": {"model.relevance": "mlp"},
    # What a catalog too large for the full softmax trains with (`loss: auto` above 10M items x length).
    "loss=sampled_softmax": {"model.loss": "sampled_softmax"},
}
# The benchmark's training schedule; runs under another one get rows of their own (see row_name).
# Its learning rate is constant (`train.lr_patience` 0), as every row was trained before the product
# learned to halve it on plateaus; rows with `--set train.lr_patience=3` train as the product does.
EPOCHS, PATIENCE = 60, 6
# Patience counts validations alone (the floors in steps came later, and never bind on these data
# sets' 176-300 steps an epoch at the product's patience), and the exported model is not measured
# here, so no final fit.
# The schedule reads each validation as it is (`train.smoothing` 0), as before it read their moving
# average; rows with `--set train.smoothing=0.5` read it as the product does.
SCHEDULE = {"train.lr_patience": 0, "train.patience_steps": 0, "train.lr_patience_steps": 0, "train.final_fit": False,
            "train.smoothing": 0.0}
# The tracker's depth every row was trained at before the product went to one layer on short
# histories (`ray_rec.config.SHORT_HISTORY`): two, SASRec's own. Pinned, so the stored rows stay
# reproducible and the SASRec-shaped row stays SASRec's two blocks; rows with
# `--set model.tracker_layers=1` train the product's default model. Likewise the training examples:
# windows, as every row was trained before the product went to one example per next click on short
# histories; rows with `--set model.examples=prefixes` train as the product does. And the block: SASRec's
# pre-norm, as every row was trained before the product went to BERT's post-norm block; rows with
# `--set model.block=post_norm` train as the product does.
MODEL = {"model.tracker_layers": 2, "model.examples": "windows", "model.block": "pre_norm"}
KEYS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")
# Which model code a row was trained by; bumped when a change to the code (not to a setting) changes
# what every row would train. Rows from an earlier revision stay, marked as such in the report; a
# row trained again starts over at the current one (its old seeds are dropped, never mixed in).
# 2: every embedding initialised at N(0, 0.02) (the position, time and side tables were N(0, 1)).
MODEL_REVISION = 2
REVISIONS = {1: "before the embedding initialisation was fixed (every row up to commit 442494c)"}


def revision_note(revision: int, mark: str = "†") -> str:
    """The report's footnote for rows trained by the model code of an earlier ``revision``."""
    return (f"{mark} Trained by the model code {REVISIONS.get(revision, f'of revision {revision}')}: kept as measured; "
            "its command trains the current code, which gives other figures.")

PUBLISHED = {"Beauty": {"ICLRec (released model)": {"HR@10": 0.0744, "NDCG@10": 0.0403, "HR@20": 0.1058, "NDCG@20": 0.0483}}}


def cached(name: str, make: Callable[[str], object]) -> str:
    """The dataset folder CACHE/``name``, made by ``make(folder)`` unless a complete one is there.
    Benchmarks started side by side share the cache: one prepares, the others wait for it."""
    out = CACHE / name
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            read_manifest(str(out))
        except ValueError:
            make(str(out))
    return str(out)


def prepared(dataset: str) -> str:
    src = SHARED / f"{dataset}.txt"
    if not src.exists():
        raise SystemExit(f"{src} not found: this benchmark reads the shared data sets beside the checkout")
    return cached(dataset, lambda out: prepare(PrepareOptions(input=str(src), output=out, format="seqtxt", num_shards=4)))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="Beauty")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="at most this many epochs per variant")
    parser.add_argument("--patience", type=int, default=PATIENCE, help="validations without a better NDCG@10 before stopping")
    parser.add_argument("--eval-every", type=int, default=1,
                        help="validate every this many epochs (the MLP relevance's full-catalog validation is slow)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="train each variant once per seed (model init and example order); rows show the mean")
    parser.add_argument("--set", action="append", default=[], help="extra override for every variant, k=v")
    return parser.parse_args(argv)


def main() -> None:
    from ray_rec.train.local import train_local  # torch: not imported by `python -m bench --report`

    args = parse_args()
    data = prepared(args.dataset)
    out = RESULTS / f"model_quality_{args.dataset}.json"
    # Rows of variants not run this time stay (each row names its own command), so the ablations
    # can be run one at a time, or side by side, and the report is written after every seed.
    # The popularity row, once per data set, computed outside the report's lock (runs side by side wait on it).
    if not out.exists() or "popularity" not in json.loads(out.read_text())["rows"]:
        pop = {**popularity(data), "best_epoch": 0, "seconds": 0, "overrides": {},
               "command": f"python -m bench.model_quality --dataset {args.dataset}"}
        update_report(out, args.dataset, "popularity", lambda old: old or pop)
    for name in args.variants:
        for seed in args.seeds:
            overrides = {**SCHEDULE, **MODEL, "train.epochs": args.epochs, "train.patience": args.patience, "train.eval_every": args.eval_every,
                         "train.seed": seed, "data.seed": seed, **VARIANTS[name]}
            overrides.update(parse_overrides(args.set))  # as `ray-rec train --set` reads them
            row = row_name(name, args.epochs, args.patience, args.eval_every, args.set)
            tag = row if seed == 0 else f"{row} seed {seed}"
            run = train_local(data, load_config(None, overrides), log=tagged(tag))
            result = {**{k: run.test[k] for k in KEYS}, "best_epoch": run.best_epoch, "seconds": round(run.seconds),
                      "history": run.history}
            command = (f"python -m bench.model_quality --dataset {args.dataset} --epochs {args.epochs} "
                       f"--patience {args.patience}" + (f" --eval-every {args.eval_every}" if args.eval_every != 1 else "")
                       + f" --variants {name}" + "".join(f" --set {s}" for s in args.set))
            report = update_report(out, args.dataset, row, functools.partial(
                add_seed, seed=seed, result=result, overrides=VARIANTS[name], command=command))
            print(f"[{tag}] test {json.dumps({k: v for k, v in result.items() if k != 'history'})}", flush=True)
    print(markdown(report))
    print(f"wrote {out}")


def row_name(variant: str, epochs: int, patience: int, eval_every: int = 1, sets: Sequence[str] = ()) -> str:
    """A variant's row; another schedule than the benchmark's, or `--set` overrides, make a row of
    their own beside it (never overwriting the variant's own row)."""
    extra = f" with {', '.join(sets)}" if sets else ""
    if (epochs, patience, eval_every) == (EPOCHS, PATIENCE, 1):
        return variant + extra
    every = f", validated every {eval_every} epochs" if eval_every != 1 else ""
    return f"{variant} ({epochs} epochs{every}, patience {patience}){extra}"


def tagged(tag: str) -> Callable[[str], None]:
    """A progress printer that prefixes each line with the run it belongs to."""
    return lambda message: print(f"[{tag}] {message}", flush=True)


def update_report(out: Path, dataset: str, row: str, make: Callable[[dict | None], dict]) -> dict:
    """Set ``row`` of the report stored in ``out`` to ``make(its stored value)``, atomically.

    The rows are read again under a lock, so benchmarks run side by side on one data set (each
    writing after every seed) keep each other's rows instead of the last writer's copy winning.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(out.read_text())["rows"] if out.exists() else {}
        rows[row] = make(rows.get(row))
        report = {"dataset": dataset, "machine": machine(),
                  "rows": ordered(rows),
                  "published": PUBLISHED.get(dataset, {}),
                  "total_seconds": sum(x["seconds"] for r in rows.values() for x in r.get("runs", {"0": r}).values()),
                  "command": f"python -m bench.model_quality --dataset {dataset} (one row per variant; see each row's command)"}
        write_json(out, report)
    return report


def ordered(rows: dict) -> dict:
    """Rows in VARIANTS order, then any others kept from earlier runs, popularity last."""
    names = [*VARIANTS, *(k for k in rows if k not in VARIANTS and k != "popularity"), "popularity"]
    return {k: rows[k] for k in names if k in rows}


def add_seed(row: dict | None, seed: int, result: dict, overrides: dict, command: str) -> dict:
    """A variant's row with one more seed's test metrics: the metrics are the mean over its seeds.

    ``runs`` keeps each seed's metrics and ``histories`` each seed's training curve; a row from
    before seeds were recorded (one ``history``) counts as seed 0.
    """
    if row is not None and row.get("model_revision", 1) != MODEL_REVISION:
        row = None  # trained by other model code: its seeds are not this one's
    runs = dict((row or {}).get("runs") or ({"0": {k: row[k] for k in (*KEYS, "best_epoch", "seconds")}} if row else {}))
    histories = dict((row or {}).get("histories") or ({"0": row["history"]} if row and row.get("history") else {}))
    runs[str(seed)] = {k: result[k] for k in (*KEYS, "best_epoch", "seconds")}
    histories[str(seed)] = result["history"]
    seeds = sorted(runs, key=int)
    mean = {k: sum(runs[s][k] for s in seeds) / len(seeds) for k in KEYS}
    ndcg = [runs[s]["NDCG@10"] for s in seeds]
    std = (sum((x - mean["NDCG@10"]) ** 2 for x in ndcg) / (len(ndcg) - 1)) ** 0.5 if len(ndcg) > 1 else 0.0
    return {**mean, "NDCG@10_std": std, "seeds": [int(s) for s in seeds],
            "best_epoch": runs[seeds[0]]["best_epoch"], "best_epochs": [runs[s]["best_epoch"] for s in seeds],
            "seconds": round(sum(runs[s]["seconds"] for s in seeds) / len(seeds)), "overrides": overrides,
            "histories": histories, "runs": runs, "model_revision": MODEL_REVISION,
            "command": command + (" --seeds " + " ".join(seeds) if seeds != ["0"] else "")}


def popularity(data: str) -> dict[str, float]:
    """Test metrics of ranking by click count in the train split (seen items excluded)."""
    import numpy as np
    import torch

    from ray_rec.data.local import InMemoryExamples, read_split
    from ray_rec.metrics import DEFAULT_KS, RankingMetrics, full_ranks
    from ray_rec.predict.evaluate import count_clicks, popularity_scores

    clicks = count_clicks(read_split(data, "train"))["item"]
    counts = np.bincount(clicks, minlength=read_manifest(data).counts.items + 1).astype(np.float64)
    scores = torch.tensor(popularity_scores(counts), dtype=torch.float64)
    acc = RankingMetrics(DEFAULT_KS)
    for batch in InMemoryExamples.evaluation(data, "test", 50, 16).batches(1024):
        acc.add(full_ranks(scores.unsqueeze(0).expand(len(batch["targets"]), -1), batch["targets"], batch["seen"]))
    result = acc.result()
    return {k: result[k] for k in ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")}


def markdown(report: dict) -> str:
    from bench.report import quality_table

    return "\n".join(quality_table(report))


if __name__ == "__main__":
    main()
