"""Interest enhancement network: from interest states to a representation of their trend.

Each variant maps (B, L, D) states to (B, L, D) enhanced interests and stays causal, so one pass
trains every position at once (as the tracker does).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ray_rec.config import ModelConfig
from ray_rec.device import full_precision
from ray_rec.model.registry import Registry
from ray_rec.model.tracking import causal_mask

ENHANCERS: Registry[nn.Module] = Registry("enhancer")


def consecutive_differences(states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """How each interest state moved from the previous one: (B, L, D); zero at the first step."""
    prev = torch.roll(states, shifts=1, dims=1)  # (B, L, D)
    prev_valid = torch.roll(valid, shifts=1, dims=1)
    prev_valid[:, 0] = False
    prev = torch.where(prev_valid.unsqueeze(-1), prev, states)
    return (states - prev) * valid.unsqueeze(-1)


@ENHANCERS.register("none")
class NoEnhancer(nn.Module):
    """Passes the tracker's states through (the ablation without an enhancement network)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()

    def forward(self, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return states


@ENHANCERS.register("trend")
class TrendEnhancer(nn.Module):
    """Attention over the shifts between consecutive interest states, weighted toward recent ones.

    At step t the query is the current state h_t; keys are [h_s, h_s - h_{s-1}] and values the
    shifts h_s - h_{s-1} for s <= t, with a learned per-head recency penalty on (t - s) (as in
    ALiBi). The resulting trend is gated into the state: u_t = LN(h_t + g_t * W trend_t), with
    g_t = sigmoid(W_g [h_t, trend_t]).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, self.heads = config.dim, config.heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(2 * d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.gate = nn.Linear(2 * d, d)
        self.recency = nn.Parameter(torch.full((config.heads,), -2.0))  # softplus -> slope per head
        self.dropout = nn.Dropout(config.dropout_p)
        self.norm = nn.LayerNorm(d)

    def forward(self, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L, D) states and (B, L) validity -> (B, L, D) enhanced interests."""
        b, length, d = states.shape
        h, dh = self.heads, d // self.heads
        shifts = consecutive_differences(states, valid)  # (B, L, D)
        q = self.query(states).view(b, length, h, dh).transpose(1, 2)  # (B, H, L, dh)
        k = self.key(torch.cat([states, shifts], -1)).view(b, length, h, dh).transpose(1, 2)
        v = self.value(shifts).view(b, length, h, dh).transpose(1, 2)
        idx = torch.arange(length, device=states.device)
        distance = (idx[:, None] - idx[None, :]).clamp(min=0).float()  # (L, L)
        bias = -F.softplus(self.recency).view(1, h, 1, 1) * distance  # (1, H, L, L)
        blocked = causal_mask(valid, 1).view(b, 1, length, length)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh) + bias  # (B, H, L, L)
        att = self.dropout(scores.masked_fill(blocked, float("-inf")).softmax(-1))
        trend = (att @ v).transpose(1, 2).reshape(b, length, d)  # (B, L, D)
        trend = self.out(trend)
        g = torch.sigmoid(self.gate(torch.cat([states, trend], -1)))
        return self.norm(states + self.dropout(g * trend)) * valid.unsqueeze(-1)


@ENHANCERS.register("augru")
class AUGRUEnhancer(nn.Module):
    """DIEN's interest-evolution layer: a GRU whose update gate is scaled by an attention score.

    The score a_t = sigmoid(w . [h_t, h_t - h_{t-1}, h_t * h_{t-1}]) says how much step t shifts
    the interest; steps with a small score barely move the evolving state. Padded steps keep the
    state, so left padding changes nothing. Output: LN(h_t + e_t).

    One step is e' = e + a z (n - e) (z: update gate, n: candidate state). A GRU cell gives
    g = e + z (n - e), so e' = lerp(e, g, a): each step is ``torch.gru_cell`` (one call into ATen)
    and one lerp, where per-step Python overhead, not FLOPs, sets the cost of the loop.
    """

    flip: torch.Tensor  # buffer: +1 on reset and candidate rows, -1 on update rows

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.dim
        self.attention = nn.Sequential(nn.Linear(3 * d, d), nn.ReLU(), nn.Linear(d, 1))
        self.input_gates = nn.Linear(d, 3 * d)  # rows: reset, update, candidate
        self.hidden_gates = nn.Linear(d, 3 * d)
        self.dropout = nn.Dropout(config.dropout_p)
        self.norm = nn.LayerNorm(d)
        # torch.gru_cell weighs the *old* state by its update gate; here z weighs the new content.
        # sigmoid(-x) = 1 - sigmoid(x), so the update rows enter the cell with their sign flipped.
        flip = torch.ones(3 * d)
        flip[d : 2 * d] = -1.0
        self.register_buffer("flip", flip, persistent=False)

    def step_scores(self, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The attention score a_t of every step, (B, L, 1) in [0, 1]; zero at padding."""
        shifts = consecutive_differences(states, valid)
        prev = states - shifts
        score = torch.sigmoid(self.attention(torch.cat([states, shifts, states * prev], -1)))  # (B, L, 1)
        return score * valid.unsqueeze(-1)

    def forward(self, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L, D) states and (B, L) validity -> (B, L, D) enhanced interests."""
        b, length, d = states.shape
        score = self.step_scores(states, valid)
        flip = self.flip
        # The recurrence in fp32 under bf16 autocast too (torch.gru_cell takes one dtype; its steps are small).
        with full_precision(states.device):
            w_ih, b_ih = self.input_gates.weight * flip[:, None], self.input_gates.bias * flip
            w_hh, b_hh = self.hidden_gates.weight * flip[:, None], self.hidden_gates.bias * flip
            x, a = states.float().unbind(1), score.float().unbind(1)
            e = states.new_zeros(b, d, dtype=torch.float32)
            # Leading steps that are padding in every row leave the state at zero: skip them (a short
            # history in a 50-step window runs its own length, not 50 recurrent steps).
            first = int(valid.any(0).int().argmax()) if bool(valid.any()) else length
            out = [e] * first
            for t in range(first, length):
                e = torch.lerp(e, torch.gru_cell(x[t], e, w_ih, w_hh, b_ih, b_hh), a[t])  # a = 0 at padding keeps e
                out.append(e)
            evolved = torch.stack(out, 1)  # (B, L, D)
        return self.norm(states + self.dropout(evolved)) * valid.unsqueeze(-1)
