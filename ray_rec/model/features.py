"""Sequence feature extraction network: one feature vector per item, for history and candidates."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ray_rec.config import ModelConfig


class SequenceFeatureExtractor(nn.Module):
    """Embeds items (id + categorical side features) and, for history, their position and time.

    The same ``item_features`` embeds history items ("first objects") and candidates ("second
    objects"), so a candidate and a clicked item live in one space. Item index 0 is padding.
    Side-feature values are looked up from a buffer ``item_side`` (items x features) that the
    vocabulary fills in, so the saved weights carry them.

    Args:
        config: the model configuration (``num_items``, ``side_features``, ``dim``, ``max_len``...).

    Example:
        >>> fx = SequenceFeatureExtractor(ModelConfig(num_items=10))
        >>> fx.item_features(torch.tensor([[1, 2]])).shape
        torch.Size([1, 2, 64])
    """

    item_side: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.dim
        self.dim = d
        self.max_len = config.history_len
        self.item = nn.Embedding(config.num_items + 1, d, padding_idx=0)
        self.side_names = sorted(config.side_features)
        self.side = nn.ModuleDict(
            {name: nn.Embedding(config.side_features[name] + 1, d, padding_idx=0) for name in self.side_names}
        )
        self.register_buffer(
            "item_side", torch.zeros(config.num_items + 1, len(self.side_names), dtype=torch.long)
        )
        self.position = nn.Embedding(config.history_len, d)
        self.time = nn.Embedding(config.time_buckets + 1, d, padding_idx=0) if config.use_time else None
        self.dropout = nn.Dropout(config.dropout_p)
        # Post-norm blocks (BERT's) take layer-normed input features; pre-norm blocks (SASRec's) take the
        # item's embedding scaled by sqrt(D) over the position's, as SASRec does.
        self.input_norm = nn.LayerNorm(d) if config.norm_block == "post_norm" else None
        self.item_scale = 1.0 if self.input_norm is not None else math.sqrt(d)
        self.time_dropout = 0.1  # share of time buckets hidden in training, so serving without times works
        self._catalog: tuple[tuple[Any, ...], torch.Tensor] | None = None  # (weights' storage and versions, table), inference only
        # Every embedding starts at the item table's small scale: at PyTorch's default N(0, 1), the
        # position, time and side-feature terms drowned the item id's and training learned slowly.
        tables: list[nn.Embedding] = [self.item, self.position, *self.side.values()]  # type: ignore[list-item]
        if self.time is not None:
            tables.append(self.time)
        for table in tables:
            nn.init.normal_(table.weight, std=0.02)
            if table.padding_idx is not None:
                with torch.no_grad():
                    table.weight[table.padding_idx].zero_()

    def set_item_side(self, table: torch.Tensor) -> None:
        """Fill the item -> side-feature-value table, shape (num_items + 1, num_side_features)."""
        if table.shape != self.item_side.shape:
            raise ValueError(f"side-feature table has shape {tuple(table.shape)}, expected {tuple(self.item_side.shape)}")
        self.item_side.copy_(table)

    def item_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Features of items by index, any leading shape: (...,) -> (..., D)."""
        feats = self.item(ids)
        if self.side_names:
            values = self.item_side[ids]  # (..., S)
            for j, name in enumerate(self.side_names):
                feats = feats + self.side[name](values[..., j])
        return feats

    def all_item_features(self) -> torch.Tensor:
        """Features of the whole catalog, row 0 being padding: (N + 1, D).

        Without side features that is the id embedding table itself: no gather, which at a
        million items would copy 256 MB on every call. With side features, a model in inference
        mode computes the table once and reuses it until any of its weights change.
        """
        if not self.side_names:
            return self.item.weight
        if not (torch.is_inference_mode_enabled() and not self.training):
            return self.item_features(torch.arange(self.item.num_embeddings, device=self.item.weight.device))
        key = tuple((t.data_ptr(), t._version) for t in (*self.parameters(), self.item_side))
        if self._catalog is None or self._catalog[0] != key:
            ids = torch.arange(self.item.num_embeddings, device=self.item.weight.device)
            self._catalog = (key, self.item_features(ids))
        return self._catalog[1]

    def sequence_features(self, items: torch.Tensor, time_buckets: torch.Tensor | None) -> torch.Tensor:
        """Features of a left-padded history.

        Positions count back from the most recent item (0 = newest), so the amount of left padding
        never changes a feature.

        Args:
            items: (B, L) item indices, 0 = padding, the most recent last.
            time_buckets: (B, L) bucketed time since the previous click (0 = unknown) or None.

        Returns:
            (B, L, D) features, zero at padding.
        """
        _, length = items.shape
        valid = (items > 0).unsqueeze(-1)  # (B, L, 1)
        feats = self.item_features(items) * self.item_scale  # (B, L, D)
        back = torch.arange(length - 1, -1, -1, device=items.device).clamp(max=self.max_len - 1)
        feats = feats + self.position(back)  # (L, D) broadcast over B
        if self.time is not None and time_buckets is not None:
            if self.training and self.time_dropout > 0:
                keep = torch.rand(time_buckets.shape, device=items.device) >= self.time_dropout
                time_buckets = time_buckets * keep
            feats = feats + self.time(time_buckets)
        if self.input_norm is not None:
            feats = self.input_norm(feats)
        return self.dropout(feats) * valid
