"""Training checkpoints: the model artifact plus the trainer's state, nothing of it pickled.

The optimizer's tensors go to ``optimizer.safetensors`` and the rest of its state (hyperparameters,
which tensor belongs to which parameter) to ``optimizer.json``; the loop state is ``history.json``.
``torch.load`` is never called: its ``weights_only`` unpickler has had bypasses (CVE-2025-32434).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ray_rec.model.artifact import ArtifactError, save_model
from ray_rec.model.interest_model import InterestModel
from ray_rec.vocab import Vocabulary

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
HISTORY_FILE = "history.json"
STATE_FILES = (OPTIMIZER_TENSORS, OPTIMIZER_META, HISTORY_FILE)
LEGACY_STATE_FILE = "trainer_state.pt"  # a pickle, written before 0.1.1; never read


def optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's ``state_dict`` split into tensors (named ``<param>/<field>``) and JSON."""
    saved = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for param, fields in saved["state"].items():
        plain[str(param)] = {}
        for name, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{name}"] = value.detach().cpu().contiguous()
            else:
                plain[str(param)][name] = value
    return tensors, {"param_groups": saved["param_groups"], "state": plain}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `optimizer_files`: a ``state_dict`` for ``Optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {int(param): dict(fields) for param, fields in meta["state"].items()}
    for key, value in tensors.items():
        param, _, name = key.partition("/")
        state.setdefault(int(param), {})[name] = value
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
              for group in meta["param_groups"]]  # JSON made Adam's betas a list
    return {"state": state, "param_groups": groups}


def write_checkpoint(
    folder: str, model: InterestModel, vocab: Vocabulary, optimizer: torch.optim.Optimizer, state: dict[str, Any],
    lineage: dict[str, Any] | None = None,
) -> None:
    """Write the artifact (with the run's ``lineage``), the optimizer state and the loop state
    (epoch, best, history)."""
    training = {k: v for k, v in state.items() if k != "history"}
    save_model(model, vocab, folder, extra={"training": training, "lineage": lineage})
    tensors, meta = optimizer_files(optimizer)
    save_file(tensors, os.path.join(folder, OPTIMIZER_TENSORS))
    with open(os.path.join(folder, OPTIMIZER_META), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(folder, HISTORY_FILE), "w") as f:
        json.dump(state, f)


def read_checkpoint(folder: str, model: InterestModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer from a checkpoint folder; returns the loop state.

    Raises:
        ArtifactError: a file is missing or is not what ray_rec writes (a planted pickle, say).
    """
    missing = [name for name in STATE_FILES if not os.path.exists(os.path.join(folder, name))]
    if missing:
        old = os.path.exists(os.path.join(folder, LEGACY_STATE_FILE))
        raise ArtifactError(
            f"checkpoint {folder} lacks {', '.join(missing)}"
            + (f": it was written by an older ray_rec whose {LEGACY_STATE_FILE} is a pickle, which is not read; "
               "start the run again without --resume" if old else "")
        )
    try:
        weights = load_file(os.path.join(folder, "weights.safetensors"))
        tensors = load_file(os.path.join(folder, OPTIMIZER_TENSORS))
        with open(os.path.join(folder, OPTIMIZER_META)) as f:
            meta = json.load(f)
        with open(os.path.join(folder, HISTORY_FILE)) as f:
            history = json.load(f)
    except (SafetensorError, ValueError, OSError) as exc:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"checkpoint {folder} cannot be read: {exc}") from None
    model.load_state_dict(weights)
    optimizer.load_state_dict(optimizer_state(tensors, meta))
    return history


def _checkpoint_files(run_uri: str) -> dict[str, set[str]]:
    """Each checkpoint folder under a Ray Train run folder -> the names of the files it holds."""
    from ray_rec import storage

    by_folder: dict[str, set[str]] = {}
    for rel in storage.list_files(run_uri):
        folder, _, name = rel.rpartition("/")
        if folder.startswith("checkpoint_") and "/" not in folder:
            by_folder.setdefault(folder, set()).add(name)
    return by_folder


def _complete(names: set[str]) -> bool:
    from ray_rec.model.artifact import REQUIRED_FILES

    return {*REQUIRED_FILES, *STATE_FILES} <= names


def newest_complete_checkpoint(run_uri: str) -> tuple[str, int] | None:
    """(folder, epoch) of the newest checkpoint under a Ray Train run folder that holds every file
    a resume needs, by the epoch in its history; None if there is none.

    Ray Train hands a restarted worker the last checkpoint its controller registered; a worker
    that dies within a moment of reporting one can beat that registration, and the restart would
    begin from scratch. Looking in storage as well closes that gap.
    """
    from ray_rec import storage

    best: tuple[str, int] | None = None
    for folder, names in _checkpoint_files(run_uri).items():
        if not _complete(names):
            continue  # a partial upload
        try:
            epoch = int(json.loads(storage.read_bytes(storage.join(run_uri, folder, HISTORY_FILE)))["epoch"])
        except (ValueError, KeyError, OSError):
            continue
        if best is None or epoch > best[1]:
            best = (storage.join(run_uri, folder), epoch)
    return best


def remove_partial_checkpoints(run_uri: str) -> list[str]:
    """Delete the checkpoint folders under a finished Ray Train run folder that lack a file (a
    worker killed while uploading one leaves it; Ray Train never registered it); returns their
    names. Call it only once no worker of the run is left."""
    from ray_rec import storage

    partial = sorted(folder for folder, names in _checkpoint_files(run_uri).items() if not _complete(names))
    for folder in partial:
        storage.delete_dir(storage.join(run_uri, folder))
    return partial
