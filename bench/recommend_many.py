"""Many users against a whole catalog: in blocks (as shipped) against all at once.

Two calls score every user against every item. ``--call recommend``:
``ray_rec.load_model(...).recommend(histories)`` with every user in one list, how offline jobs call
the Python API; it encodes at most ``BLOCK_ROWS`` histories and holds at most ``BLOCK_CELLS``
scores at a time. ``--call evaluate``: full-ranking evaluation (``ray_rec.predict.ranking.evaluate``,
with 100 sampled negatives), what `ray-rec train` runs on its validation users every epoch and
`ray-rec evaluate` on a split, in batches of 512 users (``train.eval_batch_size``), each scored in
blocks of at most ``BLOCK_CELLS`` scores. The baseline sets the limits past the call's size (one
block, as before blocks existed). Each mode runs in a fresh process (peak RSS is the process's
own), alternating, on the same artifact and histories (the default model, random weights, random
histories of 3-40 known items); both must return the same top-10 items (``recommend``) or the
same full-ranking metrics (``evaluate``; the sampled negatives are drawn per block, so those
metrics may differ once a block holds fewer users than a batch).

    python -m bench.recommend_many                               # 20,000 users, 20,000 items, 3 rounds
    python -m bench.recommend_many --call evaluate --users 2048 --items 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.output import machine, write_result
from bench.topk_scale import artifact

MODES = ("blocks", "one block")
CALLS = ("recommend", "evaluate")
EVAL_BATCH = 512  # users per evaluation batch: train.eval_batch_size's default


def child(uri: str, users: int, mode: str, call: str, out: str) -> None:
    """One timed call in this process: write seconds, peak RSS and what must not depend on the mode
    (the top-10 ids, or the full-ranking metrics) to ``out``."""
    import torch

    from ray_rec import load_model
    from ray_rec.predict import ranking

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    if mode == "one block":
        ranking.BLOCK_ROWS = ranking.BLOCK_CELLS = 1 << 62
    rec = load_model(uri)
    rng = random.Random(0)
    n = len(rec.vocab)
    histories = [[rng.randint(1, n) for _ in range(rng.randint(3, 40))] for _ in range(users)]
    if call == "recommend":
        raw = [[rec.vocab.raw_id(i) for i in h] for h in histories]
        t0 = time.perf_counter()
        same: object = [[i for i, _ in row] for row in rec.recommend(raw, k=10)]
    else:
        batches = []
        for start in range(0, users, EVAL_BATCH):
            rows = histories[start : start + EVAL_BATCH]
            width = max(len(h) for h in rows) - 1  # the last click is the target
            items = torch.tensor([[0] * (width - len(h) + 1) + h[:-1] for h in rows])
            batches.append({"items": items, "seen": items, "targets": torch.tensor([h[-1] for h in rows])})
        t0 = time.perf_counter()
        full, _ = ranking.evaluate(rec.model, batches, sampled_negatives=100)
        same = full.result()
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "peak_rss_mb": rss, "same": same}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--call", choices=CALLS, default="recommend")
    parser.add_argument("--child", nargs=4, metavar=("URI", "USERS", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        uri, users, mode, out = args.child
        child(uri, int(users), mode, args.call, out)
        return
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        uri = artifact(os.path.join(tmp, "model"), args.items)
        ids: dict[str, list] = {}
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                out = os.path.join(tmp, "out.json")
                subprocess.run([sys.executable, "-m", "bench.recommend_many", "--call", args.call,
                                "--child", uri, str(args.users), mode, out], check=True)
                got = json.loads(Path(out).read_text())
                ids[mode] = got.pop("same")
                runs[mode].append(got)
                print(f"round {r + 1} {mode:>9}: {got['seconds']:.2f} s, peak RSS {got['peak_rss_mb']:,.0f} MB", flush=True)
        same = ids["blocks"] == ids["one block"]
    summary = {m: {"median_s": statistics.median(x["seconds"] for x in runs[m]),
                   "peak_rss_mb": max(x["peak_rss_mb"] for x in runs[m])} for m in MODES}
    ratio = summary["one block"]["median_s"] / summary["blocks"]["median_s"]
    what = "top-10 items" if args.call == "recommend" else "full-ranking metrics"
    print(f"{args.call}: {args.users:,} users x {args.items:,} items: blocks {summary['blocks']['median_s']:.2f} s "
          f"({summary['blocks']['peak_rss_mb']:,.0f} MB), one block {summary['one block']['median_s']:.2f} s "
          f"({summary['one block']['peak_rss_mb']:,.0f} MB): {ratio:.2f}x faster in blocks; same {what}: {same}")
    if not same:
        raise SystemExit(f"blocks and one block returned different {what}")
    call = "" if args.call == "recommend" else f" --call {args.call}"
    report = {"machine": machine(), "call": args.call, "users": args.users, "items": args.items,
              "runs": runs, "summary": summary, "same_result": same,
              "command": f"python -m bench.recommend_many{call} --users {args.users} --items {args.items} --rounds {args.rounds}"}
    write_result(f"{args.call}_many.json", report)


if __name__ == "__main__":
    main()
