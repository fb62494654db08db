"""What a run was made of, recorded in every checkpoint and artifact (``config.json``'s
``lineage``) and in the run folder's ``lineage.json``, and what ``--resume`` compares against.

Fields: ``config`` (every section, the model as trained: with the data set's choices filled in),
``data`` (URI, manifest fingerprint, counts), ``code`` (ray_rec version and source commit when
known), ``versions`` (Python, Ray, PyTorch, pyarrow), ``seeds``, ``workers``, ``device``,
``tracking`` (MLflow URI and run id, when tracked), ``started``, and ``changes`` (settings a
resume changed with ``--allow-changes``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray_rec import __version__, storage
from ray_rec.config import SAVED_BEFORE, Config, ModelConfig
from ray_rec.errors import TrainingError

if TYPE_CHECKING:
    from ray_rec.data.manifest import Manifest

logger = logging.getLogger(__name__)

LINEAGE_FILE = "lineage.json"
COMMIT_ENV = "RAY_REC_COMMIT"  # set in images built without the repository's .git


def manifest_fingerprint(manifest: Manifest) -> str:
    """A short hash of a data set's manifest (its files, counts and vocabulary facts)."""
    return hashlib.sha256(json.dumps(manifest.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def source_commit() -> str | None:
    """The commit of the ray_rec source that runs (``-dirty`` with uncommitted changes), from
    `COMMIT_ENV` or the repository the package sits in; None when neither is there."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_lineage(config: Config, model: ModelConfig, data: str, manifest: Manifest, workers: int, device: str,
                tracking: dict[str, str] | None = None) -> dict[str, Any]:
    """The lineage of a run that starts now; ``model``: the model config as trained (`for_data`)."""
    resolved = config.to_dict()
    resolved["model"] = asdict(model)
    return {
        "config": resolved,
        "data": {"uri": data, "manifest_sha256": manifest_fingerprint(manifest),
                 "users": manifest.counts.users, "items": manifest.counts.items},
        "code": {"ray_rec": __version__, "commit": source_commit()},
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in ("ray", "torch", "pyarrow")}},
        "seeds": {"data": config.data.seed, "train": config.train.seed},
        "workers": workers,
        "device": device,
        "tracking": tracking,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "changes": [],
    }


def start_lineage(output: str, config: Config, model: ModelConfig, data: str, manifest: Manifest, workers: int,
                  device: str, resume: bool, allow_changes: bool) -> tuple[dict[str, Any], list[str]]:
    """The lineage a run goes on with: new, or on ``resume`` the one ``output`` recorded, checked
    against this start (`resume_lineage`); and the settings the resume changed (logged)."""
    lineage = run_lineage(config, model, data, manifest, workers, device)
    stored = read_lineage(output) if resume else None
    if stored is None:
        if resume:
            logger.warning("--resume: this run recorded no lineage (an older ray_rec): its settings cannot be compared")
        return lineage, []
    lineage, changes = resume_lineage(stored, lineage, allow_changes)
    for line in changes:
        logger.warning("--resume with a changed setting: %s", line)
    return lineage, changes


def read_lineage(output: str) -> dict[str, Any] | None:
    """The lineage a run folder recorded when it started; None for a run written before lineage."""
    uri = storage.join(output, LINEAGE_FILE)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


def write_lineage(output: str, lineage: dict[str, Any]) -> None:
    storage.write_bytes(storage.join(output, LINEAGE_FILE), json.dumps(lineage, indent=2).encode())


def _differences(before: dict[str, Any], after: dict[str, Any], prefix: str) -> list[str]:
    return [f"{prefix}.{key}: {before.get(key)!r} -> {after.get(key)!r}"
            for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]


def resume_lineage(stored: dict[str, Any], new: dict[str, Any], allow_changes: bool) -> tuple[dict[str, Any], list[str]]:
    """The lineage a resumed run continues with, and the settings it changes.

    The run goes on with the stored lineage (its start, tracking run and earlier changes) and the
    new configuration. A changed data set or model shape is always refused; changed data, train
    or eval settings only with ``allow_changes``, and are then recorded under ``changes``.

    Raises:
        TrainingError: naming every difference.
    """
    data_then, data_now = stored["data"], new["data"]
    if (data_then["uri"], data_then["manifest_sha256"]) != (data_now["uri"], data_now["manifest_sha256"]):
        raise TrainingError(
            f"--resume: the run was trained on {data_then['uri']} (manifest {data_then['manifest_sha256']}), "
            f"not {data_now['uri']} (manifest {data_now['manifest_sha256']}); start a new run for another data set"
        )
    then, now = stored["config"], new["config"]
    shape = _differences({**SAVED_BEFORE, **then["model"]}, now["model"], "model")
    if shape:
        raise TrainingError(f"--resume: the model differs from the run's, so its weights cannot continue: {'; '.join(shape)}")
    changes = [line for section in ("data", "train", "eval") for line in _differences(then.get(section, {}), now[section], section)]
    if changes and not allow_changes:
        raise TrainingError(f"--resume: settings differ from the run's: {'; '.join(changes)}. Pass --allow-changes "
                            "to continue with the new ones, or resume with the run's own")
    lineage = {**stored, "config": now, "workers": new["workers"], "device": new["device"],
               "code": new["code"], "versions": new["versions"]}
    if changes:
        lineage["changes"] = [*stored.get("changes", []), {"at": new["started"], "settings": changes}]
    return lineage, changes


def describe(lineage: dict[str, Any] | None) -> str:
    """One line on where a model came from, for `ray-rec evaluate` and `batch-score`."""
    if not lineage:
        return "lineage: not recorded (trained before ray_rec recorded it)"
    data, code, versions = lineage["data"], lineage["code"], lineage["versions"]
    commit = (code.get("commit") or "commit unknown")[:12]
    tracked = f"; MLflow run {lineage['tracking']['run_id']}" if lineage.get("tracking") else ""
    return (f"trained on {data['uri']} (manifest {data['manifest_sha256']}, {data['users']:,} users) by ray_rec "
            f"{code['ray_rec']} @ {commit}, Ray {versions.get('ray')}, PyTorch {versions.get('torch')}, "
            f"{lineage['workers']} worker(s) on {lineage['device']}, seeds {lineage['seeds']}{tracked}")
