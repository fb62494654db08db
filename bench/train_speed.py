"""Training throughput: the plain PyTorch loop against the Ray trainer with 1 and 2 workers.

Same model, data and batch size, run one after the other in this process. The machine's speed
drifts by more than the gap being measured, so plain-loop and 1-worker Ray runs alternate
(``--rounds`` pairs, plain first and last) and each Ray run is compared with the mean of the plain
runs just before and after it; the headline ratio is the median of those. The Ray figures are
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
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from bench.model_quality import prepared
from bench.output import machine, write_result
from ray_rec.config import for_data, load_config
from ray_rec.data.examples import browse_width
from ray_rec.data.local import InMemoryExamples
from ray_rec.data.manifest import read_manifest
from ray_rec.data.prepare import PrepareOptions, prepare
from ray_rec.device import resolve_device, to_device
from ray_rec.model.interest_model import InterestModel
from ray_rec.train.fit import step_losses
from ray_rec.train.optim import make_optimizer


def plain_loop(data: str, overrides: dict, epochs: int) -> float:
    """Examples/s of the single-process loop over the epochs after the first."""
    return float(plain_loop_run(data, overrides, epochs)["examples_per_s"])


def plain_loop_run(data: str, overrides: dict, epochs: int, device: str | torch.device = "cpu") -> dict:
    """The single-process loop on ``device`` (dense item gradients, ``train.precision`` from the
    overrides): examples/s over the epochs after the first, each epoch's seconds, the model."""
    cfg = load_config(None, overrides)
    m = read_manifest(data)
    mcfg = for_data(cfg.model, m)
    target = resolve_device(device)
    torch.manual_seed(0)
    model = InterestModel(mcfg).to(target)
    opt = make_optimizer(model, cfg.train)
    ex = InMemoryExamples.training(data, "train", mcfg.history_len, mcfg.time_buckets, browse_width(m, mcfg.resolved_loss))
    seconds, n, epoch_s = 0.0, 0, []
    for epoch in range(epochs):
        t0 = time.monotonic()
        for batch in ex.batches(cfg.train.batch_for(mcfg), seed=epoch):
            step_losses(model, to_device(batch, target), opt, cfg.train.grad_clip, cfg.train.precision)
            n += batch["items"].shape[0] if epoch else 0
        if target.type == "cuda":
            torch.cuda.synchronize(target)  # the steps queued on the GPU are part of the epoch
        epoch_s.append(time.monotonic() - t0)
        seconds += epoch_s[-1] if epoch else 0.0
    return {"examples_per_s": n / seconds, "epoch_s": epoch_s, "model": mcfg.describe()}


def ray_trainer(data: str, overrides: dict, epochs: int, workers: int) -> dict:
    from ray_rec.train.trainer import train

    cfg = load_config(None, {**overrides, "train.epochs": epochs, "train.eval_every": 1000, "train.patience": 1000,
                             "train.final_fit": False})  # the epochs timed are the split run's
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


def synthetic_dataset() -> str:
    """A generated log (5,000 users, 1,000 items) prepared into a temporary folder; its path."""
    import pyarrow.parquet as pq

    from ray_rec.data.synthetic import SyntheticSpec, generate

    tmp = tempfile.mkdtemp()
    log, _ = generate(SyntheticSpec(users=5000, items=1000))
    pq.write_table(log, f"{tmp}/events.parquet")
    prepare(PrepareOptions(input=f"{tmp}/events.parquet", output=f"{tmp}/data", num_shards=4))
    return f"{tmp}/data"


def _median_index(xs: list[float]) -> int:
    """Index of the (lower) median element, so the reported run is one that happened."""
    order = sorted(range(len(xs)), key=xs.__getitem__)
    return order[(len(xs) - 1) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="plain / Ray 1-worker pairs, interleaved")
    args = parser.parse_args()
    data, name = (synthetic_dataset(), "synthetic") if args.synthetic else (prepared("Beauty"), "Beauty")
    overrides = {"train.batch_size": 128}
    import ray

    from ray_rec.ray_session import init_ray

    def plain() -> float:
        # Ray is shut down while the plain loop runs, so its idle processes cost the plain loop nothing.
        ray.shutdown()
        rate = plain_loop(data, overrides, args.epochs)
        print(f"plain PyTorch loop: {rate:,.0f} examples/s", flush=True)
        return rate

    def on_ray(label: str, extra: dict, workers: int) -> dict:
        if not ray.is_initialized():
            init_ray(2)
        run = ray_trainer(data, {**overrides, **extra}, args.epochs, workers)
        print(f"{label}: {run['examples_per_s']:,.0f} examples/s; fixed cost {run['fixed_s']:.1f} s", flush=True)
        return run

    # The machine's speed drifts by more than the gap being measured (the plain loop alone moved
    # 16% within one invocation), so plain and Ray runs alternate, and every Ray run is compared
    # with the mean of the plain runs just before and after it.
    plain_runs = [plain()]
    one_runs = []
    for i in range(args.rounds):
        one_runs.append(on_ray(f"Ray trainer, 1 worker (round {i + 1})", {}, 1))
        plain_runs.append(plain())
    streaming = on_ray("Ray trainer, 1 worker, streaming every epoch (data.cache_mb=0)", {"data.cache_mb": 0}, 1)
    two = on_ray("Ray trainer, 2 workers", {}, 2)
    plain_runs.append(plain())
    for i, run in enumerate(one_runs):
        run["vs_plain"] = run["examples_per_s"] / ((plain_runs[i] + plain_runs[i + 1]) / 2)
    for run in (streaming, two):
        run["vs_plain"] = run["examples_per_s"] / ((plain_runs[-2] + plain_runs[-1]) / 2)
    ratios = [r["vs_plain"] for r in one_runs]
    middle = _median_index(ratios)
    one = {**one_runs[middle], "round": middle + 1, "rounds": one_runs}
    print(f"1 worker / bracketing plain runs: {', '.join(f'{x:.2f}x' for x in ratios)} (median {median(ratios):.2f}x); "
          f"streaming {streaming['vs_plain']:.2f}x; 2 workers {two['vs_plain']:.2f}x", flush=True)
    report = {"dataset": name, "machine": machine(),
              "plain_examples_per_s": median(plain_runs), "plain_runs": plain_runs,
              "ray_1_worker": one, "ray_1_worker_streaming": streaming, "ray_2_workers": two,
              "ratio_1_worker": median(ratios), "ratios_1_worker": ratios,
              "command": "python -m bench.train_speed" + (" --synthetic" if args.synthetic else "")
                         + (f" --rounds {args.rounds}" if args.rounds != 3 else "")}
    write_result(f"train_speed_{name}.json", report)


if __name__ == "__main__":
    main()
