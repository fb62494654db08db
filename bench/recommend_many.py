"""``recommend()`` for many users in one call: in blocks (as shipped) against all at once.

``ray_rec.load_model(...).recommend(histories)`` with every user of a data set in one list is how
offline evaluation and batch jobs call the Python API. It encodes the histories and scores the
catalog in blocks of at most ``BLOCK_ROWS`` histories and ``BLOCK_CELLS`` scores; the baseline
sets both past the call's size (one block, as before blocks existed). Each mode runs in a fresh
process (peak RSS is the process's own), alternating, on the same artifact and histories (the
default model, random weights, random histories of 3-40 known items); both must return the same
top-k items.

    python -m bench.recommend_many                               # 20,000 users, 20,000 items, 3 rounds
    python -m bench.recommend_many --users 5000 --rounds 1
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


def child(uri: str, users: int, mode: str, out: str) -> None:
    """One timed call in this process: write seconds, peak RSS and the top-10 ids to ``out``."""
    import torch

    from ray_rec import load_model
    from ray_rec.model import artifact as art

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    if mode == "one block":
        art.BLOCK_ROWS = art.BLOCK_CELLS = 1 << 62
    rec = load_model(uri)
    rng = random.Random(0)
    n = len(rec.vocab)
    histories = [[rec.vocab.raw_id(rng.randint(1, n)) for _ in range(rng.randint(3, 40))] for _ in range(users)]
    t0 = time.perf_counter()
    top = rec.recommend(histories, k=10)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "peak_rss_mb": rss, "ids": [[i for i, _ in row] for row in top]}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=4, metavar=("URI", "USERS", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        uri, users, mode, out = args.child
        child(uri, int(users), mode, out)
        return
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        uri = artifact(os.path.join(tmp, "model"), args.items)
        ids: dict[str, list] = {}
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                out = os.path.join(tmp, "out.json")
                subprocess.run([sys.executable, "-m", "bench.recommend_many", "--child", uri, str(args.users), mode, out],
                               check=True)
                got = json.loads(Path(out).read_text())
                ids[mode] = got.pop("ids")
                runs[mode].append(got)
                print(f"round {r + 1} {mode:>9}: {got['seconds']:.2f} s, peak RSS {got['peak_rss_mb']:,.0f} MB", flush=True)
        same = ids["blocks"] == ids["one block"]
    summary = {m: {"median_s": statistics.median(x["seconds"] for x in runs[m]),
                   "peak_rss_mb": max(x["peak_rss_mb"] for x in runs[m])} for m in MODES}
    ratio = summary["one block"]["median_s"] / summary["blocks"]["median_s"]
    print(f"{args.users:,} users x {args.items:,} items: blocks {summary['blocks']['median_s']:.2f} s "
          f"({summary['blocks']['peak_rss_mb']:,.0f} MB), one block {summary['one block']['median_s']:.2f} s "
          f"({summary['one block']['peak_rss_mb']:,.0f} MB): {ratio:.2f}x faster in blocks; same top-10: {same}")
    if not same:
        raise SystemExit("blocks and one block returned different top-10 items")
    report = {"machine": machine(), "users": args.users, "items": args.items,
              "runs": runs, "summary": summary, "same_top10": same,
              "command": f"python -m bench.recommend_many --users {args.users} --items {args.items} --rounds {args.rounds}"}
    write_result("recommend_many.json", report)


if __name__ == "__main__":
    main()
