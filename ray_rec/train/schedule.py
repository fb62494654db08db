"""When training halves its learning rate and when it stops, counted in optimizer steps.

Both epoch loops (the Ray Train worker and the single-process run) feed every validation to one
`Plateau`. Counting steps as well as validations keeps a data set with few steps an epoch from
halving and stopping before it has trained; with many steps an epoch the step floors never bind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from ray_rec.config import TrainConfig

if TYPE_CHECKING:
    from ray_rec.data.manifest import Manifest


@dataclass
class Plateau:
    """Tracks the best validation score and decides, after each validation, whether to halve the
    learning rate or stop.

    The score it reads is an exponential moving average of the validations (``smoothing``: the
    weight of the average so far; 0 = each validation as it is): on a small validation set each
    score moves by about its own standard error, and a lucky one would otherwise reset the counts
    and pick the exported epoch. The rate is halved when ``lr_patience`` validations and
    ``lr_patience_steps`` steps have passed since the last better score or the last halving;
    training stops when ``patience`` validations and ``patience_steps`` steps have passed since the
    last better score (no halving then). Both floors in steps are a minimum training budget too: no
    run stops before ``patience_steps``.

    Example:
        >>> from ray_rec.config import TrainConfig
        >>> p = Plateau(TrainConfig(patience=2, patience_steps=30, lr_patience=1, lr_patience_steps=20, smoothing=0.0))
        >>> [p.validated(epoch, epoch * 10, score) for epoch, score in enumerate([0.1, 0.2, 0.1, 0.1, 0.1, 0.1], 1)]
        ['better', 'better', 'same', 'halve', 'stop', 'stop']
    """

    cfg: TrainConfig
    best: float = -1.0
    best_epoch: int = 0
    best_step: int = 0
    bad: int = 0  # validations since the best
    changed_step: int = 0  # step of the best or the last halving, whichever came later
    since_change: int = 0  # validations since then
    smoothed: float = -1.0  # the moving average after the last validation (-1: none yet)

    def validated(self, epoch: int, step: int, score: float) -> str:
        """Record a validation after ``step`` optimizer steps in all; returns ``better``, ``same``,
        ``halve`` (the caller halves the rate: `halve_rate`) or ``stop``."""
        weight = self.cfg.smoothing if self.smoothed >= 0 else 0.0
        self.smoothed = score = weight * self.smoothed + (1.0 - weight) * score
        if score > self.best:
            self.best, self.best_epoch, self.best_step = score, epoch, step
            self.bad = self.since_change = 0
            self.changed_step = step
            return "better"
        self.bad += 1
        self.since_change += 1
        cfg = self.cfg
        if self.bad >= cfg.patience and step - self.best_step >= cfg.patience_steps:
            return "stop"
        if cfg.lr_patience and self.since_change >= cfg.lr_patience and step - self.changed_step >= cfg.lr_patience_steps:
            self.since_change, self.changed_step = 0, step
            return "halve"
        return "same"

    def stalled(self) -> str:
        """Why the rate halves or training stops, e.g. ``no better validation NDCG@10 (average) for 3
        evaluations``."""
        average = " (average)" if self.cfg.smoothing else ""
        return f"no better validation {self.cfg.select_by}{average} for {self.bad} evaluations"

    def state(self) -> dict[str, Any]:
        """The counters, for a checkpoint's loop state (`restore` reads them back)."""
        return {k: v for k, v in asdict(self).items() if k != "cfg"}

    def restore(self, state: dict[str, Any]) -> None:
        """Counters from a loop state; keys an older checkpoint lacks keep their start values."""
        for key in self.state():
            if key in state:
                setattr(self, key, type(getattr(self, key))(state[key]))


def halve_rate(optimizer: torch.optim.Optimizer, why: str, say: Callable[[str], None] = lambda line: None) -> float:
    """Halve every parameter group's learning rate and ``say`` so; returns the new rate. The rate
    lives in the optimizer's state, so a resumed run continues at the rate its checkpoint reached."""
    for group in optimizer.param_groups:
        group["lr"] *= 0.5
    lr = float(optimizer.param_groups[0]["lr"])
    say(f"learning rate halved to {lr:g}: {why}")
    return lr


def set_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's learning rate to ``lr`` (the final fit replays the split run's rates)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def epoch_rates(history: list[dict[str, Any]], lr: float) -> list[float]:
    """The learning rate each epoch of a run trained at, from its history rows (each row's ``lr``
    is the rate after that epoch's validation, so epoch e ran at row e-1's; the first at ``lr``)."""
    return [lr] + [float(row["lr"]) for row in history[:-1]]


def final_fit_split(manifest: Manifest) -> str | None:
    """The split whose sequences hold every click of every user, for the final fit: ``test``
    under leave-one-out (each user's whole sequence). None for a time split, whose test split
    lacks the users without a click after the cutoff."""
    return "test" if manifest.split.protocol == "leave_one_out" else None


def final_fit_line(epochs: int, split: str | None) -> str:
    """What training says as the final fit starts (or why it is skipped)."""
    if split is None:
        return "final fit: skipped, the data set was split by time (the exported model is the split run's)"
    return (f"final fit: training the exported model again on every click (the {split} split's sequences) for "
            f"{epochs} epoch{'s' if epochs != 1 else ''} at the split run's learning rates; "
            "the reported metrics stay the split run's (train.final_fit=false to skip)")
