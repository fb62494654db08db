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
    evaluate,
    make_optimizer,
    sparse_item_gradients,
    sparse_items_line,
    train_step,
)
from ray_rec.train.schedule import Plateau, epoch_rates, final_fit_line, final_fit_split, halve_rate, set_rate

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
    split_model: InterestModel | None = None  # the split run's best model when ``model`` is the final fit

    @property
    def final_fit(self) -> bool:
        """Whether ``model`` was trained again on every click after the split run."""
        return self.split_model is not None


def train_local(
    data: str, config: Config, evaluate_test: bool = True, log: Callable[[str], None] | None = None
) -> LocalRun:
    """Train on a prepared dataset in this process; keeps the epoch with the best validation
    ``train.select_by``. With ``train.final_fit`` (where the data set allows it, `final_fit_split`)
    the returned model is then trained again on every click (`final_fit`); ``test`` always holds
    the split model's test metrics."""
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
    plateau, best_state = Plateau(tcfg), copy.deepcopy(model.state_dict())
    started = time.monotonic()
    train_seconds, examples, steps = 0.0, 0, 0
    for epoch in range(1, tcfg.epochs + 1):
        t0 = time.monotonic()
        total, n = _epoch(model, train, optimizer, config, epoch)
        steps += n
        examples += train.size
        train_seconds += time.monotonic() - t0
        row: dict[str, Any] = {"epoch": epoch, "loss": total / max(n, 1), "epoch_s": time.monotonic() - t0, "steps": n}
        verdict = "same"
        if epoch % tcfg.eval_every == 0 or epoch == tcfg.epochs:
            full, _ = evaluate(model, valid.batches(tcfg.eval_batch_size), config.eval.ks)
            metrics = full.result()
            row.update({f"val_{name}": value for name, value in metrics.items() if name != "count"})
            verdict = plateau.validated(epoch, steps, metrics[tcfg.select_by])
            if verdict == "better":
                best_state = copy.deepcopy(model.state_dict())
            elif verdict == "halve":
                halve_rate(optimizer, plateau.stalled(), say)
        row["lr"] = optimizer.param_groups[0]["lr"]
        run.history.append(row)
        say(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if verdict == "stop":
            say(f"early stop at epoch {epoch}: {plateau.stalled()} ({steps - plateau.best_step:,} steps)")
            break
    run.best_epoch = plateau.best_epoch
    model.load_state_dict(best_state)
    run.examples_per_s = examples / max(train_seconds, 1e-9)
    if evaluate_test:
        test = InMemoryExamples.evaluation(data, "test", mcfg.history_len, mcfg.time_buckets)
        full, _ = evaluate(model, test.batches(tcfg.eval_batch_size), config.eval.ks)
        run.test = full.result()
    split = final_fit_split(manifest) if tcfg.final_fit else None
    if tcfg.final_fit:
        say(final_fit_line(run.best_epoch, split))
    if split is not None:
        torch.manual_seed(config.train.seed)
        run.split_model, run.model = model, InterestModel(mcfg)
        run.model.features.item.sparse = model.features.item.sparse
        everything = InMemoryExamples.training(data, split, mcfg.history_len, mcfg.time_buckets,
                                               browse_width(manifest, mcfg.resolved_loss))
        optimizer = make_optimizer(run.model, tcfg)
        for epoch, lr in enumerate(epoch_rates(run.history, tcfg.lr)[: run.best_epoch], 1):
            set_rate(optimizer, lr)
            total, n = _epoch(run.model, everything, optimizer, config, epoch)
            say(f"final fit epoch {epoch}/{run.best_epoch} loss {total / max(n, 1):.4f} lr {lr:g}")
    run.seconds = time.monotonic() - started
    return run


def _epoch(model: InterestModel, examples: InMemoryExamples, optimizer: torch.optim.Optimizer, config: Config,
           epoch: int) -> tuple[float, int]:
    """One pass over ``examples``: the summed loss and the steps taken."""
    total, n = 0.0, 0
    for batch in examples.batches(config.train.batch_size, seed=config.data.seed + epoch):
        total += train_step(model, batch, optimizer, config.train.grad_clip)["loss"]
        n += 1
    return total, n
