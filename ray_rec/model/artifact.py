"""The model artifact: one self-contained folder written by training, read by everything else.

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ray_rec import storage
from ray_rec.config import ModelConfig, build
from ray_rec.data.examples import MAX_ABS_SECONDS, time_buckets
from ray_rec.model.interest_model import InterestModel
from ray_rec.vocab import RawId, Vocabulary

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = "ray_rec.model/1"
HASH_BLOCK = 8 << 20  # bytes of the weights file hashed at a time
REQUIRED_FILES = ("config.json", "weights.safetensors", "items.parquet", "side_features.json")


class ArtifactError(ValueError):
    """The artifact is missing, incomplete or not a ray_rec model."""


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


# Histories encoded at once, and catalog scores (histories x items) `recommend` holds at once (32M
# floats, 128 MB). More go in blocks, so a call with every user of a large data set stays within
# memory (and runs faster than one block: README "Top-k at catalog scale").
BLOCK_ROWS = 1024
BLOCK_CELLS = 1 << 25


def catalog_blocks(rows: int, num_items: int, max_rows: int | None = None) -> Iterator[slice]:
    """Slices of ``rows`` users whose catalog scores (users x (num_items + 1)) stay within
    ``BLOCK_CELLS``, at most ``max_rows`` users and at least one each. `recommend` and full-ranking
    evaluation (``ray_rec.train.loop.rank_targets``) score in these blocks."""
    step = max(1, BLOCK_CELLS // (num_items + 1))
    step = step if max_rows is None else min(step, max_rows)
    for start in range(0, rows, step):
        yield slice(start, start + step)


def check_rows(name: str, rows: Iterable[Iterable[Any]], what: str = "item ids") -> list[list[Any]]:
    """``rows`` as lists, one per user (each a list, tuple or array). A flat list of ids is
    refused: it would otherwise read each id's characters as a history of unknown items."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
        raise TypeError(f"{name} must be a list of lists of {what}, got {type(rows).__name__}")
    rows = list(rows)  # a generator is read once
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, Iterable):
            raise TypeError(
                f"{name}[{i}] is {type(row).__name__} {row!r:.40}, not a list of {what} "
                f"(pass one list per user: [[{what[:-1]}, ...], ...])"
            )
    return [list(row) for row in rows]


