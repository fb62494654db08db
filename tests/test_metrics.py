"""Ranking metrics on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from ray_rec.metrics import RankingMetrics, full_ranks, sample_negatives, sampled_ranks, user_negatives


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


def test_user_negatives_depend_on_the_user_alone_and_avoid_target_and_seen():
    targets, seen = torch.tensor([1, 2, 3]), torch.tensor([[3, 4], [5, 0], [6, 7]])
    neg = user_negatives(10, targets, seen, 50, keys=[11, 22, 33], seed=0)
    assert neg.shape == (3, 50) and bool(((neg >= 1) & (neg <= 10)).all())
    for row in range(3):
        assert not set(neg[row].tolist()) & ({int(targets[row])} | set(seen[row].tolist()))
    # the same user in another batch, at another place, gets the same negatives; another seed others
    alone = user_negatives(10, targets[2:], seen[2:], 50, keys=[33], seed=0)
    assert torch.equal(alone[0], neg[2])
    assert not torch.equal(user_negatives(10, targets[2:], seen[2:], 50, keys=[33], seed=1)[0], neg[2])
    assert not torch.equal(neg[0], user_negatives(10, targets[:1], seen[:1], 50, keys=[12], seed=0)[0])


def test_evaluation_in_blocks_ranks_every_user_as_one_block_does(monkeypatch):
    """Validation and `ray-rec evaluate` score users in blocks of at most BLOCK_CELLS catalog
    scores; the ranks must not depend on where the blocks fall."""
    from ray_rec.config import ModelConfig
    from ray_rec.model.interest_model import InterestModel
    from ray_rec.predict import ranking

    torch.manual_seed(0)
    model = InterestModel(ModelConfig(num_items=40, dim=8, max_len=6)).eval()
    lengths = torch.tensor([1, 2, 3, 4, 5, 6, 3])
    items = torch.randint(1, 41, (7, 6)) * (torch.arange(6) >= 6 - lengths.unsqueeze(1))  # left-padded
    targets = torch.randint(1, 41, (7,))
    u = ranking.interests(model, items)
    whole = full_ranks(model.score_catalog(items), targets, items)

    monkeypatch.setattr(ranking, "BLOCK_CELLS", 3 * 41)  # three users' catalog scores
    assert [(s.start, s.stop) for s in ranking.catalog_blocks(7, 40)] == [(0, 3), (3, 6), (6, 9)]
    negatives = torch.randint(1, 41, (7, 5))
    ranks, negative_ranks = ranking.rank_targets(model, u, targets, items, negatives)
    scores = model.score_catalog(items)
    assert torch.equal(ranks, whole)
    assert negative_ranks is not None
    assert torch.equal(negative_ranks, sampled_ranks(scores.gather(1, targets.unsqueeze(1)).squeeze(1), scores.gather(1, negatives)))

    monkeypatch.setattr(ranking, "BLOCK_CELLS", 1)  # not even one user's scores: one user a block
    assert len(list(ranking.catalog_blocks(7, 40))) == 7
    ranks, negative_ranks = ranking.rank_targets(model, u, targets, items)
    assert torch.equal(ranks, whole) and negative_ranks is None
