"""Explanations: which history clicks drove an answer (`ray_rec.predict.explain`)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ray_rec.config import ModelConfig
from ray_rec.model.enhancement import ENHANCERS
from ray_rec.model.interest_model import InterestModel
from ray_rec.model.tracking import TRACKERS
from ray_rec.predict import Recommender
from ray_rec.predict.explain import MAX_SETS, METHODS, pool_size
from ray_rec.vocab import Vocabulary

KEYS, ANSWERS, FILLERS = range(1, 11), range(11, 21), range(21, 41)  # item indices


def recommender(model: InterestModel) -> Recommender:
    n = model.config.num_items
    vocab = Vocabulary(ids=[f"i{i}" for i in range(1, n + 1)], counts=np.ones(n, dtype=np.int64), side_values={},
                       side_table=np.zeros((n, 0), dtype=np.int64))
    return Recommender(model.eval(), vocab, {"version": "test"}, "memory")


def key_histories(rng: np.random.Generator, rows: int, length: int = 6, keyless: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Histories of fillers with one key click somewhere; the next click is that key's answer. The
    last ``keyless`` rows hold no key; their next click is a filler."""
    items = rng.choice(np.array(FILLERS), size=(rows, length))
    keys = rng.choice(np.array(KEYS), size=rows)
    where = rng.integers(0, length, size=rows)
    items[np.arange(rows - keyless), where[: rows - keyless]] = keys[: rows - keyless]
    answers = keys + 10
    answers[rows - keyless :] = rng.choice(np.array(FILLERS), size=keyless)
    return items, answers


