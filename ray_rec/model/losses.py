"""Training losses computed from relevance scores, and DIEN's auxiliary next-click loss."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

# Logit cells (positions x catalog items) the full softmax holds at once: 32M floats, 128 MB, and
# about as much again for their softmax and gradient. Larger products go in chunks of positions.
FULL_SOFTMAX_CHUNK_CELLS = 1 << 25

Catalog = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def full_softmax_loss(
    u: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    catalog: Catalog | None = None,
    max_cells: int = FULL_SOFTMAX_CHUNK_CELLS,
) -> torch.Tensor:
    """Cross-entropy of the next click over the whole catalog, in bounded memory.

    The (P, N) logits of a long-history batch over a large catalog run to gigabytes (128 windows x
    200 steps x 50,000 items is 5 GB, about three times over with the softmax and its gradient), so
    when P x N passes ``max_cells`` the positions go in chunks. With dot-product scores (one chunk
    or several) each chunk's gradients are computed right away from its softmax (d loss / d logits
    = softmax - one-hot) and the logits freed: the same loss and gradients from the same three
    matrix products, with no softmax kept for autograd (faster than autograd's cross-entropy at
    every size measured: README, "Full-softmax memory"). Any other scorer gets activation
    checkpointing: a chunk's logits are recomputed in the backward pass.

    Args:
        u: (P, D) interests at the positions that have a next click.
        items: (N, D) features of the real items 1..N (padding left out).
        targets: (P,) item indices >= 1.
        catalog: scores u against every item, (P, D), (N, D) -> (P, N); None: the dot product.
    """
    rows = max(1, max_cells // max(1, items.shape[0]))
    if catalog is None:
        return cast(torch.Tensor, _ChunkedDotSoftmax.apply(u, items, targets, min(rows, max(1, u.shape[0]))))
    if u.shape[0] <= rows:
        return F.cross_entropy(catalog(u, items), targets - 1)
    total = u.new_zeros(())
    for start in range(0, u.shape[0], rows):
        chunk = slice(start, start + rows)
        total = total + checkpoint(_summed_cross_entropy, u[chunk], items, targets[chunk], catalog, use_reentrant=False)
    return total / u.shape[0]


def _summed_cross_entropy(u: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, catalog: Catalog) -> torch.Tensor:
    return F.cross_entropy(catalog(u, items), targets - 1, reduction="sum")


class _ChunkedDotSoftmax(torch.autograd.Function):
    """Mean cross-entropy of softmax(u @ items.T) in chunks of ``rows`` positions, gradients
    computed in the forward pass (only (P, D) and (N, D) gradients are kept, never the logits)."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        total = u.new_zeros((), dtype=torch.float64)
        grad_u, grad_items = torch.empty_like(u), torch.zeros_like(items)
        for start in range(0, u.shape[0], rows):
            uc, tc = u[start : start + rows], targets[start : start + rows] - 1  # (R, D), (R,)
            probs = (uc @ items.T).log_softmax(-1)  # (R, N) log-probabilities
            total -= probs.gather(1, tc.unsqueeze(1)).sum().double()
            probs.exp_()[torch.arange(len(tc), device=tc.device), tc] -= 1.0  # d loss / d logits
            grad_u[start : start + rows] = probs @ items
            grad_items.addmm_(probs.T, uc)
        ctx.save_for_backward(grad_u, grad_items)
        ctx.positions = max(1, u.shape[0])  # a batch without a next click gives loss 0, not NaN
        return (total / ctx.positions).to(u.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_u, grad_items = ctx.saved_tensors
        scale = grad_out / ctx.positions
        return grad_u * scale, grad_items * scale, None, None


def sampled_softmax_loss(
    pos: torch.Tensor, neg: torch.Tensor, neg_ids: torch.Tensor, targets: torch.Tensor, num_items: int
) -> torch.Tensor:
    """Softmax of the clicked item against uniformly sampled negatives shared by the batch.

    Each of the K negatives stands for N / K items of the catalog (uniform draws with replacement:
    expected count K / N per item), so its logit gets log(N / K) added (the logQ correction of
    Bengio & Senecal, Jean et al. 2015). The sampled partition function then estimates the full
    softmax's, instead of undercounting the catalog N / K times (measured in README "Model quality").

    Args:
        pos: (P,) score of the clicked item.
        neg: (P, K) scores of the shared negatives.
        neg_ids: (K,) their item indices; a negative equal to the target is masked out.
        targets: (P,) clicked item indices.
        num_items: N, the catalog size the negatives were drawn from.
    """
    neg = neg + math.log(num_items / neg_ids.shape[0])
    neg = neg.masked_fill(neg_ids.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], 1)  # (P, 1 + K)
    return F.cross_entropy(logits, torch.zeros_like(targets))


def binary_loss(pos: torch.Tensor, neg: torch.Tensor, neg_valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy: clicked = 1, browsed or sampled negatives = 0.

    Args:
        pos: (P,) scores of clicked candidates.
        neg: (P, K) scores of negatives.
        neg_valid: (P, K) which negatives are real (not padding, not the target).
    """
    pos_loss = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
    neg_terms = F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="none")
    neg_loss = (neg_terms * neg_valid).sum() / neg_valid.sum().clamp(min=1)
    return pos_loss + neg_loss


def auxiliary_next_click_loss(states: torch.Tensor, next_feats: torch.Tensor, neg_feats: torch.Tensor) -> torch.Tensor:
    """DIEN's auxiliary loss: each interest state should tell its next click from a random item.

    Args:
        states: (P, D) interest states (tracker output) at positions with a next click.
        next_feats: (P, D) features of the next clicked item.
        neg_feats: (P, D) features of a random item.
    """
    pos = (states * next_feats).sum(-1)
    neg = (states * neg_feats).sum(-1)
    return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + F.binary_cross_entropy_with_logits(
        neg, torch.zeros_like(neg)
    )
