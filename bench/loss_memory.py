"""Memory and time of the full-softmax loss: the whole (positions x catalog) logits against chunks.

One training step's loss at the positions of a batch against a catalog (``--sizes``: Beauty's
batches, then 128 windows x 50 steps as in a long-history data set, every step with a next click,
against 20,000 and 100,000 items), width 64, forward and backward, three ways: autograd's
cross-entropy on the whole logits (what the loss did before chunking); `full_softmax_loss` with
the dot product (gradients taken in the forward pass, in chunks past the bound: what the default
model runs); the same with the dot product passed as a function (autograd, chunks recomputed by
activation checkpointing: what any other scorer gets). Each (size, way) runs in a fresh process,
so its peak resident memory is its own; the figure is the peak over the process's resident
memory before the first step.

    python -m bench.loss_memory
    python -m bench.loss_memory --sizes 20000x1280    # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from statistics import median

from bench.data_scale import vm_hwm_mb
from bench.output import machine, write_result

MODES = ("whole", "chunked", "chunked, checkpointed")
# Beauty's batches (128 users of about 9 clicks: about 750 positions over 12,101 items), then a
# long-history batch (128 windows x 50 steps) over 20,000 and 100,000 items.
SIZES = ["12101x750", "20000x6400", "100000x6400"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(items: int, positions: int, mode: str, steps: int) -> None:
    import torch
    from torch.nn import functional as F

    from ray_rec.model.losses import full_softmax_loss

    torch.manual_seed(0)
    u = torch.randn(positions, 64, requires_grad=True)
    table = torch.randn(items, 64, requires_grad=True)
    targets = torch.randint(1, items + 1, (positions,))

    def step() -> torch.Tensor:
        if mode == "whole":  # autograd's cross-entropy on the whole logits, as before chunking
            return F.cross_entropy(u @ table.T, targets - 1)
        catalog = None if mode == "chunked" else (lambda a, b: a @ b.T)  # None: the fused dot product
        return full_softmax_loss(u, table, targets, catalog)

    before = _rss_mb()
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        loss.backward()
        seconds.append(time.perf_counter() - t0)
        u.grad = table.grad = None
    peak = vm_hwm_mb()
    print(json.dumps({"items": items, "positions": positions, "mode": mode, "step_s": median(seconds),
                      "peak_mb": peak - before, "loss": loss.item()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="catalog items x positions, e.g. 20000x6400")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(int(args.child[0]), int(args.child[1]), args.child[2], args.steps)
    rows = []
    for size in args.sizes:
        items, positions = (int(x) for x in size.lower().split("x"))
        for mode in MODES:
            cmd = [sys.executable, "-m", "bench.loss_memory", "--child", str(items), str(positions), mode, "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{items:,} items x {positions:,} positions, {mode}: peak +{r['peak_mb']:,.0f} MB, "
                  f"step {r['step_s'] * 1000:,.0f} ms, loss {r['loss']:.4f}", flush=True)
    report = {"machine": machine(), "rows": rows,
              "command": " ".join(["python -m bench.loss_memory", *sys.argv[1:]])}
    write_result("loss_memory.json", report, indent=1)


if __name__ == "__main__":
    main()
