"""Single-process training (no Ray), on `ray_rec.train.fit.fit` as the Ray workers are: the baseline
the Ray trainer is measured against, and the engine of the model-quality benchmark."""

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
from ray_rec.data.manifest import read_manifest
from ray_rec.device import resolve_device
from ray_rec.model.interest_model import InterestModel
from ray_rec.predict.ranking import evaluate
from ray_rec.train.fit import fit, new_state
from ray_rec.train.optim import make_optimizer, sparse_item_gradients, sparse_items_line
from ray_rec.train.schedule import epoch_rates, final_fit_line, final_fit_split

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
    data: str, config: Config, evaluate_test: bool = True, log: Callable[[str], None] | None = None,
    device: str | torch.device = "cpu",
) -> LocalRun:
    """Train on a prepared dataset in this process, on ``device`` (`ray_rec.device.resolve_device`);
    keeps the epoch with the best validation ``train.select_by``. With ``train.final_fit`` (where the data set allows it, `final_fit_split`)
    the returned model is then trained again on every click (`final_fit`); ``test`` always holds
    the split model's test metrics."""
    say = log or logger.info
    manifest = read_manifest(data)
    mcfg = for_data(config.model, manifest)
    say(f"model: {mcfg.describe()}")
    torch.manual_seed(config.train.seed)
    target = resolve_device(device)
    model = InterestModel(mcfg).to(target)
    tcfg = config.train
    prefixes = mcfg.on_prefixes
    train = InMemoryExamples.training(data, "train", mcfg.history_len, mcfg.time_buckets,
                                      browse_width(manifest, mcfg.resolved_loss), prefixes)
    valid = InMemoryExamples.evaluation(data, "valid", mcfg.history_len, mcfg.time_buckets)
    on_gpu = target.type != "cpu"
    model.features.item.sparse = sparse_item_gradients(mcfg, tcfg, on_gpu)
    if (line := sparse_items_line(mcfg, tcfg, on_gpu)) is not None:
        say(line)
    optimizer = make_optimizer(model, tcfg)
    batch = tcfg.batch_for(mcfg)
    run = LocalRun(model=model)
    best_state = copy.deepcopy(model.state_dict())
    started = time.monotonic()

    def keep_best(metrics: dict[str, Any], verdict: str) -> None:
        nonlocal best_state
        if verdict == "better":
            best_state = copy.deepcopy(model.state_dict())

    def validate(epoch: int) -> dict[str, float]:
        return evaluate(model, valid.batches(tcfg.eval_batch_size), config.eval.ks)[0].result()

    state = new_state()
    plateau = fit(model, optimizer, config, state, lambda epoch: train.batches(batch, seed=config.data.seed + epoch),
                  tcfg.epochs, say, validate=validate, after_epoch=keep_best)
    run.history = state["history"]
    run.best_epoch = plateau.best_epoch
    model.load_state_dict(best_state)
    run.examples_per_s = sum(r["examples"] for r in run.history) / max(sum(r["train_s"] for r in run.history), 1e-9)
    if evaluate_test:
        test = InMemoryExamples.evaluation(data, "test", mcfg.history_len, mcfg.time_buckets)
        run.test = evaluate(model, test.batches(tcfg.eval_batch_size), config.eval.ks)[0].result()
    split = final_fit_split(manifest) if tcfg.final_fit else None
    if tcfg.final_fit:
        say(final_fit_line(run.best_epoch, split))
    if split is not None:
        torch.manual_seed(config.train.seed)
        run.split_model, run.model = model, InterestModel(mcfg).to(target)
        run.model.features.item.sparse = model.features.item.sparse
        everything = InMemoryExamples.training(data, split, mcfg.history_len, mcfg.time_buckets,
                                               browse_width(manifest, mcfg.resolved_loss), prefixes)
        fit(run.model, make_optimizer(run.model, tcfg), config, new_state(),
            lambda epoch: everything.batches(batch, seed=config.data.seed + epoch), run.best_epoch, say,
            rates=epoch_rates(run.history, tcfg.lr)[: run.best_epoch])
    run.seconds = time.monotonic() - started
    return run