def click_time_buckets(stamps: Sequence[float], clicks: int, num_buckets: int, name: str = "timestamps") -> np.ndarray:
    """One history's click times (epoch seconds, or milliseconds as `prepare` reads them, oldest
    first) -> the time bucket of each click, as training buckets them (the first click: 1).
    Errors name the times ``name``."""
    try:
        ts = np.asarray(stamps, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers (epoch seconds or milliseconds)") from None
    if ts.ndim != 1 or len(ts) != clicks:
        raise ValueError(f"{name} has {ts.size} values for {clicks} history items")
    if not np.isfinite(ts).all():
        raise ValueError(f"{name} holds a value that is not a finite number")
    ts = np.where(np.abs(ts) > MAX_ABS_SECONDS, ts / 1000.0, ts)
    if (np.diff(ts) < 0).any():
        raise ValueError(f"{name} must be oldest first, as the history is (they decrease)")
    return time_buckets(np.concatenate([[-1.0], np.diff(ts)]), num_buckets)


def pad_rows(rows: Sequence[Sequence[int]], left: bool = False) -> torch.Tensor:
    """Ragged rows of item indices -> one (len(rows), longest row or 1) LongTensor padded with 0,
    on the left (histories: each row's last click in the last column) or on the right.

    One boolean-mask fill for the whole batch: 32 histories of 3-50 items took 0.6-1.0 ms row by
    row (a tensor and a slice assignment each), 0.04-0.08 ms this way.
    """
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = max(int(lengths.max(initial=0)), 1)
    out = np.zeros((len(rows), width), dtype=np.int64)
    pos = np.arange(width)
    fill = pos >= (width - lengths)[:, None] if left else pos < lengths[:, None]
    out[fill] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(out)


class Recommender:
    """A loaded model with the public API on raw item ids.

    Example:
        >>> rec = load_model("out/model")  # doctest: +SKIP
        >>> rec.recommend([[12, 7, 3]], k=5)  # doctest: +SKIP
        [[(41, 7.1), (9, 6.8), ...]]
    """

    def __init__(self, model: InterestModel, vocab: Vocabulary, meta: dict[str, Any], uri: str) -> None:
        self.model = model.eval()
        self.vocab = vocab
        self.meta = meta
        self.uri = uri
        self.version: str = meta["version"]
        self.loaded_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._by_clicks: np.ndarray | None = None  # item positions, most clicked first (on first use)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def info(self) -> dict[str, Any]:
        """What this model is and where it came from: version, location, creation time, and the
        run's ``lineage`` (configuration, data set, code and versions, seeds, workers, device,
        tracking; None for artifacts written before it was recorded) and ``training`` summary."""
        return {"version": self.version, "uri": self.uri, "created": self.meta.get("created"),
                "lineage": self.meta.get("lineage"), "training": self.meta.get("training")}

    def window(self, known: Sequence[Sequence[int]]) -> torch.Tensor:
        """Item-index histories -> the left-padded (B, L) last ``history_len`` steps the model reads."""
        return pad_rows([row[-self.config.history_len :] for row in known], left=True)

    def lookup(
        self, history: Sequence[RawId], stamps: Sequence[float] | None = None, name: str = "timestamps"
    ) -> tuple[list[int], list[RawId], list[int] | None]:
        """One raw history -> the indices of its known items, its unknown ids, and, given its
        click times (checked; errors name them ``name``), the known items' time buckets: None
        without times or for a model that reads no time."""
        index = self.vocab.indices(history)
        known = [i for i in index if i is not None]
        unknown = [raw for raw, i in zip(history, index) if i is None]
        if stamps is None:
            return known, unknown, None
        buckets = click_time_buckets(stamps, len(history), self.config.time_buckets, name)
        if self.model.features.time is None:
            return known, unknown, None
        return known, unknown, [int(b) for b, i in zip(buckets, index) if i is not None]

    def _lookup(
        self, histories: Iterable[Iterable[RawId]], timestamps: Iterable[Iterable[float]] | None = None
    ) -> tuple[list[list[int]], list[list[RawId]], list[list[int]] | None]:
        """``lookup`` for a list of histories (checked once): known indices, unknown ids, and the
        time buckets (None without timestamps or for a model that reads no time)."""
        rows = check_rows("histories", histories)
        stamps = None if timestamps is None else check_rows("timestamps", timestamps, "click times")
        if stamps is not None and len(stamps) != len(rows):
            raise ValueError(f"{len(rows)} histories but {len(stamps)} timestamp lists")
        looked_up = [self.lookup(raw, None if stamps is None else stamps[i], f"timestamps[{i}]") for i, raw in enumerate(rows)]
        known, unknown = [k for k, _, _ in looked_up], [u for _, u, _ in looked_up]
        reads_time = stamps is not None and self.model.features.time is not None
        return known, unknown, [b or [] for _, _, b in looked_up] if reads_time else None

    def score(
        self,
        histories: list[list[RawId]],
        candidates: list[list[RawId]],
        timestamps: list[list[float]] | None = None,
    ) -> list[list[float | None]]:
        """Relevance of each candidate to each history (higher = more likely the next click).

        Unknown candidates get None. ``histories`` and ``candidates`` are parallel lists. A history
        with no known item scores its candidates by their training click counts, as ``recommend``
        ranks for it. ``timestamps``: optional, as in ``recommend``.
        """
        known, _, times = self._lookup(histories, timestamps)
        index = [[self.vocab.index_of(raw) or 0 for raw in row] for row in check_rows("candidates", candidates)]
        if len(known) != len(index):
            raise ValueError(f"{len(known)} histories but {len(index)} candidate lists")
        rows = [r for r, row in enumerate(known) if row]  # the others score by click counts
        scores = [[] if history else self.clicks(row) for history, row in zip(known, index)]
        for start in range(0, len(rows), BLOCK_ROWS):
            block = rows[start : start + BLOCK_ROWS]
            model_scores = self.model.score(
                self.window([known[r] for r in block]),
                pad_rows([index[r] for r in block]),
                None if times is None else self.window([times[r] for r in block]),
            ).tolist()
            for r, row_scores in zip(block, model_scores):
                scores[r] = row_scores
        return [[s if i else None for s, i in zip(row_scores, row)] for row_scores, row in zip(scores, index)]

    def recommend(
        self,
        histories: list[list[RawId]],
        k: int = 10,
        exclude_seen: bool = True,
        timestamps: list[list[float]] | None = None,
    ) -> list[list[tuple[RawId, float]]]:
        """The top-k items of the catalog for each history, as (raw id, score), best first.

        A history with no known item (empty, or only ids the model never saw) tells the model
        nothing: it gets the most clicked items instead, scored by their training click counts
        (``popular``; the HTTP API marks such answers ``"fallback": "popularity"``).

        ``timestamps``: optional click times, one list per history, one epoch second (or
        millisecond) per item, oldest first. A model trained on data with times reads the time
        between clicks as it did in training; without them every gap reads as unknown.
        """
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        known, _, times = self._lookup(histories, timestamps)
        rows = [r for r, row in enumerate(known) if row]
        fallback = self.popular(k) if len(rows) < len(known) else []
        answers: list[list[tuple[RawId, float]]] = [[] if row else list(fallback) for row in known]
        for block in catalog_blocks(len(rows), len(self.vocab), BLOCK_ROWS):
            with_history = [known[r] for r in rows[block]]
            exclude = pad_rows(with_history) if exclude_seen else None
            buckets = None if times is None else self.window([times[r] for r in rows[block]])
            ids, scores = self.model.recommend(self.window(with_history), k, exclude=exclude, time_buckets=buckets)
            for r, row_ids, row_scores in zip(rows[block], ids.tolist(), scores.tolist()):
                answers[r] = [(self.vocab.raw_id(i), s) for i, s in zip(row_ids, row_scores) if s != float("-inf")]
        return answers

    def clicks(self, index: Sequence[int]) -> list[float]:
        """Training click counts of item indices (0 for padding)."""
        return [float(self.vocab.counts[i - 1]) if i else 0.0 for i in index]

    def popular(self, k: int) -> list[tuple[RawId, float]]:
        """The k most clicked items of the training data, as (raw id, click count), most clicked first."""
        if self._by_clicks is None:  # ties keep the vocabulary's order
            self._by_clicks = np.argsort(-np.asarray(self.vocab.counts, dtype=np.float64), kind="stable")
        return [(self.vocab.raw_id(int(i) + 1), float(self.vocab.counts[i])) for i in self._by_clicks[:k]]

    def self_check(self) -> None:
        """One trial ``recommend`` and ``score``; raises `ArtifactError` unless every score is a
        finite number (a model that loads but answers NaN must not replace a working one)."""
        first = self.vocab.raw_id(1)
        top = self.recommend([[first]], k=min(10, len(self.vocab)), exclude_seen=False)[0]
        scores = [s for _, s in top] + [s for s in self.score([[first]], [[first]])[0] if s is not None]
        if not scores or not np.isfinite(scores).all():
            raise ArtifactError(f"{self.uri}: a trial prediction gave {scores[:3]}: the model does not answer with finite scores")


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


def _read_local(folder: str, max_model_mb: float = DEFAULT_MAX_MODEL_MB) -> Recommender:
    missing = [f for f in REQUIRED_FILES if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise ArtifactError(f"{folder} is not a complete ray_rec model: missing {', '.join(missing)}")
    meta = _read_meta(folder)
    config = build(ModelConfig, meta["model"], "model")
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
    rec = Recommender(model, vocab, meta, folder)
    rec.self_check()
    return rec


def load_model(uri: str, max_model_mb: float | None = None) -> Recommender:
    """Load an artifact from a local folder or an s3:// URI.

    Everything is checked before it is used: the config's model size against ``max_model_mb``, the
    weights' names and shapes against the config (before the model is allocated), the version
    against the weights' own hash, every weight finite, and one trial prediction. ``max_model_mb``:
    `DEFAULT_MAX_MODEL_MB` when None.

    Raises:
        ArtifactError: the folder is missing, incomplete, corrupt, too large or of another format.
    """
    max_model_mb = DEFAULT_MAX_MODEL_MB if max_model_mb is None else max_model_mb
    if storage.is_s3(uri):
        with tempfile.TemporaryDirectory() as tmp:
            _fetch(uri, tmp, max_model_mb)
            rec = _read_local(tmp, max_model_mb)
    else:
        if not os.path.isdir(uri):
            raise ArtifactError(f"{uri} is not a folder holding a ray_rec model")
        rec = _read_local(uri, max_model_mb)
    rec.uri = uri
    logger.info("loaded model %s from %s (%d items)", rec.version, uri, len(rec.vocab))
    return rec


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
