"""Training throughput: the plain PyTorch loop against the Ray trainer with 1 and 2 workers.

Same model, data and batch size, run one after the other in this process; the plain loop runs
first and again last, and the ratios use the mean of its two rates. The Ray figures are
the workers' own examples/s over the epochs after the first (which warms up and fills the
worker's example cache, `data.cache_mb`), so they show what Ray and Ray Data cost per example once
running. A third Ray run streams every epoch through Ray Data (`data.cache_mb=0`, as a data set
too large for the cache does), with the next epoch's execution running alongside. The fixed
start-up seconds (wall time minus epochs x steady epoch time) are reported apart.

    python -m bench.train_speed                 # Amazon Beauty from ../shared/data
    python -m bench.train_speed --synthetic     # a generated log instead
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from bench.model_quality import RESULTS, prepared
from ray_rec.config import load_config, with_catalog
from ray_rec.data.examples import browse_width
from ray_rec.data.local import InMemoryExamples
from ray_rec.data.prepare import PrepareOptions, prepare, read_manifest
from ray_rec.model.interest_model import InterestModel
from ray_rec.train.loop import make_optimizer, train_step


def plain_loop(data: str, overrides: dict, epochs: int) -> float:
    """Examples/s of the single-process loop over the epochs after the first."""
    import torch

    cfg = load_config(None, overrides)
    m = read_manifest(data)
    mcfg = with_catalog(cfg.model, m["counts"]["items"], m["side_features"], m["has_time"])
    torch.manual_seed(0)
    model = InterestModel(mcfg)
    opt = make_optimizer(model, cfg.train)
    ex = InMemoryExamples.training(data, "train", mcfg.max_len, mcfg.time_buckets, browse_width(m))
    seconds, n = 0.0, 0
    for epoch in range(epochs):
        t0 = time.monotonic()
        for batch in ex.batches(cfg.train.batch_size, seed=epoch):
            train_step(model, batch, opt, cfg.train.grad_clip)
            n += batch["items"].shape[0] if epoch else 0
        seconds += time.monotonic() - t0 if epoch else 0.0
    return n / seconds


def ray_trainer(data: str, overrides: dict, epochs: int, workers: int) -> dict:
    from ray_rec.train.trainer import train

    cfg = load_config(None, {**overrides, "train.epochs": epochs, "train.eval_every": 1000, "train.patience": 1000})
    with tempfile.TemporaryDirectory() as out:
        t0 = time.monotonic()
        train(data, out, cfg, workers=workers)
        wall = time.monotonic() - t0
        rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:]  # every epoch after the first, with the next epoch's prefetch running
    epoch_s = sum(r["train_s"] for r in steady) / len(steady)
    rate = sum(r["examples_per_s"] * r["train_s"] for r in steady) / sum(r["train_s"] for r in steady)
    return {"examples_per_s": rate, "wall_s": wall, "fixed_s": wall - epoch_s * len(rows), "epochs": len(rows),
            "data_wait_s": [r["data_wait_s"] for r in rows], "epoch_s": [r["train_s"] for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run; the first is warm-up")
    args = parser.parse_args()
    if args.synthetic:
        import pyarrow.parquet as pq

        from ray_rec.data.synthetic import SyntheticSpec, generate

        tmp = tempfile.mkdtemp()
        log, _ = generate(SyntheticSpec(users=5000, items=1000))
        pq.write_table(log, f"{tmp}/events.parquet")
        data = f"{tmp}/data"
        prepare(PrepareOptions(input=f"{tmp}/events.parquet", output=data, num_shards=4))
        name = "synthetic"
    else:
        data, name = prepared("Beauty"), "Beauty"
    overrides = {"train.batch_size": 128}
    from ray_rec.ray_session import init_ray

    plain = plain_loop(data, overrides, args.epochs)
    print(f"plain PyTorch loop: {plain:,.0f} examples/s", flush=True)
    init_ray(2)
    one = ray_trainer(data, overrides, args.epochs, 1)
    print(f"Ray trainer, 1 worker: {one['examples_per_s']:,.0f} examples/s ({one['examples_per_s'] / plain:.2f}x plain); "
          f"fixed cost {one['fixed_s']:.1f} s", flush=True)
    streaming = ray_trainer(data, {**overrides, "data.cache_mb": 0}, args.epochs, 1)
    print(f"Ray trainer, 1 worker, streaming every epoch (data.cache_mb=0): {streaming['examples_per_s']:,.0f} examples/s "
          f"({streaming['examples_per_s'] / plain:.2f}x plain)", flush=True)
    two = ray_trainer(data, overrides, args.epochs, 2)
    print(f"Ray trainer, 2 workers: {two['examples_per_s']:,.0f} examples/s ({two['examples_per_s'] / plain:.2f}x plain); "
          f"fixed cost {two['fixed_s']:.1f} s", flush=True)
    # The plain loop's rate drifts by a few percent between runs on a small shared machine; a
    # second run after the Ray ones shows the drift, and the ratios use the mean of the two.
    plain_after = plain_loop(data, overrides, args.epochs)
    plain_runs = [plain, plain_after]
    plain = sum(plain_runs) / 2
    print(f"plain PyTorch loop again: {plain_after:,.0f} examples/s; ratios against the mean {plain:,.0f}: "
          f"1 worker {one['examples_per_s'] / plain:.2f}x, streaming {streaming['examples_per_s'] / plain:.2f}x, "
          f"2 workers {two['examples_per_s'] / plain:.2f}x", flush=True)
    report = {"dataset": name, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "plain_examples_per_s": plain, "plain_runs": plain_runs,
              "ray_1_worker": one, "ray_1_worker_streaming": streaming, "ray_2_workers": two, "ratio_1_worker": one["examples_per_s"] / plain,
              "command": "python -m bench.train_speed" + (" --synthetic" if args.synthetic else "")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"train_speed_{name}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
