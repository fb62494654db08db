"""The settings classes: one per section of a run's config (model, data, train, eval), the run's
`Config` and `PrepareOptions` (the Serve application's are in `ray_rec.config.serving`).

Types are checked (and ``1e-3``, which YAML reads as a string, read as a number) and ranges
validated when an object is built, so a bad value is reported once, naming the field and the value.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ray_rec.checks import check_choice, check_range, check_types
from ray_rec.model.loss_policy import LossPolicy
from ray_rec.shape import BATCH_SIZE, EXAMPLES, LONG_HISTORY, LONG_HISTORY_CLICKS, SHORT_HISTORY, history_window

if TYPE_CHECKING:
    from ray_rec.data.manifest import Manifest

LOSSES = ("auto", "ce", "sampled_softmax", "bce")
BLOCKS = ("pre_norm", "post_norm")
# Model settings added after models were first saved without them, with the value such a model was built
# with: read into an artifact's or a stored run's model section where it lacks them (a default may differ).
SAVED_BEFORE = {"block": "pre_norm"}
DEVICE_NAMES = r"auto|cpu|cuda(?::[0-9]+)?"  # what `ray_rec.device.resolve_device` takes
PRECISIONS = ("fp32", "bf16")  # train.precision: the training forward pass's arithmetic (`ray_rec.device.autocast`)


def network_choices(kind: str) -> tuple[str, ...]:
    """The names registered for a swappable network (``tracker``, ``enhancer``, ``relevance``): the
    model's registries are the one list of choices (importing them imports torch)."""
    from ray_rec.model import enhancement, relevance, tracking

    registry = {"tracker": tracking.TRACKERS, "enhancer": enhancement.ENHANCERS, "relevance": relevance.RELEVANCES}[kind]
    return tuple(registry.names())



