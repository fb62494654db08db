"""Relevance network: scores candidates against the enhanced interest."""

from __future__ import annotations

import torch
from torch import nn

from ray_rec.config import ModelConfig
from ray_rec.model.registry import Registry

RELEVANCES: Registry[nn.Module] = Registry("relevance")

# Items scored per chunk when an MLP scores a whole catalog, to bound memory.
_CATALOG_CHUNK = 4096


@RELEVANCES.register("dot")
class DotRelevance(nn.Module):
    """score(u, v) = u . v; a whole catalog is one matrix product."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """u (..., D) and candidates v (..., C, D) -> scores (..., C)."""
        return (u.unsqueeze(-2) * v).sum(-1)

    def catalog(self, u: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """u (P, D) against every item (N, D) -> (P, N)."""
        return u @ items.T


@RELEVANCES.register("mlp")
class MLPRelevance(nn.Module):
    """score(u, v) = u . v + MLP([u, v, u * v, u - v]); the dot term keeps it at least as good as dot."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.dim
        self.mlp = nn.Sequential(
            nn.Linear(4 * d, 2 * d), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(2 * d, 1)
        )

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """u (..., D) and candidates v (..., C, D) -> scores (..., C)."""
        u = u.unsqueeze(-2).expand_as(v)
        pair = torch.cat([u, v, u * v, u - v], -1)
        return (u * v).sum(-1) + self.mlp(pair).squeeze(-1)

    def catalog(self, u: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """u (P, D) against every item (N, D) -> (P, N), in chunks of items."""
        parts = []
        for start in range(0, items.shape[0], _CATALOG_CHUNK):
            chunk = items[start : start + _CATALOG_CHUNK]  # (n, D)
            parts.append(self(u, chunk.unsqueeze(0).expand(u.shape[0], -1, -1)))
        return torch.cat(parts, -1)
