"""Which loss a model trains with, and its negatives: the policy behind `model.loss: auto`.

`ray_rec.config.ModelConfig` inherits these properties; the losses themselves are in
`ray_rec.model.losses`. Pure Python (no torch), so configs load without it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray_rec.config import ModelConfig

# Above this many (catalog items x history length) `loss: auto` switches from full cross-entropy
# to sampled softmax: the full softmax scores every position against every item (its memory is
# bounded by chunking, its compute is not), sampled softmax against 2048 shared negatives.
# At the short-history length of 50 that is a catalog of 200,000 items.
FULL_SOFTMAX_MAX_CELLS = 200_000 * 50

# In-batch negatives a sampled-softmax step draws at most (a random subset of its positions' next
# clicks past that): 128 windows x 200 steps would otherwise score 25,600 x 25,600 pairs.
IN_BATCH_NEGATIVES = 2048


class LossPolicy:
    """The loss-dependent properties of a model config (``relevance``, ``loss``, ``num_items``,
    ``num_negatives``, ``in_batch_negatives`` and ``history_len`` come from the config)."""

    relevance: str
    loss: str
    num_items: int
    num_negatives: int | None
    in_batch_negatives: bool
    history_len: Any

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
        scores them with a dot product (one (positions x 2048) product), 256 when an MLP scores
        every pair or `bce` draws them per position."""
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
        return dataclasses.replace(self, relevance="dot", loss="auto", num_negatives=None)  # type: ignore[type-var,return-value]

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

