"""Training losses computed from relevance scores, and DIEN's auxiliary next-click loss."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def full_softmax_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next click over the whole catalog.

    Args:
        logits: (P, N) scores of the real items 1..N (padding left out).
        targets: (P,) item indices >= 1.
    """
    return F.cross_entropy(logits, targets - 1)


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
