"""The model artifact: one self-contained folder written by training, read by everything else.
This module only writes and reads it (with every check); predicting is `ray_rec.predict`.

Layout: ``config.json`` (format, version, model config, training summary), ``weights.safetensors``
(tensors only, no pickle), ``items.parquet`` + ``side_features.json`` (the vocabulary).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ray_rec import storage
from ray_rec.config import SAVED_BEFORE, ModelConfig, build
from ray_rec.model.interest_model import InterestModel
from ray_rec.vocab import Vocabulary

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = "ray_rec.model/1"
HASH_BLOCK = 8 << 20  # bytes of the weights file hashed at a time
REQUIRED_FILES = ("config.json", "weights.safetensors", "items.parquet", "side_features.json")


class ArtifactError(ValueError):
    """The artifact is missing, incomplete or not a ray_rec model."""


@dataclass
class LoadedArtifact:
    """An artifact read back and checked: the model (eval mode), its vocabulary and config.json."""

    model: InterestModel
    vocab: Vocabulary
    meta: dict[str, Any]


def weights_version(path: str) -> str:
    """An artifact's version: the first 12 hex digits of its weights file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def save_model(model: InterestModel, vocab: Vocabulary, folder: str, extra: dict[str, Any] | None = None) -> str:
    """Write the artifact to a local folder or s3:// URI; returns its version id."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.safetensors")
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, weights)
        version = weights_version(weights)
        meta = {
            "format": ARTIFACT_FORMAT,
            "version": version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": asdict(model.config),
            **(extra or {}),
        }
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta, f, indent=2)
        vocab.save(tmp)
        storage.copy_dir(tmp, folder)
    return version


# Largest model (weights and buffers) `load_model` allocates unless told otherwise, and the largest
# config.json it parses: a tampered config must not make a replica allocate until it is killed.
DEFAULT_MAX_MODEL_MB = 4096
MAX_CONFIG_BYTES = 1 << 20


def _read_meta(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise ArtifactError(f"{path} is over {MAX_CONFIG_BYTES} bytes: not a ray_rec model config")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ArtifactError(f"{folder}: format {found!r} is not {ARTIFACT_FORMAT!r}")
    if not isinstance(meta.get("model"), dict):
        raise ArtifactError(f"{path} has no model section")
    return meta


def _check_weights(folder: str, config: ModelConfig, max_model_mb: float) -> str:
    """Check the weights file against the config before anything is allocated; returns its version.

    The model is built on the ``meta`` device (no memory) to learn the tensors the config implies;
    their size must fit ``max_model_mb``, and the file must hold exactly those names and shapes.
    """
    with torch.device("meta"):
        skeleton = InterestModel(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    need = sum(t.numel() * t.element_size() for t in itertools.chain(skeleton.parameters(), skeleton.buffers()))
    if need > max_model_mb * 2**20:
        raise ArtifactError(
            f"{folder}: the config asks for a {need / 2**20:,.0f} MB model ({config.num_items:,} items, dim {config.dim}), "
            f"over the {max_model_mb:,.0f} MB budget (max_model_mb)"
        )
    path = os.path.join(folder, "weights.safetensors")
    try:
        with safe_open(path, "pt") as f:
            found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise ArtifactError(f"{path} cannot be read as safetensors: {exc}") from None
    if found != expected:
        diff = sorted(set(found) ^ set(expected)) or [n for n in expected if found[n] != expected[n]]
        name = diff[0]
        raise ArtifactError(
            f"{folder}: weights do not match the config: {name} is {found.get(name, 'missing')} in the weights, "
            f"{expected.get(name, 'absent')} by the config ({len(diff)} tensor(s) differ)"
        )
    return weights_version(path)


def _read_local(folder: str, max_model_mb: float = DEFAULT_MAX_MODEL_MB) -> LoadedArtifact:
    missing = [f for f in REQUIRED_FILES if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise ArtifactError(f"{folder} is not a complete ray_rec model: missing {', '.join(missing)}")
    meta = _read_meta(folder)
    config = build(ModelConfig, {**SAVED_BEFORE, **meta["model"]}, "model")
    version = _check_weights(folder, config, max_model_mb)
    if meta.get("version") != version:
        raise ArtifactError(
            f"{folder}: config.json names version {meta.get('version')!r} but the weights are {version!r}: "
            f"the files come from different models or were altered"
        )
    state = load_file(os.path.join(folder, "weights.safetensors"))
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ArtifactError(f"{folder}: weights hold NaN or infinite values ({', '.join(bad[:3])})")
    model = InterestModel(config)
    model.load_state_dict(state)
    vocab = Vocabulary.load(folder)
    if len(vocab) != config.num_items:
        raise ArtifactError(f"{folder}: vocabulary has {len(vocab)} items, the model {config.num_items}")
    return LoadedArtifact(model.eval(), vocab, meta)


def read_artifact(uri: str, max_model_mb: float | None = None) -> LoadedArtifact:
    """Read an artifact from a local folder or an s3:// URI.

    Everything is checked before it is used: the config's model size against ``max_model_mb``, the
    weights' names and shapes against the config (before the model is allocated), the version
    against the weights' own hash, every weight finite. ``max_model_mb``: `DEFAULT_MAX_MODEL_MB`
    when None. (`ray_rec.predict.load_model` adds a trial prediction.)

    Raises:
        ArtifactError: the folder is missing, incomplete, corrupt, too large or of another format.
    """
    max_model_mb = DEFAULT_MAX_MODEL_MB if max_model_mb is None else max_model_mb
    if storage.is_s3(uri):
        with tempfile.TemporaryDirectory() as tmp:
            _fetch(uri, tmp, max_model_mb)
            return _read_local(tmp, max_model_mb)
    if not os.path.isdir(uri):
        raise ArtifactError(f"{uri} is not a folder holding a ray_rec model")
    return _read_local(uri, max_model_mb)


def _fetch(uri: str, folder: str, max_model_mb: float) -> None:
    """Download the artifact's own files (nothing else under the prefix), refusing any file larger
    than the model budget before it is fetched."""
    for name in REQUIRED_FILES:  # config.json first: a folder without it holds no model at all
        size = storage.size(storage.join(uri, name))
        if size is None and name == "config.json":
            raise ArtifactError(f"{uri} holds no ray_rec model (no config.json)")
        if size is None:
            raise ArtifactError(f"{uri} is not a complete ray_rec model: missing {name}")
        if size > max_model_mb * 2**20 + MAX_CONFIG_BYTES:
            raise ArtifactError(f"{uri}/{name} is {size / 2**20:,.0f} MB, over the {max_model_mb:,.0f} MB budget (max_model_mb)")
        storage.download(storage.join(uri, name), os.path.join(folder, name))
