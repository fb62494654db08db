"""Interest tracking network: reads the clicked history in order, one interest state per step.

Every variant is causal: the state at step t depends on steps <= t only, and on no padding.
"""

from __future__ import annotations

import torch
from torch import nn

from ray_rec.config import ModelConfig
from ray_rec.model.registry import Registry

TRACKERS: Registry[nn.Module] = Registry("tracker")


def causal_mask(valid: torch.Tensor, heads: int) -> torch.Tensor:
    """Boolean attention mask, True = blocked: (B, L) -> (B * heads, L, L).

    A query sees itself and earlier, non-padded keys. Padded queries see themselves only, which
    keeps their (unused) outputs finite instead of NaN.
    """
    b, length = valid.shape
    idx = torch.arange(length, device=valid.device)
    future = idx[None, :] > idx[:, None]  # (L, L)
    blocked = future[None] | ~valid[:, None, :]  # (B, L, L)
    blocked = blocked & ~torch.eye(length, dtype=torch.bool, device=valid.device)[None]
    return blocked.repeat_interleave(heads, dim=0)  # (B*H, L, L)


class CausalBlock(nn.Module):
    """One pre-norm self-attention block (SASRec's block): attention then a point-wise FFN."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim), nn.Dropout(dropout)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm_attn(x)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)  # (B, L, D)
        x = x + self.dropout(a)
        return x + self.ffn(self.norm_ffn(x))


@TRACKERS.register("transformer")
class TransformerTracker(nn.Module):
    """Causal self-attention over the history (SASRec-style).

    Example:
        >>> t = TransformerTracker(ModelConfig(num_items=5, dim=8, heads=2))
        >>> t(torch.zeros(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)).shape
        torch.Size([2, 4, 8])
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.blocks = nn.ModuleList(
            CausalBlock(config.dim, config.heads, config.dropout_p) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, feats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L, D) features and (B, L) validity -> (B, L, D) interest states."""
        mask = causal_mask(valid, self.heads)
        x = feats
        for block in self.blocks:
            x = block(x, mask) * valid.unsqueeze(-1)
        return self.norm(x) * valid.unsqueeze(-1)


def left_to_right_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Move each row's items from the right end to the left end: (B, L, ...) -> (B, L, ...)."""
    b, length = x.shape[:2]
    shift = (length - lengths).unsqueeze(1)  # (B, 1)
    idx = (torch.arange(length, device=x.device).unsqueeze(0) + shift) % length  # (B, L)
    idx = idx.view(b, length, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, idx)


def right_to_left_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Inverse of `left_to_right_padding`."""
    b, length = x.shape[:2]
    shift = (length - lengths).unsqueeze(1)
    idx = (torch.arange(length, device=x.device).unsqueeze(0) - shift) % length
    idx = idx.view(b, length, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, idx)


@TRACKERS.register("gru")
class GRUTracker(nn.Module):
    """A GRU over the history (DIEN's interest extractor), started at the first real item.

    Sequences are packed, so left padding never enters the recurrence.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gru = nn.GRU(
            config.dim,
            config.dim,
            num_layers=config.layers,
            batch_first=True,
            dropout=config.dropout_p if config.layers > 1 else 0.0,
        )
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, feats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L, D) features and (B, L) validity -> (B, L, D) interest states."""
        lengths = valid.sum(1)  # (B,)
        right = left_to_right_padding(feats, lengths)
        packed = nn.utils.rnn.pack_padded_sequence(
            right, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=feats.shape[1])
        states = right_to_left_padding(out, lengths)  # (B, L, D)
        return self.norm(states) * valid.unsqueeze(-1)
