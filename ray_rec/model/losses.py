"""Training losses computed from relevance scores, and DIEN's auxiliary next-click loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ray_rec.device import full_precision

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
    matrix products, with no softmax kept for autograd (`python -m bench.loss_memory` compares it
    with autograd's cross-entropy). Any other scorer gets activation
    checkpointing: a chunk's logits are recomputed in the backward pass.

    Args:
        u: (P, D) interests at the positions that have a next click.
        items: (N, D) features of the real items 1..N (padding left out).
        targets: (P,) item indices >= 1.
        catalog: scores u against every item, (P, D), (N, D) -> (P, N); None: the dot product.
    """
    rows = max(1, max_cells // max(1, items.shape[0]))
    if catalog is None:
        with full_precision(u.device):  # under bf16 autocast too: the catalog's logits in fp32
            return cast(torch.Tensor, _ChunkedDotSoftmax.apply(u.float(), items.float(), targets, min(rows, max(1, u.shape[0]))))
    if u.shape[0] <= rows:
        return F.cross_entropy(catalog(u, items).float(), targets - 1)
    total = u.new_zeros(())
    for start in range(0, u.shape[0], rows):
        chunk = slice(start, start + rows)
        total = total + checkpoint(_summed_cross_entropy, u[chunk], items, targets[chunk], catalog, use_reentrant=False)
    return total / u.shape[0]


def _summed_cross_entropy(u: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, catalog: Catalog) -> torch.Tensor:
    return F.cross_entropy(catalog(u, items).float(), targets - 1, reduction="sum")


class _ChunkedDotSoftmax(torch.autograd.Function):
    """Mean cross-entropy of softmax(u @ items.T) in chunks of ``rows`` positions, gradients
    computed in the forward pass (only (P, D) and (N, D) gradients are kept, never the logits)."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        total = u.new_zeros((), dtype=torch.float64)
        grad_u, grad_items = torch.empty_like(u), torch.zeros_like(items)
        for start in range(0, u.shape[0], rows):
            uc, tc = u[start : start + rows], targets[start : start + rows] - 1  # (R, D), (R,)
            # The softmax in place on the logits (no log-softmax tensor beside them): the same
            # loss and gradients, one (R, N) tensor and two passes over it fewer a chunk.
            logits = uc @ items.T  # (R, N)
            top = logits.amax(1, keepdim=True)
            picked = logits.gather(1, tc.unsqueeze(1))  # the targets' logits, before the softmax overwrites them
            probs = logits.sub_(top).exp_()
            norm = probs.sum(1, keepdim=True)
            total += (norm.log() + top - picked).sum().double()
            probs.div_(norm)[torch.arange(len(tc), device=tc.device), tc] -= 1.0  # d loss / d logits
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
    pos: torch.Tensor, neg: torch.Tensor, neg_ids: torch.Tensor, targets: torch.Tensor, expected_draws: torch.Tensor,
    blocked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax of the clicked item against a sample of the catalog shared by the batch.

    Each negative's logit gets -log(expected draws of its item in the sample) added (the logQ
    correction of Bengio & Senecal, Jean et al. 2015): a negative then stands for the items the
    sample left out, and the sampled partition function estimates the full softmax's. K uniform
    draws from N items: K / N each, so + log(N / K). Draws
    from the batch's next clicks add M x (the item's share of clicks) to its expectation
    (`uniform_and_in_batch`).

    Args:
        pos: (P,) score of the clicked item.
        neg: (P, K) scores of the shared negatives.
        neg_ids: (K,) their item indices; a negative equal to the target is masked out.
        targets: (P,) clicked item indices.
        expected_draws: (K,) how many times the sampler draws each negative's item, in expectation.
        blocked: optional (P, M), M <= K: True where one of the last M negatives must not count
            for a position (the in-batch draws' own-window mask; the uniform draws need none).
    """
    # Any scorer's path: the MLP relevance's, 256 negatives (the dot product takes the fused
    # `sampled_dot_softmax_loss`).
    pos, neg = pos.float(), neg.float() - torch.log(expected_draws).unsqueeze(0)  # fp32 under bf16 autocast too
    neg = neg.masked_fill(_excluded(neg_ids, targets, blocked), float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], 1)  # (P, 1 + K)
    return F.cross_entropy(logits, torch.zeros_like(targets))


