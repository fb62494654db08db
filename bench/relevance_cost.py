"""What the relevance network costs: dot against MLP, in training and in full-catalog scoring.

Times, in this one process on Beauty batches, a training step (batch 128, the loss each variant
uses by default: full cross-entropy for dot; for mlp, sampled softmax over 256 negatives plus the
full cross-entropy of its dot term alone) and
scoring the whole catalog for 512 users, for ``relevance=dot``, ``relevance=mlp`` and, as the
baseline, the same MLP written the plain way (concatenate [u, v, u*v, u-v] for every pair, then
the two layers, dropout per pair): ``MLPRelevance`` factorises the first layer instead.

    python -m bench.relevance_cost
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from bench.model_quality import prepared
from bench.output import machine, write_result
from ray_rec.config import for_data, load_config
from ray_rec.data.local import InMemoryExamples
from ray_rec.data.manifest import read_manifest
from ray_rec.model.interest_model import InterestModel
from ray_rec.model.relevance import MLPRelevance
from ray_rec.train.fit import train_step
from ray_rec.train.optim import make_optimizer


def _plain_forward(self: MLPRelevance, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    u = u.unsqueeze(-2).expand_as(v)
    return (u * v).sum(-1) + self.mlp(torch.cat([u, v, u * v, u - v], -1)).squeeze(-1)


def _plain_catalog(self: MLPRelevance, u: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    return torch.cat([_plain_forward(self, u, items[s : s + 4096].unsqueeze(0).expand(u.shape[0], -1, -1))
                      for s in range(0, items.shape[0], 4096)], -1)


@contextmanager
def plain_mlp() -> Iterator[None]:
    """Swap in the pair-concatenating MLP for the baseline row."""
    saved = MLPRelevance.forward, MLPRelevance.catalog
    MLPRelevance.forward, MLPRelevance.catalog = _plain_forward, _plain_catalog  # type: ignore[method-assign]
    try:
        yield
    finally:
        MLPRelevance.forward, MLPRelevance.catalog = saved  # type: ignore[method-assign]


def measure(data: str, relevance: str, steps: int) -> dict[str, Any]:
    manifest = read_manifest(data)
    cfg = load_config(None, {"model.relevance": relevance})
    mcfg = for_data(cfg.model, manifest)
    torch.manual_seed(0)
    model = InterestModel(mcfg)
    opt = make_optimizer(model, cfg.train)
    examples = InMemoryExamples.training(data, "train", mcfg.history_len, mcfg.time_buckets, 0)
    batches = [b for _, b in zip(range(steps + 5), examples.batches(128, seed=0))]
    for b in batches[:5]:
        train_step(model, b, opt, cfg.train.grad_clip)
    t0 = time.perf_counter()
    for b in batches[5:]:
        train_step(model, b, opt, cfg.train.grad_clip)
    step = (time.perf_counter() - t0) / steps
    model.eval()
    users = next(iter(InMemoryExamples.evaluation(data, "valid", mcfg.history_len, mcfg.time_buckets).batches(512)))
    model.score_catalog(users["items"])
    t0 = time.perf_counter()
    model.score_catalog(users["items"])
    return {"step_ms": step * 1000, "catalog_512_users_ms": (time.perf_counter() - t0) * 1000, "items": mcfg.num_items,
            "loss": mcfg.losses_text()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per variant (after 5 warm-up)")
    args = parser.parse_args()
    data = prepared("Beauty")
    rows = {"dot": measure(data, "dot", args.steps), "mlp": measure(data, "mlp", args.steps)}
    with plain_mlp():
        rows["mlp, plain pair MLP (baseline)"] = measure(data, "mlp", args.steps)
    for name, r in rows.items():
        print(f"{name}: training step {r['step_ms']:.0f} ms, full catalog ({r['items']:,} items) for 512 users "
              f"{r['catalog_512_users_ms']:.0f} ms", flush=True)
    base, mlp = rows["mlp, plain pair MLP (baseline)"], rows["mlp"]
    print(f"factorised / plain MLP: step {base['step_ms'] / mlp['step_ms']:.2f}x faster, "
          f"catalog {base['catalog_512_users_ms'] / mlp['catalog_512_users_ms']:.2f}x faster", flush=True)
    report = {"dataset": "Beauty", "machine": machine(), "threads": torch.get_num_threads(),
              "rows": rows, "command": "python -m bench.relevance_cost"}
    write_result("relevance_cost.json", report)


if __name__ == "__main__":
    main()
