"""Typed, frozen settings for model, data and training (serving: `ray_rec.serve.schemas.ServeArgs`).

YAML files and CLI flags only fill these in; all validation lives in ``__post_init__`` so a bad
value is reported once, naming the field and the value. Importing this module does nothing.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from ray_rec.shape import LONG_HISTORY, LONG_HISTORY_CLICKS, SHORT_HISTORY, history_window

TRACKERS = ("transformer", "gru")
ENHANCERS = ("augru", "trend", "none")
RELEVANCES = ("dot", "mlp")
LOSSES = ("auto", "ce", "sampled_softmax", "bce")

# Above this many (catalog items x history length) `loss: auto` switches from full cross-entropy
# to sampled softmax: the full softmax scores every position against every item (its memory is
# bounded by chunking, its compute is not), sampled softmax against 2048 shared negatives.
# At the short-history length of 50 that is a catalog of 200,000 items.
FULL_SOFTMAX_MAX_CELLS = 200_000 * 50

# In-batch negatives a sampled-softmax step draws at most (a random subset of its positions' next
# clicks past that): 128 windows x 200 steps would otherwise score 25,600 x 25,600 pairs.
IN_BATCH_NEGATIVES = 2048


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _check_range(name: str, value: float, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be {bound}")


@dataclass(frozen=True)
class ModelConfig:
    """The interest model's architecture.

    ``num_items`` and ``side_features`` describe the catalog and are filled from the data set's
    manifest at training time; the rest are choices.
    """

    num_items: int = 0  # catalog size; valid item indices are 1..num_items, 0 is padding
    side_features: dict[str, int] = field(default_factory=dict)  # name -> vocabulary size
    max_len: int | None = None  # history length read; None: half the users' average clicks, within [50, 200]
    dim: int = 64
    use_time: bool = True  # bucketed time since the previous click (ignored if data has none)
    time_buckets: int = 24
    tracker: str = "transformer"
    tracker_layers: int | None = None  # None: 1, or 2 when users average >= 40 clicks
    heads: int = 1
    enhancer: str = "augru"  # measured best on Beauty over 3 seeds; see README "Model quality"
    relevance: str = "dot"
    dropout: float | None = None  # dropout everywhere; None: 0.5, or 0.2 when users average >= 40 clicks
    loss: str = "auto"
    num_negatives: int | None = None  # sampled negatives; None: 2048 for `sampled_softmax` over `dot`, else 256
    in_batch_negatives: bool = True  # sampled softmax over `dot` also draws the batch's next clicks (logQ-corrected)
    aux_loss_weight: float = 0.0  # DIEN's auxiliary next-click loss on the interest states (off: see README)

    def __post_init__(self) -> None:
        _check_choice("model.tracker", self.tracker, TRACKERS)
        _check_choice("model.enhancer", self.enhancer, ENHANCERS)
        _check_choice("model.relevance", self.relevance, RELEVANCES)
        _check_choice("model.loss", self.loss, LOSSES)
        _check_range("model.num_items", self.num_items, 0)
        if self.max_len is not None:
            _check_range("model.max_len", self.max_len, 2, 4096)
        _check_range("model.dim", self.dim, 4, 4096)
        if self.tracker_layers is not None:
            _check_range("model.tracker_layers", self.tracker_layers, 1, 24)
        _check_range("model.heads", self.heads, 1, 64)
        if self.dropout is not None:
            _check_range("model.dropout", self.dropout, 0.0, 0.95)
        _check_range("model.time_buckets", self.time_buckets, 2, 256)
        if self.num_negatives is not None:
            _check_range("model.num_negatives", self.num_negatives, 1)
        _check_range("model.aux_loss_weight", self.aux_loss_weight, 0.0)
        if self.dim % self.heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.heads={self.heads}")
        for name, size in self.side_features.items():
            if size < 1:
                raise ValueError(f"model.side_features[{name!r}]={size} must be >= 1")

    @property
    def history_len(self) -> int:
        """``max_len``, or the short-history default while the data set has not chosen it."""
        return SHORT_HISTORY.max_len if self.max_len is None else self.max_len

    @property
    def dropout_p(self) -> float:
        """``dropout``, or the short-history default while the data set has not chosen it."""
        return SHORT_HISTORY.dropout if self.dropout is None else self.dropout

    @property
    def layers(self) -> int:
        """``tracker_layers``, or the short-history default while the data set has not chosen it."""
        return SHORT_HISTORY.tracker_layers if self.tracker_layers is None else self.tracker_layers

    @property
    def resolved_loss(self) -> str:
        """The loss actually used: `auto` picks full softmax for dot relevance and small catalogs."""
        if self.loss != "auto":
            return self.loss
        if self.relevance == "dot" and self.num_items * self.history_len <= FULL_SOFTMAX_MAX_CELLS:
            return "ce"
        return "sampled_softmax"

    @property
    def negatives(self) -> int:
        """``num_negatives``, or by the loss: 2048 negatives shared by the batch when sampled softmax
        scores them with a dot product (one (positions x 2048) product; measured in README "Model
        quality"), 256 when an MLP scores every pair or `bce` draws them per position."""
        if self.num_negatives is not None:
            return self.num_negatives
        return 2048 if self.resolved_loss == "sampled_softmax" and self.relevance == "dot" else 256

    @property
    def mixes_in_batch(self) -> bool:
        """Whether the sampled softmax also takes the batch's next clicks (up to
        ``IN_BATCH_NEGATIVES`` of them) as negatives: with the dot product only, where they cost one
        more (positions x drawn) product; an MLP would score every pair."""
        return self.in_batch_negatives and self.resolved_loss == "sampled_softmax" and self.relevance == "dot"

    @property
    def dot_term(self) -> ModelConfig | None:
        """What the MLP relevance's u . v term also trains under while the MLP trains with sampled
        softmax: the loss and negatives `relevance: dot` gets by default (the full softmax while the
        catalog fits, else 2048 shared negatives). None for every other setting."""
        if self.relevance != "mlp" or self.resolved_loss != "sampled_softmax":
            return None
        return dataclasses.replace(self, relevance="dot", loss="auto", num_negatives=None)

    @property
    def reads_item_sample(self) -> bool:
        """Whether every training loss reads only some items a step (sampled softmax, `bce`: the
        batch's items and the negatives drawn), never the whole catalog as the full softmax does."""
        dot = self.dot_term
        return self.resolved_loss != "ce" and (dot is None or dot.resolved_loss != "ce")

    def loss_text(self) -> str:
        """The loss actually used, with its negatives: e.g. `ce`, `sampled_softmax (2048 negatives)`."""
        if self.resolved_loss == "ce":
            return "ce"
        in_batch = f" + up to {IN_BATCH_NEGATIVES} of the batch's next clicks" if self.mixes_in_batch else ""
        return f"{self.resolved_loss} ({self.negatives} negatives{in_batch})"

    def losses_text(self) -> str:
        """What training minimises, e.g. ``sampled_softmax (256 negatives) loss + ce on its dot term``."""
        dot = self.dot_term
        return f"{self.loss_text()} loss" + (f" + {dot.loss_text()} on its dot term" if dot else "")

    def describe(self) -> str:
        """One line naming the networks and the sizes training will use."""
        return (f"{self.tracker} tracker, {self.enhancer} enhancer, {self.relevance} relevance, "
                f"{self.losses_text()}; {self.num_items:,} items, history length {self.history_len}, "
                f"dropout {self.dropout_p:g}, {self.layers} tracker layer{'s' if self.layers > 1 else ''}")

    def fit_to_history(self, clicks_per_user: float) -> ModelConfig:
        """Fill the unset ``max_len``, ``dropout`` and ``tracker_layers`` from how many clicks a user
        has on average."""
        defaults = LONG_HISTORY if clicks_per_user >= LONG_HISTORY_CLICKS else SHORT_HISTORY
        defaults = defaults._replace(max_len=history_window(clicks_per_user))
        return dataclasses.replace(self, **{k: v for k, v in defaults._asdict().items() if getattr(self, k) is None})


@dataclass(frozen=True)
class DataConfig:
    """How sequences become training examples."""

    shuffle_buffer: int = 16384  # rows in the local shuffle buffer of each worker (0 = off)
    seed: int = 0
    pipeline_memory_mb: int = 1024  # object-store memory Ray Data may fill ahead of training
    cache_mb: int = 1024  # per worker: keep examples in memory after the first epoch if they fit (0 = stream every epoch)

    def __post_init__(self) -> None:
        _check_range("data.shuffle_buffer", self.shuffle_buffer, 0)
        _check_range("data.pipeline_memory_mb", self.pipeline_memory_mb, 64)
        _check_range("data.cache_mb", self.cache_mb, 0)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation and the run around it."""

    epochs: int = 200
    batch_size: int = 128  # windows a step, all workers together (each takes its share: `worker_batch`)
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    # Stop after this many validations (every `eval_every` epochs) without a better `select_by`, and
    # no fewer than `patience_steps` optimizer steps since the best (`ray_rec.train.schedule.Plateau`).
    patience: int = 10
    patience_steps: int = 1500
    # Halve the learning rate after this many validations and `lr_patience_steps` steps without a
    # better `select_by` (again after as many more); 0 = a constant learning rate.
    lr_patience: int = 3
    lr_patience_steps: int = 500
    # After the split run, train the exported model again on every click (the valid and test targets
    # too) for the best epoch's steps, replaying its learning rates; false: export the split run's model.
    final_fit: bool = True
    eval_every: int = 1
    select_by: str = "NDCG@10"  # the validation metric that picks the best epoch: HR@k or NDCG@k (k in eval.ks), or MRR
    keep_checkpoints: int = 2  # best K by validation `select_by`
    eval_batch_size: int = 512
    # Validation users per evaluation: the first shards of the valid split (users are spread over
    # shards by a hash, so these are a fixed random sample) holding about this many; 0 = all.
    eval_users: int = 50_000
    max_failures: int = 2  # worker crashes Ray Train recovers from by itself
    seed: int = 0
    # On CPU, when the loss reads only some items a step (sampled softmax, bce: the catalogs too
    # large for the full softmax), the item table gets sparse gradients and Adam updates only the
    # rows a step read (lazy Adam); false: dense gradients and updates over the whole table.
    sparse_items: bool = True
    progress_s: float = 60.0  # seconds between progress lines inside an epoch or a validation (0 = every step)

    def __post_init__(self) -> None:
        _check_range("train.epochs", self.epochs, 1)
        _check_range("train.batch_size", self.batch_size, 1)
        _check_range("train.lr", self.lr, 1e-7, 10.0)
        _check_range("train.weight_decay", self.weight_decay, 0.0)
        _check_range("train.grad_clip", self.grad_clip, 0.0)
        _check_range("train.patience", self.patience, 1)
        _check_range("train.patience_steps", self.patience_steps, 0)
        _check_range("train.lr_patience", self.lr_patience, 0)
        _check_range("train.lr_patience_steps", self.lr_patience_steps, 0)
        _check_range("train.eval_every", self.eval_every, 1)
        _check_range("train.keep_checkpoints", self.keep_checkpoints, 1)
        _check_range("train.eval_batch_size", self.eval_batch_size, 1)
        _check_range("train.eval_users", self.eval_users, 0)
        _check_range("train.max_failures", self.max_failures, 0)
        _check_range("train.progress_s", self.progress_s, 0.0)
        for name in ("sparse_items", "final_fit"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"train.{name}={getattr(self, name)!r} must be true or false")
        if not isinstance(self.select_by, str) or not re.fullmatch(r"(HR|NDCG)@[1-9]\d*|MRR", self.select_by):
            raise ValueError(f"train.select_by={self.select_by!r} must be HR@k, NDCG@k or MRR")


@dataclass(frozen=True)
class EvalConfig:
    """How ranking is measured, in validation and by `ray-rec evaluate` (leave-one-out, full
    ranking with seen items excluded)."""

    ks: tuple[int, ...] = (5, 10, 20)  # cut-offs of HR@k and NDCG@k

    def __post_init__(self) -> None:
        ks = self.ks
        if isinstance(ks, int) and not isinstance(ks, bool):
            ks = (ks,)
        if not isinstance(ks, (list, tuple)) or not ks or not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
            raise ValueError(f"eval.ks={self.ks!r} must be a list of whole numbers, e.g. [5, 10, 20]")
        for k in ks:
            _check_range("eval.ks", k, 1, 10_000)
        object.__setattr__(self, "ks", tuple(sorted(set(ks))))


@dataclass(frozen=True)
class Config:
    """Everything one training run needs; one YAML file maps onto it section by section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        k = self.train.select_by.partition("@")[2]
        if k and int(k) not in self.eval.ks:
            raise ValueError(f"train.select_by={self.train.select_by!r} needs {k} among eval.ks={list(self.eval.ks)}")

    def to_dict(self) -> dict[str, Any]:
        """Every section as plain JSON types (``eval.ks`` as a list)."""
        out = dataclasses.asdict(self)
        out["eval"]["ks"] = list(self.eval.ks)
        return out

    @property
    def score(self) -> str:
        """The name of the validation metric that picks the best epoch in a run's metrics."""
        return f"val_{self.train.select_by}"


T = TypeVar("T")


def build(cls: type[T], values: dict[str, Any] | None, section: str) -> T:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys by name."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown setting(s) in section {section!r}: {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"bad settings in section {section!r}: {exc}") from None


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a `Config` from a nested dict (as read from YAML)."""
    if not isinstance(raw, dict):
        raise ValueError("a config must be a mapping with sections model, data, train, eval")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s): {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return Config(**{name: build(cls, raw.get(name), name) for name, cls in SECTIONS.items()})  # type: ignore[arg-type]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set`` pairs -> dotted overrides for `load_config`. Values are YAML scalars: 32 -> int,
    0.5 -> float, true -> bool, gru -> str.

    Example:
        >>> parse_overrides(["model.dim=128", "model.tracker=gru", "train.sparse_items=false"])
        {'model.dim': 128, 'model.tracker': 'gru', 'train.sparse_items': False}
    """
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r} must look like section.field=value, e.g. model.dim=32")
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides.

    Example:
        >>> load_config(None, {"model.dim": 32}).model.dim
        32
    """
    raw: dict[str, Any] = {}
    if path is not None:
        import yaml

        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold a mapping with sections model, data, train, eval")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ValueError(f"override {dotted!r} must look like section.field")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"config section {section!r} must be a mapping")
        raw[section][key] = value
    return config_from_dict(raw)


def with_catalog(model: ModelConfig, num_items: int, side_features: dict[str, int], has_time: bool) -> ModelConfig:
    """Return ``model`` with the catalog facts of a data set filled in."""
    return dataclasses.replace(
        model, num_items=num_items, side_features=dict(side_features), use_time=model.use_time and has_time
    )


def for_data(model: ModelConfig, manifest: dict[str, Any]) -> ModelConfig:
    """``model`` for a prepared data set: its catalog facts, and the settings left to the data
    (history length, dropout, tracker depth) chosen from its clicks per user."""
    counts = manifest["counts"]
    catalog = with_catalog(model, counts["items"], manifest["side_features"], manifest["has_time"])
    return catalog.fit_to_history(counts["clicks"] / max(counts["users"], 1))