@dataclass(frozen=True)
class ModelConfig(LossPolicy):
    """The interest model's architecture.

    ``num_items`` and ``side_features`` describe the catalog and are filled from the data set's
    manifest at training time. ``max_len``, ``dropout``, ``tracker_layers`` and ``examples`` left
    unset follow the data set (after SASRec's own tuning): a data set whose users average 40 clicks
    or more is long (dropout 0.2, two tracker layers), else short (0.5, one); the window is half
    the average clicks, within 50-200; examples are prefixes on both. Training prints the choice on
    its first line; the artifact keeps it.
    """

    num_items: int = 0  # catalog size; valid item indices are 1..num_items, 0 is padding
    side_features: dict[str, int] = field(default_factory=dict)  # name -> vocabulary size
    max_len: int | None = None  # history length read; None: half the users' average clicks, within [50, 200]
    dim: int = 64  # width of every embedding and interest state
    use_time: bool = True  # bucketed time since the previous click (ignored if data has none)
    time_buckets: int = 24  # log-scale buckets of the time since the previous click
    tracker: str = "transformer"  # interest tracking network: transformer (causal self-attention), gru, or spectral (attention mixed with a low/high frequency split of the window; prefixes only)
    tracker_layers: int | None = None  # None: 1, or 2 when users average >= 40 clicks
    heads: int = 1  # attention heads of the transformer tracker
    # The transformer and spectral trackers' block: post_norm (BERT's, as BSARec uses it: LayerNorm after
    # each residual sum, a 4D-wide GELU FFN, the input features layer-normed, the item's not scaled by
    # sqrt(D)) or pre_norm (SASRec's: LayerNorm before attention and a D-wide ReLU FFN). None: post_norm,
    # or pre_norm with the gru tracker, which has no blocks.
    block: str | None = None
    enhancer: str = "augru"  # interest enhancement network: augru (DIEN's interest evolution), trend (attention over the shifts between states) or none
    relevance: str = "dot"  # relevance network: dot (u . v) or mlp (u . v + MLP(u, v))
    dropout: float | None = None  # dropout everywhere; None: 0.5, or 0.2 when users average >= 40 clicks
    # How sequences become training examples: prefixes (one per next click, the up to max_len clicks
    # before it, trained at its last step: as served histories end) or windows (max_len clicks, every
    # step trained: about 1/max_len of the sequence networks' work per click, for long histories on slow
    # hardware); None: prefixes.
    examples: str | None = None
    loss: str = "auto"  # auto, ce (full softmax), sampled_softmax or bce; auto: ce while the catalog x history fits, else sampled_softmax
    num_negatives: int | None = None  # sampled negatives; None: 2048 for `sampled_softmax` over `dot`, else 256
    # Sampled softmax over `dot` also takes the batch's next clicks (up to 2048) as negatives: the popular
    # items uniform draws from a long-tailed catalog almost never reach. Every negative is logQ-corrected.
    in_batch_negatives: bool = True
    aux_loss_weight: float = 0.0  # DIEN's auxiliary next-click loss on the interest states (0 = off)

    def __post_init__(self) -> None:
        check_types(self, "model")
        for kind in ("tracker", "enhancer", "relevance"):
            check_choice(f"model.{kind}", getattr(self, kind), network_choices(kind))
        check_choice("model.loss", self.loss, LOSSES)
        if self.block is not None:
            check_choice("model.block", self.block, BLOCKS)
        if self.block == "post_norm" and self.tracker == "gru":
            raise ValueError("model.block='post_norm' is a block of the transformer and spectral trackers; "
                             "model.tracker='gru' has none (leave model.block at 'pre_norm')")
        check_range("model.num_items", self.num_items, 0)
        if self.max_len is not None:
            check_range("model.max_len", self.max_len, 2, 4096)
        check_range("model.dim", self.dim, 4, 4096)
        if self.tracker_layers is not None:
            check_range("model.tracker_layers", self.tracker_layers, 1, 24)
        check_range("model.heads", self.heads, 1, 64)
        if self.dropout is not None:
            check_range("model.dropout", self.dropout, 0.0, 0.95)
        if self.examples is not None:
            check_choice("model.examples", self.examples, EXAMPLES)
        if self.tracker == "spectral" and self.examples == "windows":
            raise ValueError("model.tracker='spectral' reads the whole history at every step: it trains on "
                             "model.examples='prefixes' only (windows would show each step the clicks after it)")
        check_range("model.time_buckets", self.time_buckets, 2, 256)
        if self.num_negatives is not None:
            check_range("model.num_negatives", self.num_negatives, 1)
        check_range("model.aux_loss_weight", self.aux_loss_weight, 0.0)
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
    def example_kind(self) -> str:
        """``examples``, or the short-history default while the data set has not chosen it."""
        return SHORT_HISTORY.examples if self.examples is None else self.examples

    @property
    def norm_block(self) -> str:
        """``block``, or the tracker's default: post_norm, pre_norm for the gru tracker (no blocks)."""
        if self.block is not None:
            return self.block
        return "pre_norm" if self.tracker == "gru" else "post_norm"

    @property
    def on_prefixes(self) -> bool:
        """Whether training makes one example per next click (`example_kind` ``prefixes``)."""
        return self.example_kind == "prefixes"

    def describe(self) -> str:
        """One line naming the networks and the sizes training will use."""
        return (f"{self.tracker} tracker, {self.enhancer} enhancer, {self.relevance} relevance, "
                f"{self.losses_text()}; {self.num_items:,} items, history length {self.history_len}, "
                f"dropout {self.dropout_p:g}, {self.layers} tracker layer{'s' if self.layers > 1 else ''}"
                f"{' (post-norm)' if self.norm_block == 'post_norm' else ''}, "
                f"trained on {self.example_kind}")

    def fit_to_history(self, clicks_per_user: float) -> ModelConfig:
        """Fill the unset ``max_len``, ``dropout``, ``tracker_layers`` and ``examples`` from how many
        clicks a user has on average, and an unset ``block`` from the tracker (`norm_block`)."""
        defaults = LONG_HISTORY if clicks_per_user >= LONG_HISTORY_CLICKS else SHORT_HISTORY
        defaults = defaults._replace(max_len=history_window(clicks_per_user))
        fill = {k: v for k, v in defaults._asdict().items() if getattr(self, k) is None}
        return dataclasses.replace(self, **fill, block=self.norm_block)


