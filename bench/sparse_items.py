"""Training steps on large catalogs: the item table's gradients sparse (as shipped) against dense,
and the price of in-batch negatives.

Past the full softmax's size (`loss: auto` switches at 10M items x history length) a step reads a
sample of the catalog: the batch's history and next items, 2048 shared uniform negatives and up to
2048 of the batch's next clicks as more negatives (`model.in_batch_negatives`). With dense
gradients every step still passes over the whole table three times (the backward pass builds a
dense (N + 1) x D gradient, Adam updates every row and its two moments, and data-parallel workers
all-reduce the whole gradient); with sparse gradients (`train.sparse_items`, the default on CPU)
those cost the rows read. Lazy Adam is another optimiser, not a faster Adam (rows not read keep
their moments), so the two modes' losses are printed beside each other, not required to match.
Mode ``uniform`` is ``sparse`` with the uniform negatives alone (``in_batch_negatives=False``): the
ratio of their steps is what the in-batch negatives cost (one more positions x 2048 product and its
mask of each window's own clicks).

The default model at each catalog size (with sampled softmax, what `auto` picks past 200,000 items, at
every size so that smaller catalogs can be compared too), random full windows (``--batch`` x 50 steps, items drawn
uniformly: the most rows a step can read), one worker in-process with all cores, and two workers
as Ray Train runs them (DDP over gloo, one process each, cores split between them). Each (size,
mode, workers) runs in a fresh process, so its peak resident memory is its own; step times are
medians over the steps after the first (10 by default: with 5 a row moved by up to 40% between runs).

    python -m bench.sparse_items                              # 100,000 and 1,000,000 items
    python -m bench.sparse_items --items 200000 --steps 3     # a minute
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.data_scale import vm_hwm_mb
from bench.output import machine, write_result

# mode -> (sparse item gradients, in-batch negatives); "sparse" is what ships, "uniform" prices the
# batch's next clicks as negatives against the 2048 uniform draws alone
MODES = {"sparse": (True, True), "dense": (False, True), "uniform": (True, False)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(rank: int, world: int, items: int, mode: str, steps: int, batch: int, port: int, out: Any) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ray_rec.config import ModelConfig, TrainConfig
    from ray_rec.model.interest_model import InterestModel
    from ray_rec.train.fit import train_step
    from ray_rec.train.optim import make_optimizer, sparse_item_gradients

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial weights on every worker, as DDP's first broadcast would make them
    sparse, in_batch = MODES[mode]
    # sampled: what `auto` picks past 200,000 items
    cfg = ModelConfig(num_items=items, loss="sampled_softmax", use_time=False, in_batch_negatives=in_batch)
    train = TrainConfig(sparse_items=sparse)
    model = InterestModel(cfg)
    model.features.item.sparse = sparse_item_gradients(cfg, train, on_gpu=False)
    assert model.features.item.sparse == sparse, f"{cfg.loss_text()} at {items:,} items"
    optimizer = make_optimizer(model, train)
    net = DistributedDataParallel(model) if world > 1 else model
    g = torch.Generator().manual_seed(1 + rank)
    seconds, losses = [], []
    for _ in range(steps):
        data = {"items": torch.randint(1, items + 1, (batch, cfg.history_len), generator=g),
                "targets": torch.randint(1, items + 1, (batch, cfg.history_len), generator=g)}
        t0 = time.perf_counter()
        losses.append(train_step(net, data, optimizer, train.grad_clip)["loss"])
        seconds.append(time.perf_counter() - t0)
    if rank == 0:
        out.put({"step_s": statistics.median(seconds[1:] or seconds), "first_step_s": seconds[0], "loss": losses[-1],
                 "peak_mb": vm_hwm_mb(), "loss_text": cfg.loss_text()})
    if world > 1:
        dist.destroy_process_group()


def child(items: int, mode: str, workers: int, steps: int, batch: int) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_steps, args=(r, workers, items, mode, steps, batch, port, out))
             for r in range(workers)]
    for p in procs:
        p.start()
    while True:  # a worker that fails never answers: stop instead of waiting for it
        try:
            row = out.get(timeout=5)
            break
        except queue.Empty:
            if any(p.exitcode for p in procs):
                for p in procs:
                    p.kill()
                raise SystemExit(f"a worker failed (exit codes {[p.exitcode for p in procs]})") from None
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"worker exited with {p.exitcode}")
    print(json.dumps({"items": items, "mode": mode, "workers": workers, **row}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", nargs="+", type=int, default=[100_000, 1_000_000])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=11, help="steps per run; the first is not timed")
    parser.add_argument("--batch", type=int, default=128, help="windows per step and worker (the product: train.batch_size divided by the workers)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(int(args.child[0]), args.child[1], int(args.child[2]), args.steps, args.batch)
    rows = []
    for items in args.items:
        for workers in args.workers:
            for mode in MODES:
                cmd = [sys.executable, "-m", "bench.sparse_items", "--child", str(items), mode, str(workers),
                       "--steps", str(args.steps), "--batch", str(args.batch)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{items:,} items, {workers} worker(s), {mode}: step {r['step_s']:.3f} s, "
                      f"peak {r['peak_mb']:,.0f} MB, loss {r['loss']:.4f} ({r['loss_text']})", flush=True)
            sparse, dense, uniform = rows[-3:]
            print(f"  sparse: {dense['step_s'] / sparse['step_s']:.2f}x faster a step, "
                  f"{dense['peak_mb'] / sparse['peak_mb']:.2f}x less peak memory; in-batch negatives: "
                  f"{sparse['step_s'] / uniform['step_s']:.2f}x the step of uniform negatives alone", flush=True)
    report = {"machine": machine(), "rows": rows, "steps": args.steps, "batch": args.batch,
              "command": " ".join(["python -m bench.sparse_items", *sys.argv[1:]])}
    write_result("sparse_items.json", report, indent=1)


if __name__ == "__main__":
    main()
