"""Ranking metrics on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from ray_rec.metrics import RankingMetrics, full_ranks, sample_negatives, sampled_ranks


def test_full_ranks_exclude_seen_items_and_padding():
    scores = torch.tensor([[9.0, 0.1, 0.9, 0.5, 0.7]])  # column 0 is padding
    # target 3 (0.5): items 2 (0.9) and 4 (0.7) beat it; excluding 2 leaves rank 1
    assert full_ranks(scores, torch.tensor([3])).tolist() == [2]
    assert full_ranks(scores, torch.tensor([3]), torch.tensor([[2, 0]])).tolist() == [1]


def test_ties_count_against_the_target():
    scores = torch.zeros(1, 6)
    assert full_ranks(scores, torch.tensor([2])).tolist() == [4]


def test_hr_ndcg_mrr_values():
    m = RankingMetrics(ks=(1, 5))
    m.add(torch.tensor([0, 2, 10]))
    r = m.result()
    assert r["HR@1"] == pytest.approx(1 / 3)
    assert r["HR@5"] == pytest.approx(2 / 3)
    assert r["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert r["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 11) / 3)
    other = RankingMetrics(ks=(1, 5))
    other.merge(m.sums)
    assert other.result() == r


def test_sampled_negatives_avoid_target_and_seen():
    g = torch.Generator().manual_seed(0)
    targets = torch.tensor([1, 2])
    seen = torch.tensor([[3, 4], [5, 0]])
    neg = sample_negatives(8, targets, seen, 100, g)
    assert neg.shape == (2, 100)
    assert not (neg == targets.unsqueeze(1)).any()
    assert not (neg[0].unsqueeze(1) == seen[0]).any()
    assert sampled_ranks(torch.tensor([0.5]), torch.tensor([[0.1, 0.9, 0.5]])).tolist() == [2]
