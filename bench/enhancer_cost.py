"""What the interest enhancement network costs: AUGRU (the default) and trend against none.

`none` is the SASRec-shaped model (the tracker's states scored directly), so the ratios are what
the enhancement network adds to training and to recommending. Times, in this one process, for
each enhancer: a training step (batch 128, full cross-entropy over the catalog: the default loss),
top-10 over the whole catalog for one user at a time (median over 64 users: what a served request
pays) and for 512 users in one batch. Two data shapes, each read through the product's own
example code:

* Amazon Beauty: short histories (8.9 clicks a user), history length 50;
* a generated log of long histories (``ray_rec.data.synthetic.bulk_log``: about 6,000 users
  averaging 125 clicks, 3,400 items, the shape of MovieLens-1M), history length 200 and dropout
  0.2, as the product chooses for it.

The enhancers take turns within each of ``--rounds`` rounds (so a drift in the machine's speed
falls on all of them) and every figure is the median over the rounds; the ratios against `none`
are taken within each round, then their median.

    python -m bench.enhancer_cost
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.model_quality import cached, prepared
from bench.output import machine, write_result
from bench.report import enhancer_cost_table
from ray_rec.config import ModelConfig, for_data, load_config
from ray_rec.data.local import InMemoryExamples
from ray_rec.data.manifest import read_manifest
from ray_rec.data.prepare import PrepareOptions, prepare
from ray_rec.data.synthetic import bulk_log
from ray_rec.model.interest_model import InterestModel
from ray_rec.predict.ranking import interests, top_k
from ray_rec.shape import LONG_HISTORY
from ray_rec.train.fit import train_step
from ray_rec.train.optim import make_optimizer

ENHANCERS = ("none", "augru", "trend")
BATCH = 128
USERS = 512  # the report's column says 512
SINGLE_USERS = 64


def long_history_data(events: int) -> str:
    """A prepared dataset of ``events`` generated events with long histories (cached)."""

    def make(out: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "events.parquet"
            pq.write_table(pa.concat_tables(bulk_log(events, items=3416, mean_clicks=165, seed=0)), src)
            prepare(PrepareOptions(input=str(src), output=out, format="events", num_shards=4))

    return cached(f"long_history_{events}", make)


class Case:
    """One enhancer on one data shape: its model, optimiser and the batches it is timed on."""

    def __init__(self, enhancer: str, mcfg: ModelConfig, data: dict[str, Any]) -> None:
        train = load_config(None).train
        torch.manual_seed(0)
        self.model = InterestModel(dataclasses.replace(mcfg, enhancer=enhancer))
        self.opt = make_optimizer(self.model, train)
        self.grad_clip = train.grad_clip
        self.data = data

    def train_ms(self) -> float:
        """Milliseconds per training step over the timed batches."""
        self.model.train()
        t0 = time.perf_counter()
        for batch in self.data["train"]:
            train_step(self.model, batch, self.opt, self.grad_clip)
        return (time.perf_counter() - t0) / len(self.data["train"]) * 1000

    def recommend_ms(self, users: dict[str, torch.Tensor]) -> float:
        self.model.eval()
        t0 = time.perf_counter()
        top_k(self.model, interests(self.model, users["items"], users.get("time_buckets")), 10, exclude=users["seen"])
        return (time.perf_counter() - t0) * 1000

    def warm_up(self) -> None:
        """First calls allocate and pick kernels: run them before any timing."""
        for batch in self.data["warm"]:
            train_step(self.model, batch, self.opt, self.grad_clip)
        self.recommend_ms(self.data["users"])

    def measure(self) -> dict[str, float]:
        return {"step_ms": self.train_ms(),
                "recommend_1_user_ms": median(self.recommend_ms(u) for u in self.data["single"]),
                "recommend_512_users_ms": self.recommend_ms(self.data["users"])}


def shape_data(data: str, steps: int, max_len: int | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config the product picks for ``data`` (with ``max_len``, that history length) and
    the batches every enhancer is timed on."""
    mcfg = for_data(load_config(None, {"model.max_len": max_len} if max_len else {}).model, read_manifest(data))
    train = InMemoryExamples.training(data, "train", mcfg.history_len, mcfg.time_buckets, 0)
    valid = InMemoryExamples.evaluation(data, "valid", mcfg.history_len, mcfg.time_buckets)
    return mcfg, {
        "warm": [b for _, b in zip(range(3), train.batches(BATCH, seed=1))],
        "train": [b for _, b in zip(range(steps), train.batches(BATCH, seed=0))],
        "users": next(iter(valid.batches(USERS))),
        "single": [b for _, b in zip(range(SINGLE_USERS), valid.batches(1))],
    }


def run_shape(name: str, data: str, steps: int, rounds: int, max_len: int | None = None) -> dict[str, Any]:
    mcfg, batches = shape_data(data, steps, max_len)
    cases = {e: Case(e, mcfg, batches) for e in ENHANCERS}
    for case in cases.values():
        case.warm_up()
    runs: dict[str, list[dict[str, float]]] = {e: [] for e in ENHANCERS}
    for r in range(rounds):
        for e, case in cases.items():
            runs[e].append(case.measure())
        print(f"[{name}] round {r + 1}/{rounds}: "
              + ", ".join(f"{e} step {runs[e][-1]['step_ms']:.0f} ms" for e in ENHANCERS), flush=True)
    keys = list(runs["none"][0])
    rows: dict[str, Any] = {}
    for e in ENHANCERS:
        rows[e] = {k: median(run[k] for run in runs[e]) for k in keys}
        rows[e]["ratio_to_none"] = {k: median(a[k] / b[k] for a, b in zip(runs[e], runs["none"])) for k in keys}
        rows[e]["runs"] = runs[e]
    clicks = sum(int((b["items"] > 0).sum()) for b in batches["train"]) / sum(len(b["items"]) for b in batches["train"])
    return {"history_len": mcfg.history_len, "dropout": mcfg.dropout_p, "items": mcfg.num_items,
            "timed_steps": steps, "mean_clicks_per_window": round(clicks, 1), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30,
                        help="timed training steps per enhancer and round (random batches of the first epoch)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds in which every enhancer takes a turn")
    parser.add_argument("--long-events", type=int, default=1_000_000, help="size of the generated long-history log")
    args = parser.parse_args()
    shapes = {"Beauty": prepared("Beauty"), "long histories (generated)": long_history_data(args.long_events)}
    report: dict[str, Any] = {"machine": machine(), "threads": torch.get_num_threads(), "shapes": {},
                              "command": " ".join(["python -m bench.enhancer_cost", *sys.argv[1:]])}
    for name, data in shapes.items():
        # Long histories at the longest window the product reads (`LONG_HISTORY.max_len`): the dearest case.
        longest = LONG_HISTORY.max_len if name.startswith("long") else None
        shape = report["shapes"][name] = run_shape(name, data, args.steps, args.rounds, longest)
        print(f"{name}: history length {shape['history_len']}, {shape['items']:,} items", flush=True)
    print("\n".join(enhancer_cost_table(report)), flush=True)
    write_result("enhancer_cost.json", report)


if __name__ == "__main__":
    main()