@pytest.fixture(scope="module")
def key_model() -> InterestModel:
    """A model trained until one click (the key) alone decides the next click (its answer); without a
    key the next click is any filler."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = InterestModel(ModelConfig(num_items=40, dim=16, max_len=8, heads=1, dropout=0.0)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(250):
        items, answers = key_histories(rng, 128, keyless=32)
        targets = np.zeros_like(items)
        targets[:, -1] = answers
        loss = model({"items": torch.tensor(items), "targets": torch.tensor(targets)})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_the_click_that_alone_decides_the_answer_is_named_first(key_model):
    rec = recommender(key_model)
    items, answers = key_histories(np.random.default_rng(1), 40)
    histories = [[f"i{i}" for i in row] for row in items]
    top = rec.recommend(histories, k=1, explain=True)
    assert np.mean([t[0][0] == f"i{a}" for t, a in zip(top, answers)]) >= 0.95  # the model learned the rule
    first = [answer[0][2][0] for answer in top]  # the default method's first reason
    assert np.mean([int(h[why.position][1:]) in KEYS for h, why in zip(histories, first)]) >= 0.9, first[:5]
    assert all(why.share > 0 for why in first)


@pytest.mark.parametrize("tracker,enhancer", list(itertools.product(TRACKERS.names(), ENHANCERS.names())))
def test_explanations_name_only_history_clicks_for_every_network(tracker, enhancer):
    torch.manual_seed(0)
    model = InterestModel(ModelConfig(num_items=40, dim=8, max_len=5, heads=1, tracker=tracker, enhancer=enhancer))
    rec = recommender(model)
    history = ["i3", "nope", "i7", "i3", "i9", "i12", "i30", "i31"]  # longer than the 5 clicks the model reads
    for method in METHODS:
        if method == "attention" and enhancer != "augru":
            with pytest.raises(ValueError, match="enhancer is"):
                rec.recommend([history], k=3, explain=True, explain_method=method)
            continue
        answer = rec.recommend([history], k=3, explain=True, explain_top=4, explain_method=method)[0]
        assert [(i, s) for i, s, _ in answer] == rec.recommend([history], k=3)[0]  # explaining changes no answer
        for _, _, why in answer:
            assert len(why) == 4
            assert all(history[r.position] == r.item_id for r in why)
            assert all(r.position >= 3 for r in why)  # only the clicks the model reads (the last 5 known)
            assert sum(abs(r.share) for r in why) <= 1 + 1e-6
        scored = rec.score([history], [["i1", "nope", "i2"]], explain=True, explain_method=method)[0]
        assert scored[1] == (None, [])
        assert [s for s, _ in scored] == rec.score([history], [["i1", "nope", "i2"]])[0]


def test_leave_one_out_is_the_score_lost_without_each_click(key_model):
    rec = recommender(key_model)
    history = ["i21", "i4", "i22", "i23"]
    (item, score, why), = rec.recommend([history], k=1, explain=True, explain_top=4, explain_method="leave_one_out")[0]
    contributions = {r.position: r.share for r in why}
    total = None
    for position in range(4):
        shorter = history[:position] + history[position + 1:]
        lost = score - rec.score([shorter], [[item]])[0][0]
        total = lost / contributions[position] if total is None else total
        assert lost == pytest.approx(contributions[position] * total, rel=1e-3, abs=1e-5)


def test_best_set_names_the_clicks_whose_deletion_together_lowers_the_score_most(key_model):
    rec = recommender(key_model)
    rng = np.random.default_rng(3)
    for items in rng.choice(np.array([*KEYS, *FILLERS]), size=(5, 7)):
        history = [f"i{i}" for i in items]
        (item, score, why), = rec.recommend([history], k=1, explain=True)[0]  # best_set, 3 clicks
        lost = {}
        for deleted in itertools.combinations(range(7), 3):
            shorter = [x for p, x in enumerate(history) if p not in deleted]
            lost[deleted] = score - rec.score([shorter], [[item]])[0][0]
        chosen = tuple(sorted(r.position for r in why))
        assert lost[chosen] == pytest.approx(max(lost.values()), abs=1e-5)  # 7 clicks: every set was tried
        (_, _, alone), = rec.recommend([history], k=1, explain=True, explain_top=7, explain_method="leave_one_out")[0]
        shares = {r.position: r.share for r in alone}
        assert [r.share for r in why] == pytest.approx([shares[r.position] for r in why])
        assert [r.share for r in why] == sorted((r.share for r in why), reverse=True)


def test_a_batch_explains_each_query_as_it_would_alone(key_model):
    rec = recommender(key_model)
    rng = np.random.default_rng(4)
    histories = [[f"i{i}" for i in rng.choice(np.array([*KEYS, *FILLERS]), size=n)] for n in (2, 3, 5, 8, 9, 12)]
    together = rec.recommend(histories, k=2, explain=True)  # in a batch, the sets get their own pass
    for history, batched in zip(histories, together):
        (alone,) = rec.recommend([history], k=2, explain=True)  # alone, one pass where the window is its pool
        assert [i for i, _, _ in alone] == [i for i, _, _ in batched]
        for (_, _, why), (_, _, why_batched) in zip(alone, batched):
            assert [r.position for r in why] == [r.position for r in why_batched]
            assert [r.share for r in why] == pytest.approx([r.share for r in why_batched], abs=1e-4)  # batch-level float noise


def test_best_set_searches_a_pool_of_bounded_sets():
    assert [pool_size(3, n) for n in (2, 3, 5, 8, 9, 50)] == [2, 3, 5, 8, 8, 8]
    assert pool_size(1, 50) == 50 and pool_size(20, 50) >= 20 and pool_size(20, 5) == 5
    assert all(math.comb(pool_size(top, 50), top) <= MAX_SETS for top in range(1, 21))


def test_bad_explain_arguments_are_clear_errors(key_model):
    rec = recommender(key_model)
    with pytest.raises(ValueError, match="explain_top=0"):
        rec.recommend([["i1"]], explain=True, explain_top=0)
    with pytest.raises(ValueError, match="explain method 'shap'"):
        rec.recommend([["i1"]], explain=True, explain_method="shap")
    assert rec.recommend([["unknown"]], k=2, explain=True)[0][0][2] == []  # a popularity answer has no reasons


def test_the_faithfulness_benchmark_sees_the_deciding_click_matter_more_than_random_or_recent_ones(key_model):
    from bench.explain import faithfulness

    items, _ = key_histories(np.random.default_rng(2), 60)
    found = faithfulness(recommender(key_model), items.tolist(), seed=0)
    d = found["deletions"]
    # Random and recent deletions of 3 of the 6 clicks also delete the key about half the time: no win then.
    assert d["leave_one_out"]["wins"] >= 0.4, d
    for baseline in ("random", "recent"):
        assert d["leave_one_out"]["mean_rank_drop"] > d[baseline]["mean_rank_drop"]
        assert d["leave_one_out"]["mean_score_drop"] > d[baseline]["mean_score_drop"]
    assert d["best_set"]["wins"] >= d["leave_one_out"]["wins"], d  # the set chosen together, on its own score
    assert d["best_set"]["mean_score_drop"] >= d["greedy leave-one-out"]["mean_score_drop"] - 1e-6, d
    assert set(found["ms_per_query"]) == {*METHODS, "greedy leave-one-out", "plain"}
    # Every 3-click set of these 6-click windows was tried: no method wins on more users than some set does.
    assert found["ceiling"]["exact_users"] == 1.0
    assert found["ceiling"]["some_set_wins"] >= max(d[m]["wins"] for m in [*METHODS, "greedy leave-one-out"]), found["ceiling"]
