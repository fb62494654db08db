"""The one epoch loop, `fit`: both the Ray Train worker and the single-process run call it.

It runs the steps, validates when due, halves the learning rate and stops on plateaus
(`ray_rec.train.schedule.Plateau`), replays a fixed list of rates for the final fit, keeps the loop
state a checkpoint needs, and says one line an epoch. What differs between callers comes in as
functions: where the batches come from, how validation runs, what happens after an epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ray_rec.config import Config, TrainConfig
from ray_rec.device import autocast, model_device, to_device
from ray_rec.progress import Progress
from ray_rec.train.optim import clip_gradients
from ray_rec.train.schedule import Plateau, halve_rate, set_rate

Batch = dict[str, torch.Tensor]


def new_state() -> dict[str, Any]:
    """The loop state of a run that has not trained yet (checkpoints store it, `fit` advances it)."""
    return {"epoch": 0, "steps": 0, "resumes": 0, "history": []}


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    state: dict[str, Any],
    batches: Callable[[int], Iterable[Batch]],
    last_epoch: int,
    say: Callable[[str], None],
    validate: Callable[[int], dict[str, float]] | None = None,
    rates: Sequence[float] | None = None,
    after_epoch: Callable[[dict[str, Any], str], None] = lambda metrics, verdict: None,
    before_step: Callable[[int, int], None] = lambda epoch, step: None,
    world: int = 1,
) -> Plateau:
    """Train epochs ``state["epoch"] + 1 .. last_epoch`` of ``batches(epoch)``; returns the plateau
    (best score and epoch).

    ``validate(epoch)`` gives the validation metrics (``HR@10``, ..., ``count``) every
    ``train.eval_every`` epochs and at ``train.epochs``; without it (the final fit) nothing is
    validated and ``rates[epoch - 1]`` sets each epoch's learning rate. ``state`` (see `new_state`)
    is updated in place: epoch, steps, the plateau's counters, one metrics row per epoch in
    ``history``. ``after_epoch(metrics, verdict)`` runs after each epoch (checkpoint, report, keep
    the best weights on ``better``); verdicts are `Plateau.validated`'s, ``same`` when not
    validated. ``world``: data-parallel workers, whose batches together make the step's.
    """
    tcfg = cfg.train
    plateau = Plateau(tcfg)
    plateau.restore(state)
    what = "epoch" if validate is not None else "final fit epoch"
    for epoch in range(state["epoch"] + 1, last_epoch + 1):
        if rates is not None:
            set_rate(optimizer, rates[epoch - 1])
        metrics = _train_epoch(model, optimizer, tcfg, batches(epoch), Progress(tcfg.progress_s), say,
                               f"{epoch}/{last_epoch}", before_step, world, epoch)
        state["steps"] = state.get("steps", 0) + metrics["steps"]  # a checkpoint from before the counter: 0
        metrics = {"epoch": epoch, "resumes": state.get("resumes", 0), **metrics}
        verdict = "same"
        if validate is not None and (epoch % tcfg.eval_every == 0 or epoch == tcfg.epochs):
            t_val = time.monotonic()
            val = validate(epoch)
            metrics.update({f"val_{name}": value for name, value in val.items() if name != "count"})
            metrics.update({"eval_users": int(val["count"]), "eval_s": time.monotonic() - t_val})
            verdict = plateau.validated(epoch, state["steps"], val[tcfg.select_by])
            if verdict == "halve":
                halve_rate(optimizer, plateau.stalled(), say)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        if validate is not None:
            # Ray Train ranks checkpoints by the average; an epoch not validated ranks as the best so far.
            metrics[cfg.rank_by] = plateau.smoothed if "eval_s" in metrics else plateau.best
            metrics.setdefault(cfg.score, plateau.best)
            state.update(plateau.state())
        state["epoch"] = epoch
        state["history"].append(metrics)
        say(f"{what} {epoch}/{last_epoch} loss {metrics['loss']:.4f} "
            + (f"val {tcfg.select_by} {metrics[cfg.score]:.4f}"
               + (f" (average {metrics[cfg.rank_by]:.4f})" if tcfg.smoothing else "")
               + f" on {metrics['eval_users']:,} users in {metrics['eval_s']:.1f} s " if "eval_s" in metrics else "")
            + (f"lr {metrics['lr']:g} " if rates is not None else "")
            + f"({metrics['examples_per_s']:,.0f} examples/s)")
        after_epoch(metrics, verdict)
        if verdict == "stop":
            say(f"early stop: {plateau.stalled()}, {state['steps'] - plateau.best_step:,} steps "
                f"(best epoch {plateau.best_epoch})")
            break
    return plateau


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, tcfg: TrainConfig, batches: Iterable[Batch],
                 pace: Progress, say: Callable[[str], None], label: str, before_step: Callable[[int, int], None],
                 world: int, epoch: int) -> dict[str, Any]:
    """One pass over ``batches`` on the model's device: loss, steps, windows and the seconds spent,
    waiting for data among them. The loss is summed where it is computed and read back only for a
    progress line and at the end, so a GPU never waits for the host between steps."""
    t0 = time.monotonic()
    device = model_device(model)
    total, steps, examples, wait = torch.zeros((), dtype=torch.float64, device=device), 0, 0, 0.0
    stream = iter(batches)
    while True:
        t_wait = time.monotonic()
        batch = next(stream, None)
        wait += time.monotonic() - t_wait
        if batch is None:
            break
        steps += 1
        before_step(epoch, steps)
        examples += int(batch["items"].shape[0])
        total += step_losses(model, to_device(batch, device), optimizer, tcfg.grad_clip, tcfg.precision)["loss"]
        if (seconds := pace.due()) is not None:
            say(steps_line(label, steps, examples * world, seconds, wait, float(total) / steps))
    train_s = time.monotonic() - t0
    return {"loss": float(total) / max(steps, 1), "train_s": train_s, "data_wait_s": wait, "steps": steps,
            "examples": examples * world, "examples_per_s": examples * world / max(train_s, 1e-9)}


def steps_line(epoch: str, steps: int, examples: int, seconds: float, wait_s: float, loss: float) -> str:
    """A progress line inside an epoch (``examples``: prefixes or windows, `ModelConfig.examples`). The
    time waiting for data shows why a run's first line is slow: it holds Ray Data's start-up before
    the first batch."""
    return (f"epoch {epoch}: {steps:,} step{'' if steps == 1 else 's'}, about {examples:,} examples in {seconds:,.0f} s "
            f"({examples / seconds:,.0f}/s; {wait_s:,.0f} s of it waiting for data), loss {loss:.4f} so far")


def step_losses(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, grad_clip: float,
                precision: str = "fp32") -> Batch:
    """One optimisation step on a batch already on the model's device; returns the losses as
    detached tensors there (reading them is the caller's sync point)."""
    model.train()
    with autocast(model_device(model), precision):
        losses = model(batch)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if grad_clip > 0:
        clip_gradients(model.parameters(), grad_clip)
    optimizer.step()
    return {k: v.detach() for k, v in losses.items()}


def train_step(
    model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, grad_clip: float, precision: str = "fp32"
) -> dict[str, float]:
    """One optimisation step on a batch (moved to the model's device here); returns the losses as floats."""
    losses = step_losses(model, to_device(batch, model_device(model)), optimizer, grad_clip, precision)
    return {k: float(v) for k, v in losses.items()}