@dataclass(frozen=True)
class DataConfig:
    """How sequences become training examples."""

    shuffle_buffer: int = 16384  # rows in the local shuffle buffer of each worker (0 = off)
    seed: int = 0  # the shuffle's seed
    pipeline_memory_mb: int = 1024  # object-store memory Ray Data may fill ahead of training
    cache_mb: int = 1024  # per worker: keep examples in memory after the first epoch if they fit (0 = stream every epoch)

    def __post_init__(self) -> None:
        check_types(self, "data")
        check_range("data.shuffle_buffer", self.shuffle_buffer, 0)
        check_range("data.pipeline_memory_mb", self.pipeline_memory_mb, 64)
        check_range("data.cache_mb", self.cache_mb, 0)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation and the run around it."""

    epochs: int = 200  # at most; early stopping usually ends the run first
    # Examples (prefixes or windows, `model.examples`) a step, all workers together: each takes an
    # equal share (rounded up), so the worker count leaves the batch, the learning rate and the steps
    # an epoch as they are. None: 256 prefixes or 128 windows (`batch_for`).
    batch_size: int | None = None
    lr: float = 1e-3  # Adam's learning rate at the start
    weight_decay: float = 0.0  # L2 on weight matrices (not norms, biases)
    grad_clip: float = 5.0  # largest gradient norm (0 = no clipping)
    # Stop after this many validations (every `eval_every` epochs) without a better `select_by`, and
    # no fewer than `patience_steps` optimizer steps since the best (`ray_rec.train.schedule.Plateau`).
    patience: int = 10
    patience_steps: int = 1500  # see patience
    # Halve the learning rate after this many validations and `lr_patience_steps` steps without a
    # better `select_by` (again after as many more); 0 = a constant learning rate.
    lr_patience: int = 3
    lr_patience_steps: int = 500  # see lr_patience
    # The schedule and the best epoch read a moving average of the validations: each new one weighs
    # 1 - smoothing (0 = each as it is). It evens out a small validation set's noise (`Plateau`).
    smoothing: float = 0.5
    # After the split run, train the exported model again on every click (the valid and test targets
    # too) for the best epoch's steps, replaying its learning rates; false: export the split run's model.
    final_fit: bool = True
    eval_every: int = 1  # validate every this many epochs
    select_by: str = "NDCG@10"  # the validation metric that picks the best epoch: HR@k or NDCG@k (k in eval.ks), or MRR
    keep_checkpoints: int = 2  # best K by validation `select_by`
    eval_batch_size: int = 512  # users ranked at a time in validation
    # Validation users per evaluation: the first shards of the valid split (users are spread over
    # shards by a hash, so these are a fixed random sample) holding about this many; 0 = all.
    eval_users: int = 50_000
    max_failures: int = 2  # worker crashes Ray Train recovers from by itself
    seed: int = 0  # model initialisation and sampling
    # On CPU, when the loss reads only some items a step (sampled softmax, bce: the catalogs too
    # large for the full softmax), the item table gets sparse gradients and Adam updates only the
    # rows a step read (lazy Adam); false: dense gradients and updates over the whole table.
    sparse_items: bool = True
    progress_s: float = 60.0  # seconds between progress lines inside an epoch or a validation (0 = every step)
    # The training forward pass: fp32, or bf16 (autocast: matrix products in bfloat16; the softmax
    # over the catalog, the optimizer and validation stay in fp32).
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_types(self, "train")
        check_choice("train.precision", self.precision, PRECISIONS)
        check_range("train.lr", self.lr, 1e-7, 10.0)
        check_range("train.smoothing", self.smoothing, 0.0, 0.9)  # 1 would never move from the first score
        if self.batch_size is not None:
            check_range("train.batch_size", self.batch_size, 1)
        for name, low in (("epochs", 1), ("weight_decay", 0.0), ("grad_clip", 0.0), ("patience", 1),
                          ("patience_steps", 0), ("lr_patience", 0), ("lr_patience_steps", 0), ("eval_every", 1),
                          ("keep_checkpoints", 1), ("eval_batch_size", 1), ("eval_users", 0), ("max_failures", 0),
                          ("progress_s", 0.0)):
            check_range(f"train.{name}", getattr(self, name), low)
        if not isinstance(self.select_by, str) or not re.fullmatch(r"(HR|NDCG)@[1-9]\d*|MRR", self.select_by):
            raise ValueError(f"train.select_by={self.select_by!r} must be HR@k, NDCG@k or MRR")

    def batch_for(self, model: ModelConfig) -> int:
        """``batch_size``, or the default for the examples ``model`` trains on."""
        return BATCH_SIZE[model.example_kind] if self.batch_size is None else self.batch_size


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
            check_range("eval.ks", k, 1, 10_000)
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

    @property
    def rank_by(self) -> str:
        """The name of the score that ranks a run's checkpoints: `score`'s moving average
        (``train.smoothing``), the one the schedule reads."""
        return f"{self.score}_average"


@dataclass(frozen=True)
class PrepareOptions:
    """What `ray-rec prepare` does (`ray_rec.data.prepare.prepare`); the CLI flags fill it in."""

    input: str  # log file or folder (local path or s3://)
    output: str  # dataset folder to write (local path or s3://)
    format: str = "events"  # events, movielens or seqtxt
    items: str | None = None  # item side features file
    num_shards: int = 8  # Parquet files per split, at least (large logs get more, about 1M events each)
    min_clicks: int = 3  # drop users with fewer clicks (at least 3: one each for train, valid, test)
    split: str = "leave_one_out"  # or "time"
    cutoff: int | None = None  # epoch seconds, for split="time"
    expected_events: int | None = None  # sizes the spill buckets; None = estimate from the input
    overwrite: bool = False  # replace an output folder that holds files `prepare` did not write
    columns: dict[str, str] | None = None  # events format: the log's column of a field where it names it otherwise, e.g. {user_id: uid, item_id: sku}
    click_events: list[str] | None = None  # event values that are clicks (None: click, 1, true, clicked)
    browse_events: list[str] | None = None  # event values that are browses (None: browse, 0, false, impression, view, shown)
    engine: str = "auto"  # local (one process), ray (tasks on the Ray cluster), auto: ray when RAY_ADDRESS names a cluster and the log holds over 50M events

    def __post_init__(self) -> None:
        check_types(self, "prepare")
        check_choice("prepare.format", self.format, FORMATS)
        check_choice("prepare.engine", self.engine, ENGINES)
        if self.format != "events" and (self.columns or self.click_events is not None or self.browse_events is not None):
            raise ValueError(f"column and event mappings apply to the events format, not {self.format}")
        if self.num_shards < 1:
            raise ValueError(f"num_shards={self.num_shards} must be >= 1")
        if self.min_clicks < 3:
            raise ValueError(f"min_clicks={self.min_clicks} must be >= 3 (one click each for train, valid, test)")
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} must be leave_one_out or time")
        if self.split == "time" and self.cutoff is None:
            raise ValueError("split=time needs a cutoff (epoch seconds or ISO 8601)")


FORMATS = ("events", "movielens", "seqtxt")
SPLITS = ("leave_one_out", "time")
ENGINES = ("auto", "local", "ray")

def with_catalog(model: ModelConfig, num_items: int, side_features: dict[str, int], has_time: bool) -> ModelConfig:
    """Return ``model`` with the catalog facts of a data set filled in."""
    return dataclasses.replace(
        model, num_items=num_items, side_features=dict(side_features), use_time=model.use_time and has_time
    )


def for_data(model: ModelConfig, manifest: Manifest) -> ModelConfig:
    """``model`` for a prepared data set: its catalog facts, and the settings left to the data
    (history length, dropout, tracker depth) chosen from its clicks per user."""
    catalog = with_catalog(model, manifest.counts.items, manifest.side_features, manifest.has_time)
    return catalog.fit_to_history(manifest.clicks_per_user)

