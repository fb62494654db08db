"""Training checkpoints: the model artifact plus the trainer's state, both pickle-free to read."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ray_rec.model.artifact import save_model
from ray_rec.model.interest_model import InterestModel
from ray_rec.vocab import Vocabulary

STATE_FILE = "trainer_state.pt"
HISTORY_FILE = "history.json"


def write_checkpoint(
    folder: str, model: InterestModel, vocab: Vocabulary, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Write the artifact, the optimizer state and the loop state (epoch, best, history)."""
    save_model(model, vocab, folder, extra={"training": {k: v for k, v in state.items() if k != "history"}})
    torch.save({"optimizer": optimizer.state_dict(), "epoch": state["epoch"]}, os.path.join(folder, STATE_FILE))
    with open(os.path.join(folder, HISTORY_FILE), "w") as f:
        json.dump(state, f)


def read_checkpoint(folder: str, model: InterestModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer from a checkpoint folder; returns the loop state."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(os.path.join(folder, "weights.safetensors")))
    saved = torch.load(os.path.join(folder, STATE_FILE), weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    with open(os.path.join(folder, HISTORY_FILE)) as f:
        return json.load(f)


def newest_complete_checkpoint(run_uri: str) -> tuple[str, int] | None:
    """(folder, epoch) of the newest checkpoint under a Ray Train run folder that holds every file
    a resume needs, by the epoch in its history; None if there is none.

    Ray Train hands a restarted worker the last checkpoint its controller registered; a worker
    that dies within a moment of reporting one can beat that registration, and the restart would
    begin from scratch. Looking in storage as well closes that gap.
    """
    from ray_rec import storage
    from ray_rec.model.artifact import REQUIRED_FILES

    by_folder: dict[str, set[str]] = {}
    for rel in storage.list_files(run_uri):
        folder, _, name = rel.rpartition("/")
        if folder.startswith("checkpoint_") and "/" not in folder:
            by_folder.setdefault(folder, set()).add(name)
    best: tuple[str, int] | None = None
    for folder, names in by_folder.items():
        if not {*REQUIRED_FILES, STATE_FILE, HISTORY_FILE} <= names:
            continue  # a partial upload
        try:
            epoch = int(json.loads(storage.read_bytes(storage.join(run_uri, folder, HISTORY_FILE)))["epoch"])
        except (ValueError, KeyError, OSError):
            continue
        if best is None or epoch > best[1]:
            best = (storage.join(run_uri, folder), epoch)
    return best