def sampled_dot_softmax_loss(
    u: torch.Tensor, pos: torch.Tensor, items: torch.Tensor, neg_ids: torch.Tensor, targets: torch.Tensor,
    expected_draws: torch.Tensor, blocked: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sampled_softmax_loss` with the negatives scored by the dot product, ``neg = u @ items.T``
    ((P, D) against (K, D)), fused: the gradients are computed in the forward pass from the
    softmax (d loss / d logits = softmax - one-hot) and the (P, K) scores freed, so autograd keeps
    no (P, K) tensor and its backward pass makes none (as `full_softmax_loss` does for the whole
    catalog). The same loss and gradients; ``pos`` keeps its own autograd path."""
    with full_precision(u.device):  # under bf16 autocast too: the sampled logits in fp32
        return cast(torch.Tensor, _SampledDotSoftmax.apply(u.float(), pos.float(), items.float(), torch.log(expected_draws),
                                                           _excluded(neg_ids, targets, blocked)))


def _excluded(neg_ids: torch.Tensor, targets: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
    """(P, K) True where a negative does not count for a position: its own target, or ``blocked``
    ((P, M): the last M negatives)."""
    masked = neg_ids.unsqueeze(0) == targets.unsqueeze(1)
    if blocked is not None:
        masked[:, masked.shape[1] - blocked.shape[1] :] |= blocked
    return masked


class _SampledDotSoftmax(torch.autograd.Function):
    """Mean over positions of -log softmax([pos, u @ items.T - log_expected, masked])[0]; the
    gradients of u, pos and items computed in the forward pass, the (P, K) scores freed."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, pos: torch.Tensor, items: torch.Tensor, log_expected: torch.Tensor,
                masked: torch.Tensor) -> torch.Tensor:
        positions = max(1, len(pos))  # no position with a next click: loss 0, not NaN
        probs = torch.addmm(-log_expected.unsqueeze(0), u, items.T)  # (P, K) corrected scores
        probs.masked_fill_(masked, float("-inf"))
        top = torch.maximum(probs.amax(1), pos)  # (P,) finite: pos is
        pos_exp = torch.exp(pos - top)
        total = pos_exp + probs.sub_(top.unsqueeze(1)).exp_().sum(1)  # softmax's denominator / e^top
        loss = (torch.log(total) + top - pos).sum() / positions
        probs.div_(total.unsqueeze(1) * positions)  # d loss / d neg
        ctx.save_for_backward(probs @ items, probs.T @ u, (pos_exp / total - 1.0) / positions)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_u, grad_items, grad_pos = ctx.saved_tensors
        return grad_u * grad_out, grad_pos * grad_out, grad_items * grad_out, None, None


def uniform_negatives(num_items: int, k: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K items drawn uniformly with replacement, and their expected draws (K / N each): (K,), (K,)."""
    return torch.randint(1, num_items + 1, (k,), device=device), torch.full((k,), k / num_items, device=device)


def uniform_and_in_batch(
    num_items: int, k: int, targets: torch.Tensor, click_counts: torch.Tensor, max_in_batch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K uniform draws plus the batch's next clicks (a random ``max_in_batch`` of them past that),
    with each item's expected draws under the mix: K / N + M x q_i, where q_i is its share of the
    clicks (``click_counts``: (N + 1,) counts so far, add-one smoothed).

    The next clicks are draws from the click distribution, so they are the popular items that
    uniform draws from a long-tailed catalog almost never reach, and the hardest to tell apart
    from the target (mixed negative sampling, Yang et al. 2020; the correction as in Yi et al. 2019).
    Returns (K + M,) item indices, (K + M,) expected draws, and (M,) the positions the drawn
    clicks are the next clicks of (so that a window's own later clicks can be kept out of its
    negatives).
    """
    uniform, _ = uniform_negatives(num_items, k, targets.device)
    source = torch.arange(len(targets), device=targets.device)
    if len(targets) > max_in_batch:
        source = torch.randperm(len(targets), device=targets.device)[:max_in_batch]
    ids = torch.cat([uniform, targets[source]])
    share = (click_counts[ids] + 1.0) / (click_counts.sum() + num_items)
    return ids, (k / num_items + len(source) * share).to(torch.float32), source


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
