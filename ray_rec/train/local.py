"""Single-process training with the plain PyTorch loop (no Ray): the baseline the Ray trainer is
measured against, and the engine of the model-quality benchmark."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ray_rec.config import Config, for_data
from ray_rec.data.examples import browse_width
from ray_rec.data.local import InMemoryExamples
from ray_rec.data.prepare import read_manifest
from ray_rec.model.interest_model import InterestModel
from ray_rec.train.loop import (
    decay_on_plateau,
    evaluate,
    make_optimizer,
    sparse_item_gradients,
    sparse_items_line,
    train_step,
)

logger = logging.getLogger(__name__)


@dataclass
class LocalRun:
    """What a local training run produced."""

    model: InterestModel
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    test: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    examples_per_s: float = 0.0


def train_local(
    data: str, config: Config, evaluate_test: bool = True, log: Callable[[str], None] | None = None
) -> LocalRun:
    """Train on a prepared dataset in this process; keeps the epoch with the best validation ``train.select_by``."""
    say = log or logger.info
    manifest = read_manifest(data)
    mcfg = for_data(config.model, manifest)
    say(f"model: {mcfg.describe()}")
    torch.manual_seed(config.train.seed)
    model = InterestModel(mcfg)
    tcfg = config.train
    train = InMemoryExamples.training(data, "train", mcfg.history_len, mcfg.time_buckets, browse_width(manifest, mcfg.resolved_loss))
    valid = InMemoryExamples.evaluation(data, "valid", mcfg.history_len, mcfg.time_buckets)
    model.features.item.sparse = sparse_item_gradients(mcfg, tcfg, on_gpu=False)
    if model.features.item.sparse:
        say(sparse_items_line(mcfg))
    optimizer = make_optimizer(model, tcfg)
    run = LocalRun(model=model)
    best, best_state, bad = -1.0, copy.deepcopy(model.state_dict()), 0
    started = time.monotonic()
    train_seconds, examples = 0.0, 0
    for epoch in range(1, tcfg.epochs + 1):
        t0 = time.monotonic()
        total = 0.0
        n = 0
        for batch in train.batches(tcfg.batch_size, seed=config.data.seed + epoch):
            total += train_step(model, batch, optimizer, tcfg.grad_clip)["loss"]
            n += 1
            examples += batch["items"].shape[0]
        train_seconds += time.monotonic() - t0
        row: dict[str, Any] = {"epoch": epoch, "loss": total / max(n, 1), "epoch_s": time.monotonic() - t0}
        if epoch % tcfg.eval_every == 0 or epoch == tcfg.epochs:
            full, _ = evaluate(model, valid.batches(tcfg.eval_batch_size), config.eval.ks)
            metrics = full.result()
            row.update({f"val_{name}": value for name, value in metrics.items() if name != "count"})
            if metrics[tcfg.select_by] > best:
                best, best_state, bad, run.best_epoch = metrics[tcfg.select_by], copy.deepcopy(model.state_dict()), 0, epoch
            else:
                bad += 1
                decay_on_plateau(optimizer, bad, tcfg, say)
        row["lr"] = optimizer.param_groups[0]["lr"]
        run.history.append(row)
        say(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if bad >= tcfg.patience:
            say(f"early stop at epoch {epoch}: no better validation {tcfg.select_by} for {bad} evaluations")
            break
    model.load_state_dict(best_state)
    run.seconds = time.monotonic() - started
    run.examples_per_s = examples / max(train_seconds, 1e-9)
    if evaluate_test:
        test = InMemoryExamples.evaluation(data, "test", mcfg.history_len, mcfg.time_buckets)
        full, _ = evaluate(model, test.batches(tcfg.eval_batch_size), config.eval.ks)
        run.test = full.result()
    return run
