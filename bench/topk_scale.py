"""Top-k latency against catalog size: ``recommend()`` in Python and ``/v1/recommend`` over HTTP.

For each catalog size it saves an artifact of the default model with that many items (random
weights: latency does not depend on what the weights learned), loads it with
``ray_rec.load_model`` and times ``recommend(k=10)`` for one user and for a batch of 32 users
(median of repeated calls), then serves it with Ray Serve and times ``/v1/recommend`` at
concurrency 1 and 8 (p50 / p99 over a fixed number of requests).

    python -m bench.topk_scale                               # 10k, 100k and 1M items
    python -m bench.topk_scale --catalogs 10000 100000 --requests 100
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np

from bench.output import machine, write_result
from bench.serve_load import free_port, load


def artifact(folder: str, items: int) -> str:
    import torch

    from ray_rec.config import load_config, with_catalog
    from ray_rec.model.artifact import save_model
    from ray_rec.model.interest_model import InterestModel
    from ray_rec.vocab import Vocabulary

    torch.manual_seed(0)
    model = InterestModel(with_catalog(load_config(None, {}).model, items, {}, True)).eval()
    vocab = Vocabulary(ids=[f"i{i}" for i in range(1, items + 1)], counts=np.ones(items, dtype=np.int64))
    save_model(model, vocab, folder)
    return folder


def python_latency(uri: str, repeats: int) -> dict[str, float]:
    from ray_rec import load_model

    rec = load_model(uri)
    history: list[int | str] = [f"i{i}" for i in range(1, 41)]
    out: dict[str, float] = {}
    for users in (1, 32):
        rec.recommend([history] * users, k=10)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rec.recommend([history] * users, k=10)
            times.append(time.perf_counter() - t0)
        out[f"batch{users}_ms"] = float(np.median(times) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalogs", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--requests", type=int, default=200, help="HTTP requests per concurrency level")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    import ray
    from ray import serve

    from ray_rec.serve.app import build_app
    from ray_rec.serve.schemas import ServeArgs

    rows: dict[str, Any] = {}
    ray.init(address="local", num_cpus=4, logging_level=logging.WARNING)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    body = {"history": [f"i{i}" for i in range(1, 41)], "k": 10}
    try:
        for items in args.catalogs:
            with tempfile.TemporaryDirectory() as tmp:
                uri = artifact(os.path.join(tmp, "model"), items)
                row: dict[str, Any] = {"python": python_latency(uri, args.repeats)}
                serve.run(build_app(ServeArgs(model_uri=uri)), name="topk", route_prefix="/")
                for c in (1, 8):
                    row[f"http_c{c}"] = asyncio.run(load(f"http://127.0.0.1:{port}/v1/recommend", body, c, args.requests))
                serve.delete("topk")
            rows[str(items)] = row
            print(f"{items:>9,} items: recommend() 1 user {row['python']['batch1_ms']:.1f} ms, 32 users "
                  f"{row['python']['batch32_ms']:.1f} ms; /v1/recommend c=1 p50 {row['http_c1']['p50_ms']:.1f} ms "
                  f"p99 {row['http_c1']['p99_ms']:.1f} ms, c=8 {row['http_c8']['rps']:.0f} req/s p99 {row['http_c8']['p99_ms']:.1f} ms",
                  flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    report = {"machine": machine(), "rows": rows,
              "command": "python -m bench.topk_scale --catalogs " + " ".join(map(str, args.catalogs))
              + f" --requests {args.requests}"}
    write_result("topk_scale.json", report)


if __name__ == "__main__":
    main()
