"""Relevance network: scores candidates against the enhanced interest."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ray_rec.config import ModelConfig
from ray_rec.model.losses import full_softmax_loss, sampled_dot_softmax_loss, sampled_softmax_loss
from ray_rec.model.registry import Registry

RELEVANCES: Registry[nn.Module] = Registry("relevance")

# Hidden units (users x 2D x items floats) one block of the MLP's catalog product holds: 2 MB, so
# each block's product, ReLU and head run in cache instead of streaming through memory.
_BLOCK_FLOATS = 1 << 19
# Hidden units training may keep for the backward pass (512 MB); over it, the blocks are recomputed.
_KEEP_FLOATS = 1 << 27


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

    def full_softmax_loss(self, u: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``targets`` (P,) over every item (N, D): the fused dot-product softmax."""
        return full_softmax_loss(u, items, targets)

    def sampled_softmax_loss(self, u: torch.Tensor, pos: torch.Tensor, items: torch.Tensor, neg_ids: torch.Tensor,
                             targets: torch.Tensor, expected: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        """`losses.sampled_softmax_loss` against the negatives' features ``items`` (K, D): fused."""
        return sampled_dot_softmax_loss(u, pos, items, neg_ids, targets, expected, blocked)


@RELEVANCES.register("mlp")
class MLPRelevance(nn.Module):
    """score(u, v) = u . v + MLP([u, v, u * v, u - v]); the dot term keeps it at least as good as dot.

    The MLP's first layer is linear in [u, v, u * v, u - v], so it splits into a per-user matrix
    applied to v plus a per-user vector: W [u, v, u*v, u-v] + b = M_u v + a_u, with
    M_u = W_v - W_d + W_m diag(u) and a_u = (W_u + W_d) u + b. Scoring C candidates then costs one
    (2D x D) product per pair instead of a (2D x 4D) one on a concatenated pair, no pair tensor is
    built, and a whole catalog is one matrix product per block of users and items: the same
    function as the plain MLP, four times fewer multiply-adds. In training, the hidden layer's
    dropout mask is drawn per user and hidden unit and shared by that user's candidates, so it
    scales the last layer's weights instead of every pair's hidden units (the same expectation, at
    no cost per pair).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.dim
        self.mlp = nn.Sequential(
            nn.Linear(4 * d, 2 * d), nn.ReLU(), nn.Dropout(config.dropout_p), nn.Linear(2 * d, 1)
        )

    def _user_side(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u (..., D) -> M_u (..., 2D, D) and a_u (..., 2D)."""
        first = cast(nn.Linear, self.mlp[0])
        w_u, w_v, w_m, w_d = first.weight.split(u.shape[-1], dim=1)  # each (2D, D)
        return (w_v - w_d) + w_m * u.unsqueeze(-2), u @ (w_u + w_d).T + first.bias

    def _head_weights(self, users: int) -> torch.Tensor:
        """The last layer's weights per user, (users, 1, 2D): in training each user gets its own
        dropout mask over the hidden units, shared by all of that user's candidates."""
        last, drop = cast(nn.Linear, self.mlp[3]), cast(nn.Dropout, self.mlp[2])
        weight = last.weight.expand(users, 1, -1)
        if self.training and drop.p > 0:
            weight = F.dropout(weight, drop.p, training=True)  # one mask per user, see the class doc
        return weight

    def _head(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Hidden units after the ReLU (M, 2D, C) and head weights (M, 1, 2D) -> MLP scores (M, C)."""
        # An explicit bmm: `weight @ hidden` copies all of hidden first when the weight requires grad.
        return torch.bmm(weight, hidden).squeeze(1) + cast(nn.Linear, self.mlp[3]).bias

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """u (..., D) and candidates v (..., C, D) -> scores (..., C)."""
        m, a = self._user_side(u)
        hidden = (m @ v.transpose(-1, -2) + a.unsqueeze(-1)).relu_()  # (..., 2D, C)
        flat = hidden.reshape(-1, *hidden.shape[-2:])  # (M, 2D, C)
        mlp = self._head(flat, self._head_weights(flat.shape[0])).view(hidden.shape[:-2] + hidden.shape[-1:])
        return (u.unsqueeze(-2) * v).sum(-1) + mlp

    def catalog(self, u: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """u (P, D) against every item (N, D) -> (P, N).

        The (P, 2D, N) hidden units go in blocks of users and items of ``_BLOCK_FLOATS`` each, so
        they stay in cache instead of streaming through memory (`python -m bench.relevance_cost`).
        With autograd on, hidden units over ``_KEEP_FLOATS`` are not
        kept for the backward pass: each block of users is checkpointed and recomputed (long
        histories: 128 windows x 200 positions x 256 negatives would keep 3.4 GB; the full softmax
        over Beauty's 12,101 items, 6.8 GB). Inside a caller's own checkpoint (the full softmax's
        chunks of positions) the same rule bounds what its recomputation keeps.
        """
        p, width = u.shape[0], cast(nn.Linear, self.mlp[0]).out_features
        if p == 0:
            return u.new_zeros(0, items.shape[0])
        users = max(1, min(p, _BLOCK_FLOATS // (width * 128)))
        cols = max(128, _BLOCK_FLOATS // (users * width))
        weights = self._head_weights(p)  # drawn once, so a recomputed block sees the same masks
        recompute = torch.is_grad_enabled() and p * width * items.shape[0] > _KEEP_FLOATS
        rows = []
        for start in range(0, p, users):
            block = slice(start, start + users)
            if recompute:
                rows.append(checkpoint(self._user_block, u[block], items, weights[block], cols, use_reentrant=False))
            else:
                rows.append(self._user_block(u[block], items, weights[block], cols))
        return torch.cat(rows, 0)

    def _user_block(self, u: torch.Tensor, items: torch.Tensor, weights: torch.Tensor, cols: int) -> torch.Tensor:
        """Scores of a few users (U, D) against every item (N, D), ``cols`` items at a time -> (U, N)."""
        m, a = self._user_side(u)  # (U, 2D, D), (U, 2D)
        users, width, d = m.shape
        m, a = m.reshape(users * width, d), a.reshape(users * width, 1)  # the users' M_u stacked: one product per block
        parts = []
        for start in range(0, items.shape[0], cols):
            block = items[start : start + cols]  # (n, D), a view: the table is never copied
            hidden = torch.addmm(a, m, block.T).relu_().view(users, width, -1)  # (U, 2D, n); ReLU before the view
            parts.append(u @ block.T + self._head(hidden, weights))
        return torch.cat(parts, -1)

    def full_softmax_loss(self, u: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``targets`` (P,) over every item (N, D), chunks recomputed in backward."""
        return full_softmax_loss(u, items, targets, self.catalog)

    def sampled_softmax_loss(self, u: torch.Tensor, pos: torch.Tensor, items: torch.Tensor, neg_ids: torch.Tensor,
                             targets: torch.Tensor, expected: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        """`losses.sampled_softmax_loss` against the negatives' features ``items`` (K, D)."""
        return sampled_softmax_loss(pos, self.catalog(u, items), neg_ids, targets, expected, blocked)
