"""Memory and time of the full-softmax loss: the whole (positions x catalog) logits against chunks.

One training step's loss over a batch of 128 windows x 50 steps (6,400 positions, every one with a
next click, as in a long-history data set) against catalogs of growing size, width 64: forward and
backward of `ray_rec.model.losses.full_softmax_loss` with the logits held whole (``max_cells``
unbounded: what the loss did before chunking), in its default chunks with the dot product's
gradients taken in the forward pass (what the default model runs), and in chunks recomputed by
activation checkpointing (what any other scorer gets, here the same dot product passed as a
function). Each (catalog, mode) runs
in a fresh process, so its peak resident memory is its own; the figure is the peak over the
process's resident memory before the first step.

    python -m bench.loss_memory
    python -m bench.loss_memory --catalogs 20000 --positions 1280    # minutes less
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from statistics import median

from bench.model_quality import RESULTS

# mode -> (logit cells held at once: None for the default; scorer: None for the fused dot product)
MODES = {"whole": (1 << 62, None), "chunked": (None, None), "chunked, checkpointed": (None, "matmul")}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(items: int, positions: int, mode: str, steps: int) -> None:
    import torch

    from ray_rec.model.losses import FULL_SOFTMAX_CHUNK_CELLS, full_softmax_loss

    torch.manual_seed(0)
    u = torch.randn(positions, 64, requires_grad=True)
    table = torch.randn(items, 64, requires_grad=True)
    targets = torch.randint(1, items + 1, (positions,))
    cells, scorer = MODES[mode]
    catalog = None if scorer is None else (lambda a, b: a @ b.T)
    before = _rss_mb()
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = full_softmax_loss(u, table, targets, catalog, max_cells=cells or FULL_SOFTMAX_CHUNK_CELLS)
        loss.backward()
        seconds.append(time.perf_counter() - t0)
        u.grad = table.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"items": items, "positions": positions, "mode": mode, "step_s": median(seconds),
                      "peak_mb": peak - before, "loss": loss.item()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalogs", nargs="+", type=int, default=[20_000, 100_000])
    parser.add_argument("--positions", type=int, default=128 * 50)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(int(args.child[0]), args.positions, args.child[1], args.steps)
    rows = []
    for items in args.catalogs:
        for mode in MODES:
            cmd = [sys.executable, "-m", "bench.loss_memory", "--child", str(items), mode,
                   "--positions", str(args.positions), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{items:,} items x {args.positions:,} positions, {mode}: peak +{r['peak_mb']:,.0f} MB, "
                  f"step {r['step_s']:.2f} s, loss {r['loss']:.4f}", flush=True)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows,
              "command": " ".join(["python -m bench.loss_memory", *sys.argv[1:]])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "loss_memory.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
