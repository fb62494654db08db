"""Interest tracking network: reads the clicked history in order, one interest state per step.

Every variant but ``spectral`` is causal: the state at step t depends on steps <= t only, and on no
padding. ``spectral`` reads the whole window at every step, so it trains on prefixes only (each
example's window ends at the click it predicts; `ModelConfig` refuses it with windows).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ray_rec.config import ModelConfig
from ray_rec.device import full_precision
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
    """One self-attention block: attention then a point-wise FFN, each added to its input.

    ``post_norm`` False is SASRec's block: LayerNorm before each part, an FFN as wide as the model
    with ReLU. True is BERT's, as BSARec and FMLP-Rec use it: LayerNorm after each residual sum, an
    FFN four times as wide with GELU (the tracker then ends without a final LayerNorm).
    """

    def __init__(self, dim: int, heads: int, dropout: float, post_norm: bool = False) -> None:
        super().__init__()
        self.post_norm = post_norm
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        if post_norm:
            self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        else:
            self.ffn = nn.Sequential(
                nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim), nn.Dropout(dropout)
            )
        self.dropout = nn.Dropout(dropout)

    def attend(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Causal self-attention of ``h``: (B, L, D) -> (B, L, D)."""
        return self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]

    def forward(self, x: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D); ``valid`` (B, L) is for blocks that read padding themselves."""
        if self.post_norm:
            x = self.norm_attn(x + self.dropout(self.attend(x, mask)))
            return self.norm_ffn(x + self.ffn(x))
        x = x + self.dropout(self.attend(self.norm_attn(x), mask))
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
        self.post_norm = config.norm_block == "post_norm"
        self.blocks = nn.ModuleList(
            CausalBlock(config.dim, config.heads, config.dropout_p, self.post_norm) for _ in range(config.layers)
        )
        # Post-norm blocks end on a LayerNorm already.
        self.norm = nn.Identity() if self.post_norm else nn.LayerNorm(config.dim)

    def forward(self, feats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L, D) features and (B, L) validity -> (B, L, D) interest states."""
        mask = causal_mask(valid, self.heads)
        x = feats
        for block in self.blocks:
            x = block(x, mask, valid) * valid.unsqueeze(-1)
        return self.norm(x) * valid.unsqueeze(-1)


class FrequencyFilter(nn.Module):
    """The slow part of a sequence plus its fast part scaled by a learned per-unit gain.

    The slow part is the sequence's lowest ``keep // 2 + 1`` frequencies along the history (over
    the whole ``length``-step window, left-padded as served histories are): the lasting interest;
    the rest is the recent shift. With the gain at 1 the filter passes the sequence unchanged.
    """

    def __init__(self, dim: int, length: int, keep: int) -> None:
        super().__init__()
        self.length, self.bins = length, keep // 2 + 1
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D), L <= ``length``."""
        steps = h.shape[1]
        with full_precision(h.device):  # the FFT in fp32 under autocast too
            x = F.pad(h.float(), (0, 0, self.length - steps, 0))  # (B, length, D)
            spectrum = torch.fft.rfft(x, dim=1, norm="ortho")
            kept = (torch.arange(spectrum.shape[1], device=h.device) < self.bins).view(1, -1, 1)
            slow = torch.fft.irfft(spectrum * kept, n=self.length, dim=1, norm="ortho")[:, -steps:]
            out = slow + self.gain.float() ** 2 * (h.float() - slow)
        return out.to(h.dtype)


class SpectralBlock(CausalBlock):
    """SASRec's block with the attention mixed with a `FrequencyFilter` of the same input (the idea of
    BSARec, AAAI 2024): ``mix`` of the filter, the rest attention. Post-norm, each of the two is added
    to the input and layer-normed before they are mixed, as in BSARec."""

    def __init__(self, dim: int, heads: int, dropout: float, length: int, keep: int, mix: float,
                 post_norm: bool = False) -> None:
        super().__init__(dim, heads, dropout, post_norm)
        self.filter = FrequencyFilter(dim, length, keep)
        self.norm_filter = nn.LayerNorm(dim) if post_norm else None
        self.mix = mix

    def forward(self, x: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # Padding enters the filter as zeros, as the steps `collate` cut off do: a history's filter
        # output is the same whatever padding its batch holds.
        if self.norm_filter is not None:
            a = self.norm_attn(x + self.dropout(self.attend(x, mask)))
            f = self.norm_filter(x + self.dropout(self.filter(x * valid.unsqueeze(-1))))
            x = self.mix * f + (1.0 - self.mix) * a
            return self.norm_ffn(x + self.ffn(x))
        h = self.norm_attn(x)
        f = self.filter(h * valid.unsqueeze(-1))
        x = x + self.dropout(self.mix * f + (1.0 - self.mix) * self.attend(h, mask))
        return x + self.ffn(self.norm_ffn(x))


@TRACKERS.register("spectral")
class SpectralTracker(TransformerTracker):
    """The transformer tracker with `SpectralBlock`s: attention plus a low/high frequency split of the
    window (not causal: trains on prefixes)."""

    MIX, KEEP = 0.7, 5  # the filter's share and the frequencies it keeps (BSARec's alpha and c)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.blocks = nn.ModuleList(
            SpectralBlock(config.dim, config.heads, config.dropout_p, config.history_len, self.KEEP, self.MIX,
                          self.post_norm)
            for _ in range(config.layers)
        )


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
