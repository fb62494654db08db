"""The interest model: feature extraction -> interest tracking -> enhancement -> relevance.

Shapes use one legend: B batch, L history length, C candidates, D width, N catalog size,
P positions that have a next click.
"""

from __future__ import annotations

import torch
from torch import nn

from ray_rec.config import ModelConfig
from ray_rec.model.enhancement import ENHANCERS
from ray_rec.model.features import SequenceFeatureExtractor
from ray_rec.model.loss_policy import IN_BATCH_NEGATIVES
from ray_rec.model.losses import (
    auxiliary_next_click_loss,
    binary_loss,
    uniform_and_in_batch,
    uniform_negatives,
)
from ray_rec.model.relevance import RELEVANCES, DotRelevance, MLPRelevance
from ray_rec.model.tracking import TRACKERS


class InterestModel(nn.Module):
    """Predicts the next click from the clicked history.

    Training batches (see ``ray_rec.data.examples``) hold, per row, a left-padded history window
    and the next click after every step, so one pass trains every position.

    Args:
        config: a `ModelConfig` with the catalog filled in (``num_items`` > 0).

    Example:
        >>> m = InterestModel(ModelConfig(num_items=100, dim=16))
        >>> m.score(torch.tensor([[0, 3, 7]]), torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3])
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.num_items < 1:
            raise ValueError(f"model.num_items={config.num_items}: the catalog must hold at least one item")
        self.config = config
        self.features = SequenceFeatureExtractor(config)
        self.tracker = TRACKERS.build(config.tracker, config)
        self.enhancer = ENHANCERS.build(config.enhancer, config)
        self.relevance: DotRelevance | MLPRelevance = RELEVANCES.build(config.relevance, config)  # type: ignore[assignment]
        self.loss_kind = config.resolved_loss
        self.num_negatives = config.negatives
        # The MLP relevance's score is u . v + MLP(u, v). Its sampled softmax alone learns slowly, so
        # the u . v term is also trained on its own, as `relevance: dot` would be: the MLP then
        # learns a correction to a good ranker.
        self.dot_term = config.dot_term
        self.dot_relevance = DotRelevance(config)  # no parameters: scores the u . v term alone
        # In-batch negatives are corrected by each item's share of the clicks, counted here over the
        # next clicks this model has trained on: this worker's own count, a plain attribute rather
        # than a buffer, so DDP does not broadcast it every step and checkpoints and artifacts do not
        # hold it (a resumed run counts again; serving never reads it).
        self.in_batch = config.mixes_in_batch or (self.dot_term is not None and self.dot_term.mixes_in_batch)
        self.click_counts: torch.Tensor | None = None

    def encode(self, items: torch.Tensor, time_buckets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """History (B, L) -> (interest states, enhanced interests), both (B, L, D), zero at padding."""
        valid = items > 0  # (B, L)
        feats = self.features.sequence_features(items, time_buckets)  # (B, L, D)
        states = self.tracker(feats, valid)  # (B, L, D)
        return states, self.enhancer(states, valid)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training losses for a batch.

        Args:
            batch: ``items`` (B, L), ``targets`` (B, L) next click per step (0 = none), optional
                ``time_buckets`` (B, L) and ``negatives`` (B, L, K) browsed-not-clicked items.

        Returns:
            ``loss`` (the total to minimise), ``main`` and ``aux``, scalars.
        """
        items, targets = batch["items"], batch["targets"]
        states, interest = self.encode(items, batch.get("time_buckets"))
        has_target = targets > 0  # (B, L)
        u = interest[has_target]  # (P, D)
        tgt = targets[has_target]  # (P,)
        if self.in_batch and self.training:
            counts = self.clicks_so_far(tgt.device)
            counts.index_add_(0, tgt, torch.ones_like(tgt, dtype=counts.dtype))
        main = self._main_loss(u, tgt, batch.get("negatives"), has_target)
        losses = {"main": main, "aux": main.new_zeros(())}
        if self.config.aux_loss_weight > 0:
            neg = torch.randint(1, self.config.num_items + 1, tgt.shape, device=tgt.device)
            losses["aux"] = auxiliary_next_click_loss(
                states[has_target], self.features.item_features(tgt), self.features.item_features(neg)
            )
        losses["loss"] = main + self.config.aux_loss_weight * losses["aux"]
        return losses

    def _main_loss(
        self, u: torch.Tensor, tgt: torch.Tensor, negatives: torch.Tensor | None, has_target: torch.Tensor
    ) -> torch.Tensor:
        if self.loss_kind != "bce":
            loss = self._softmax_loss(self.relevance, self.loss_kind, self.num_negatives, u, tgt, has_target,
                                      self.config.mixes_in_batch)
            if (dot := self.dot_term) is not None:
                loss = loss + self._softmax_loss(self.dot_relevance, dot.resolved_loss, dot.negatives, u, tgt, has_target,
                                                 dot.mixes_in_batch)
            return loss
        cfg = self.config
        pos = self.relevance(u, self.features.item_features(tgt).unsqueeze(1)).squeeze(1)  # (P,)
        sampled = torch.randint(1, cfg.num_items + 1, (u.shape[0], self.num_negatives), device=u.device)
        neg_ids = sampled if negatives is None else torch.cat([negatives[has_target], sampled], 1)  # (P, K)
        neg = self.relevance(u, self.features.item_features(neg_ids))  # (P, K)
        return binary_loss(pos, neg, ((neg_ids > 0) & (neg_ids != tgt.unsqueeze(1))).float())

    def _softmax_loss(
        self, relevance: DotRelevance | MLPRelevance, kind: str, num_negatives: int, u: torch.Tensor, tgt: torch.Tensor,
        has_target: torch.Tensor, in_batch: bool,
    ) -> torch.Tensor:
        """The next click's softmax under ``relevance``: over the whole catalog (``kind`` "ce"), or
        over ``num_negatives`` uniformly drawn negatives shared by the batch, with the batch's next
        clicks as more negatives when ``in_batch``, all logQ-corrected. A position's negatives never
        include the next clicks of its own window (its row of ``has_target``): its user's own
        clicks, before and after it, are not items the model should learn to push down for them."""
        if kind == "ce":
            return relevance.full_softmax_loss(u, self.features.all_item_features()[1:], tgt)
        n = self.config.num_items
        pos = relevance(u, self.features.item_features(tgt).unsqueeze(1)).squeeze(1)  # (P,)
        blocked = None
        if in_batch:
            neg_ids, expected, source = uniform_and_in_batch(n, num_negatives, tgt, self.clicks_so_far(tgt.device),
                                                             IN_BATCH_NEGATIVES)
            rows = has_target.nonzero(as_tuple=True)[0]  # (P,) the window of each position
            blocked = rows.unsqueeze(1) == rows[source].unsqueeze(0)  # (P, M): the in-batch draws of its own window
        else:
            neg_ids, expected = uniform_negatives(n, num_negatives, u.device)
        return relevance.sampled_softmax_loss(u, pos, self.features.item_features(neg_ids), neg_ids, tgt, expected, blocked)

    def clicks_so_far(self, device: torch.device) -> torch.Tensor:
        """(N + 1,) float64: how often each item was a next click in this model's training steps so far."""
        if self.click_counts is None or self.click_counts.device != device:
            self.click_counts = torch.zeros(self.config.num_items + 1, dtype=torch.float64, device=device)
        return self.click_counts

    def user_interest(self, items: torch.Tensor, time_buckets: torch.Tensor | None = None) -> torch.Tensor:
        """The enhanced interest after the last step of each history: (B, L) -> (B, D)."""
        _, interest = self.encode(items, time_buckets)
        return interest[:, -1]

    def candidate_scores(self, u: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Scores of candidate items (B, C) for interests (B, D) -> (B, C)."""
        return self.relevance(u, self.features.item_features(candidates))

    def catalog_scores(self, u: torch.Tensor) -> torch.Tensor:
        """Scores of every item for interests (B, D) -> (B, N + 1); column 0 (padding) is -inf."""
        scores = self.relevance.catalog(u, self.features.all_item_features())
        scores[:, 0] = float("-inf")
        return scores

    @torch.inference_mode()
    def score(
        self, items: torch.Tensor, candidates: torch.Tensor, time_buckets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores of candidates given left-padded histories: (B, L), (B, C) -> (B, C)."""
        return self.candidate_scores(self.user_interest(items, time_buckets), candidates)

    @torch.inference_mode()
    def score_catalog(self, items: torch.Tensor, time_buckets: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item given left-padded histories: (B, L) -> (B, N + 1); column 0 is -inf.
        (Top-k and exclusion: `ray_rec.predict.ranking`.)"""
        return self.catalog_scores(self.user_interest(items, time_buckets))
