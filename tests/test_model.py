"""The interest model: shapes per variant, padding invariance, causality, learning, artifacts."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

from ray_rec.config import ModelConfig, TrainConfig, for_data
from ray_rec.model.enhancement import ENHANCERS, consecutive_differences
from ray_rec.model.interest_model import InterestModel
from ray_rec.model.relevance import RELEVANCES, DotRelevance
from ray_rec.model.tracking import TRACKERS
from ray_rec.predict.ranking import interests, top_k

N = 40
VARIANTS = list(itertools.product(TRACKERS.names(), ENHANCERS.names(), RELEVANCES.names(), ["auto", "bce"]))


def make(tracker="transformer", enhancer="trend", relevance="dot", loss="auto", **kw) -> InterestModel:
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=N, dim=16, heads=2, max_len=8, tracker=tracker, enhancer=enhancer,
                      relevance=relevance, loss=loss, side_features={"cat": 5}, num_negatives=8, **kw)
    model = InterestModel(cfg)
    model.features.set_item_side(torch.randint(0, 6, (N + 1, 1)))
    return model


def batch(b=4, length=8, negatives=True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    items = torch.randint(1, N + 1, (b, length), generator=g)
    items[0, :3] = 0  # left padding
    targets = torch.randint(1, N + 1, (b, length), generator=g) * (items > 0)
    out = {"items": items, "targets": targets, "time_buckets": torch.randint(0, 24, (b, length), generator=g) * (items > 0)}
    if negatives:
        out["negatives"] = torch.randint(0, N + 1, (b, length, 3), generator=g) * (items > 0).unsqueeze(-1)
    return out


@pytest.mark.parametrize("tracker,enhancer,relevance,loss", VARIANTS)
def test_shapes_for_every_variant(tracker, enhancer, relevance, loss):
    model = make(tracker, enhancer, relevance, loss)
    losses = model(batch())
    assert losses["loss"].dim() == 0 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    model.eval()
    data = batch()
    assert model.score(data["items"], torch.randint(1, N + 1, (4, 5))).shape == (4, 5)
    assert model.score_catalog(data["items"]).shape == (4, N + 1)
    ids, scores = top_k(model, interests(model, data["items"]), 7, exclude=data["items"])
    assert ids.shape == scores.shape == (4, 7)
    assert not (ids.unsqueeze(2) == data["items"].unsqueeze(1)).any(), "excluded items were recommended"


BLOCKS = ["pre_norm", "post_norm"]


def with_blocks(trackers) -> list[tuple[str, str, str]]:
    """(tracker, enhancer, block) for every enhancer, both blocks where the tracker has blocks."""
    return [(t, e, b) for t, e, b in itertools.product(trackers, ENHANCERS.names(), BLOCKS) if t != "gru" or b == "pre_norm"]


@pytest.mark.parametrize("tracker,enhancer,block", with_blocks(TRACKERS.names()))
def test_left_padding_does_not_change_scores(tracker, enhancer, block):
    model = make(tracker, enhancer, block=block).eval()
    history = torch.tensor([[5, 9, 2, 17]])
    padded = torch.tensor([[0, 0, 0, 5, 9, 2, 17]])
    cands = torch.tensor([[1, 2, 3, 30]])
    torch.testing.assert_close(model.score(history, cands), model.score(padded, cands), rtol=1e-5, atol=1e-5)


CAUSAL_TRACKERS = [t for t in TRACKERS.names() if t != "spectral"]  # spectral reads the whole window: prefixes only


@pytest.mark.parametrize("tracker,enhancer,block", with_blocks(CAUSAL_TRACKERS))
def test_later_clicks_do_not_change_earlier_states(tracker, enhancer, block):
    model = make(tracker, enhancer, block=block).eval()
    a = torch.tensor([[0, 4, 8, 15, 16, 23, 42 % N]])
    b = a.clone()
    b[0, -1] = 7  # change only the last click
    with torch.no_grad():
        sa, ua = model.encode(a)
        sb, ub = model.encode(b)
    torch.testing.assert_close(sa[:, :-1], sb[:, :-1])
    torch.testing.assert_close(ua[:, :-1], ub[:, :-1])
    assert not torch.allclose(ua[:, -1], ub[:, -1])


def test_post_norm_blocks_layer_norm_their_input_and_every_residual_sum():
    """``model.block=post_norm`` (BERT's block, as BSARec uses it): the features entering the tracker
    and each block's output are layer-normed whatever the scale of the block's input; SASRec's
    pre-norm block carries its input's scale through the residual stream."""
    from ray_rec.model.tracking import causal_mask

    items = torch.tensor([[0, 0, 3, 9, 2, 17, 5, 11]])
    valid = items > 0
    x = 10 * torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0)) * valid.unsqueeze(-1)
    for tracker in ("transformer", "spectral"):
        post, pre = (make(tracker, "augru", dropout=0.0, block=b).eval() for b in ("post_norm", "pre_norm"))
        with torch.no_grad():
            feats = post.features.sequence_features(items, None)[valid]
            torch.testing.assert_close(feats.mean(-1), torch.zeros(6), atol=1e-5, rtol=0)
            torch.testing.assert_close(feats.std(-1, unbiased=False), torch.ones(6), atol=0.05, rtol=0)  # LayerNorm eps
            mask = causal_mask(valid, 2)
            out = post.tracker.blocks[0](x, mask, valid)[valid]
            torch.testing.assert_close(out.std(-1, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)
            assert pre.tracker.blocks[0](x, mask, valid)[valid].std(-1).min() > 5
    with pytest.raises(ValueError, match="model.block='post_norm' .* model.tracker='gru' has none"):
        ModelConfig(tracker="gru", block="post_norm")


def test_the_spectral_tracker_splits_the_window_by_frequency_and_trains_on_prefixes_only():
    from ray_rec.model.tracking import FrequencyFilter

    f = FrequencyFilter(dim=3, length=16, keep=5)  # keeps the 3 lowest of 9 frequencies
    steps = torch.arange(16, dtype=torch.float32)
    slow = torch.cos(2 * torch.pi * steps / 16).view(1, 16, 1).expand(1, 16, 3)  # frequency 1
    fast = torch.cos(2 * torch.pi * 6 * steps / 16).view(1, 16, 1).expand(1, 16, 3)  # frequency 6
    with torch.no_grad():
        torch.testing.assert_close(f(slow + fast), slow + fast)  # gain 1: unchanged
        f.gain.fill_(0.5)  # the fast part scaled by 0.25, the slow part kept
        torch.testing.assert_close(f(slow + fast), slow + 0.25 * fast, atol=1e-5, rtol=1e-5)
    # Not causal: a later click changes earlier states, so windows (every step trained) are refused.
    model = make("spectral", "augru").eval()
    for block in model.tracker.blocks:
        block.filter.gain.data.fill_(0.5)  # at 1 (its start) the filter passes its input unchanged
    a = torch.tensor([[0, 4, 8, 15, 16, 23, 3]])
    b = a.clone()
    b[0, -1] = 7
    with torch.no_grad():
        assert not torch.allclose(model.encode(a)[0][:, :-1], model.encode(b)[0][:, :-1])
    with pytest.raises(ValueError, match="model.tracker='spectral' .* model.examples='prefixes' only"):
        ModelConfig(tracker="spectral", examples="windows")
    from .conftest import make_manifest

    assert for_data(ModelConfig(tracker="spectral"), make_manifest(users=10, items=100, clicks=1000)).examples == "prefixes"


def test_a_new_model_tells_items_apart_more_than_positions_times_or_side_features():
    """At initialisation a pre-norm model's history feature is mostly the item: the same item at another
    position, after another gap and with the side-feature values of another item stays closer to
    itself than two different items are (position, time and side tables start as small as the id's,
    and SASRec's layout scales the item's by sqrt(D)). BERT's post-norm layout sums them at one scale
    and layer-norms the sum (`test_post_norm_blocks_layer_norm_their_input_and_every_residual_sum`)."""
    model = make(use_time=True, block="pre_norm").eval()
    fx = model.features
    fx.set_item_side(torch.arange(N + 1).remainder(6).unsqueeze(1))
    length = fx.max_len
    same = fx.sequence_features(torch.full((1, length), 7), torch.arange(1, length + 1).remainder(25).unsqueeze(0))[0]
    others = fx.sequence_features(torch.arange(1, length + 1).unsqueeze(0), torch.ones(1, length, dtype=torch.long))[0]
    cos = torch.nn.functional.cosine_similarity
    # item 7 at every position and gap, against different items at no gap
    assert cos(same[:1], same[1:]).min() > max(0.8, cos(others[:1], others[1:]).abs().max())


def test_a_seeded_step_lowers_the_loss():
    model = make(dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = batch(negatives=False)
    torch.manual_seed(0)
    before = model(data)["main"].item()
    loss = model(data)["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    torch.manual_seed(0)
    assert model(data)["main"].item() < before


def test_a_sparse_gradient_moves_its_row_at_once_as_far_as_adam_does_over_the_next_steps():
    """Row 1 gets a gradient at steps 1001 and 1061, none otherwise (row 2 gets one every step):
    dense Adam spreads each move over the following steps (momentum); `LazyAdam` makes it at once,
    with the second moment decayed over the 59 idle steps in between as Adam decays it. Rows
    without a gradient do not move; clipping reads sparse gradients."""
    from ray_rec.train.optim import LazyAdam, clip_gradients

    torch.manual_seed(0)
    dense = torch.nn.Embedding(10, 4)
    sparse = torch.nn.Embedding(10, 4, sparse=True)
    sparse.load_state_dict(dense.state_dict())
    adam = torch.optim.Adam(dense.parameters(), lr=0.01, betas=(0.9, 0.98))
    lazy = LazyAdam(sparse.parameters(), lr=0.01, betas=(0.9, 0.98))
    w = torch.randn(2, 4)
    touches = {1001, 1061}
    for emb, opt in ((dense, adam), (sparse, lazy)):
        for step in range(1, 1430 if emb is dense else 1062):  # dense Adam: 370 more steps, for its momentum
            opt.zero_grad()
            rows = torch.tensor([1, 2] if step in touches else [2])
            (emb(rows) * w[2 - len(rows):]).sum().backward()
            if emb is sparse:
                assert emb.weight.grad.is_sparse
                clip_gradients(emb.parameters(), 1e6)
            if step == 1000:
                start = emb.weight.detach().clone()
            opt.step()
        moved = emb.weight.detach() - start
        if emb is dense:
            expected = moved
    torch.testing.assert_close(moved[1], expected[1], rtol=1e-2, atol=0)
    assert float(moved[1].abs().min()) > 0.1  # each gradient: about 7.8 lr per unit of g
    assert torch.equal(moved[3:], torch.zeros_like(moved[3:]))
    # A checkpoint of dense Adam resumed with sparse gradients: its moments carry over, its momentum is dropped.
    resumed = LazyAdam(sparse.parameters(), lr=0.01, betas=(0.9, 0.98))
    resumed.load_state_dict(adam.state_dict())
    lazy.zero_grad()
    sparse(torch.tensor([1])).sum().backward()
    resumed.step()
    state = resumed.state[sparse.weight]
    assert "exp_avg" not in state and int(state["step"]) == 1430 and float(state["last_step"][1]) == 1430.0
    torch.testing.assert_close(state["exp_avg_sq"][3], adam.state[dense.weight]["exp_avg_sq"][3])
    clipped = torch.nn.Embedding(10, 4, sparse=True)
    (clipped(torch.tensor([1, 1, 2])).sum() * 10).backward()  # row 1 twice: clip by the summed rows' norm
    clip_gradients(clipped.parameters(), 1.0)
    assert abs(float(torch.linalg.vector_norm(clipped.weight.grad.coalesce().values())) - 1.0) < 1e-5


def test_sparse_item_gradients_update_only_the_rows_a_step_reads():
    from ray_rec.config import TrainConfig
    from ray_rec.train.fit import train_step
    from ray_rec.train.optim import make_optimizer, sparse_item_gradients

    sampled = make(loss="sampled_softmax").config
    assert sparse_item_gradients(sampled, TrainConfig(), on_gpu=False)
    assert sparse_item_gradients(make(loss="bce").config, TrainConfig(), on_gpu=False)
    assert not sparse_item_gradients(sampled, TrainConfig(sparse_items=False), on_gpu=False)
    assert not sparse_item_gradients(sampled, TrainConfig(), on_gpu=True)
    assert not sparse_item_gradients(make().config, TrainConfig(), on_gpu=False)  # the full softmax reads every item
    assert not sparse_item_gradients(make(relevance="mlp", loss="sampled_softmax").config, TrainConfig(), on_gpu=False)  # its dot term's does
    with pytest.raises(ValueError, match="train.sparse_items='no' must be true or false"):
        TrainConfig(sparse_items="no")  # type: ignore[arg-type]

    models = {"dense": make(loss="sampled_softmax"), "sparse": make(loss="sampled_softmax")}
    models["sparse"].features.item.sparse = True
    optimizers = {k: make_optimizer(m, TrainConfig(lr=0.01)) for k, m in models.items()}
    weights = []
    for step in range(2):
        data = batch(length=8 - 4 * step, negatives=False)  # the second step reads fewer items
        for key, model in models.items():
            torch.manual_seed(step)  # the same negatives and dropout for both
            train_step(model, data, optimizers[key], grad_clip=0.1)  # small enough to clip
        weights.append({k: m.features.item.weight.detach().clone() for k, m in models.items()})
    read = models["sparse"].features.item.weight.grad.coalesce().indices()[0]
    unread = torch.ones(N + 1, dtype=torch.bool)
    unread[read] = False
    assert 0 < int(unread.sum()) < N + 1
    assert torch.equal(weights[1]["sparse"][unread], weights[0]["sparse"][unread])  # lazy: rows not read stay
    assert not torch.equal(weights[1]["dense"][unread], weights[0]["dense"][unread])  # dense Adam's momentum moves them
    assert not torch.equal(weights[1]["sparse"][read], weights[0]["sparse"][read])


@pytest.mark.parametrize("enhancer,block", [(e, "pre_norm") for e in ENHANCERS.names()] + [("augru", "post_norm")])
def test_overfits_a_tiny_data_set(enhancer, block):
    """Eight fixed sequences: after training, each next item is the top recommendation."""
    torch.manual_seed(0)
    model = make(enhancer=enhancer, dropout=0.0, aux_loss_weight=0.0, block=block)
    seqs = torch.stack([torch.randperm(N)[:6] + 1 for _ in range(8)])
    data = {"items": seqs[:, :-1], "targets": seqs[:, 1:]}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = model(data)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ids, _ = top_k(model, interests(model, seqs[:, :-1]), 1)
    assert (ids[:, 0] == seqs[:, -1]).float().mean() >= 0.9


def vocabulary_of(model: InterestModel):
    """Raw ids i1..iN with the model's side features, for artifact tests."""
    import numpy as np

    from ray_rec.vocab import Vocabulary

    return Vocabulary(ids=[f"i{i}" for i in range(1, N + 1)], counts=np.ones(N, dtype=np.int64),
                      side_values={"cat": list("abcde")}, side_table=model.features.item_side[1:].numpy())


@pytest.mark.parametrize("block", BLOCKS)
def test_save_and_load_give_identical_scores(tmp_path, block):
    from ray_rec.model.artifact import save_model
    from ray_rec.predict import load_model
    from ray_rec.predict.inputs import window

    model = make(block=block).eval()
    vocab = vocabulary_of(model)
    version = save_model(model, vocab, str(tmp_path / "m"))
    rec = load_model(str(tmp_path / "m"))
    assert rec.version == version
    history, cands = [["i3", "i9", "i27"]], [["i1", "i2", "nope", "i40"]]
    items = window([rec.lookup(h)[0] for h in history], rec.config.history_len)
    expected = model.score(items, torch.tensor([[1, 2, 0, 40]]))
    got = rec.score(history, cands)
    assert got[0][2] is None
    assert [got[0][i] for i in (0, 1, 3)] == pytest.approx([float(expected[0, i]) for i in (0, 1, 3)], rel=1e-6)
    top = rec.recommend(history, k=5)
    assert len(top[0]) == 5 and not {"i3", "i9", "i27"} & {i for i, _ in top[0]}


def test_the_block_follows_the_tracker_and_a_model_saved_before_the_setting_loads_pre_norm(tmp_path):
    """Unset, ``model.block`` is post_norm for the attention trackers and pre_norm for the gru tracker
    (no blocks), and training records it; an artifact from before the setting (its config.json has no
    ``block``) was built pre-norm and loads so, with identical scores."""
    import json

    from ray_rec.model.artifact import save_model
    from ray_rec.predict import load_model
    from ray_rec.predict.inputs import window

    assert [ModelConfig(tracker=t).norm_block for t in ("transformer", "spectral", "gru")] == ["post_norm", "post_norm", "pre_norm"]
    assert ModelConfig().fit_to_history(9.0).block == "post_norm"
    assert ModelConfig(tracker="gru").fit_to_history(120.0).block == "pre_norm"
    model = make(block="pre_norm").eval()
    save_model(model, vocabulary_of(model), str(tmp_path / "m"))
    path = tmp_path / "m" / "config.json"
    meta = json.loads(path.read_text())
    del meta["model"]["block"]
    path.write_text(json.dumps(meta))
    rec = load_model(str(tmp_path / "m"))
    assert rec.config.norm_block == "pre_norm"
    items = window([rec.lookup(["i3", "i9", "i27"])[0]], rec.config.history_len)
    expected = model.score(items, torch.tensor([[1, 2, 40]]))[0].tolist()
    assert rec.score([["i3", "i9", "i27"]], [["i1", "i2", "i40"]])[0] == pytest.approx(expected, rel=1e-6)


def test_batches_of_ragged_requests_answer_as_one_at_a_time_and_exclude_every_seen_item(tmp_path):
    """The Python API and the serving batch pad many histories and candidate lists at once: each
    row's answer is the one it gets alone, and every seen item is excluded, not only the last
    history_len the model reads."""
    from ray_rec.model.artifact import save_model
    from ray_rec.predict import Query, load_model
    from ray_rec.predict.inputs import pad_rows

    assert pad_rows([[1, 2], [], [3]], left=True).tolist() == [[1, 2], [0, 0], [0, 3]]
    assert pad_rows([[1, 2], [], [3]]).tolist() == [[1, 2], [0, 0], [3, 0]]
    assert pad_rows([]).shape == (0, 1) and pad_rows([[]]).tolist() == [[0]]
    model = make().eval()
    with torch.no_grad():  # scores far apart, so float rounding between batch shapes never reorders near-ties
        model.features.item.weight[1:].normal_(0.0, 1.0)
    vocab = vocabulary_of(model)
    save_model(model, vocab, str(tmp_path / "m"))
    rec = load_model(str(tmp_path / "m"))
    long = [f"i{i}" for i in range(1, 21)]  # 20 clicks, the model reads the last 8
    histories = [long, ["i3"], ["i5", "nope", "i7"]]
    top = rec.recommend(histories, k=N)
    assert [len(t) for t in top] == [N - 20, N - 1, N - 2]
    assert not set(long) & {i for i, _ in top[0]}
    for got, alone in zip(top, (rec.recommend([h], k=N)[0] for h in histories)):  # same to float rounding
        assert [i for i, _ in got] == [i for i, _ in alone] and [s for _, s in got] == pytest.approx([s for _, s in alone], abs=1e-5)
    assert rec.recommend(histories, k=N, exclude_seen=False)[0][0][0] in {*long, *(f"i{i}" for i in range(21, N + 1))}
    cands = [["i1", "i40"], ["nope"], ["i2", "i3", "i4"]]
    scored = rec.score(histories, cands)
    assert [[s is None for s in row] for row in scored] == [[False, False], [True], [False, False, False]]
    assert scored[2] == pytest.approx(rec.score([histories[2]], [cands[2]])[0], abs=1e-5)
    index = [vocab.lookup(h)[0] for h in histories]
    queries = [Query(index[0], k=N), Query(index[1], candidates=[4, 0, 9]), Query(index[2], k=3, exclude=False),
               Query(index[0], candidates=[1]), Query(index[2], candidates=[4, 9], time_buckets=[1, 7]), Query([], k=2)]
    alone = [rec.predict([q])[0] for q in queries]
    together = rec.predict(queries)
    assert together[0].items == alone[0].items and len(together[0].scores) == N - 20
    assert not set(range(1, 21)) & set(together[0].items or [])
    assert together[1].scores[1] is None and together[1].scores == pytest.approx(alone[1].scores, abs=1e-5) and len(together[1].scores) == 3
    assert together[2].items == alone[2].items and len(together[2].scores) == 3
    assert together[3].scores == pytest.approx(alone[3].scores, abs=1e-5)
    assert together[4].scores == pytest.approx(alone[4].scores, abs=1e-5)  # click times, in a batch with requests that sent none
    assert together[4].scores != rec.predict([Query(index[2], candidates=[4, 9])])[0].scores
    assert together[4].scores == pytest.approx(rec.score([histories[2]], [["i4", "i9"]], timestamps=[[0, 30, 3600]])[0], rel=1e-5)
    assert [vocab.raw_id(i) for i in together[0].items or []] == [i for i, _ in top[0]]
    assert together[5].fallback == "popularity" and together[5].items == rec.popular_indices(2) and together[0].fallback is None


def test_histories_with_no_known_item_get_the_most_clicked_items(tmp_path):
    """An empty history, or one of ids the model never saw, gives the model nothing to read (its
    scores would all be 0, its top-k arbitrary): the Python API answers with the most clicked
    items, as the HTTP API does, and leaves the other rows of the batch to the model."""
    import numpy as np

    from ray_rec.model.artifact import save_model
    from ray_rec.predict import load_model

    model = make().eval()
    vocab = vocabulary_of(model)
    vocab.counts = np.arange(N, dtype=np.int64) % 7  # most clicked: i7, i14, i21, ... (count 6)
    save_model(model, vocab, str(tmp_path / "m"))
    rec = load_model(str(tmp_path / "m"))
    top = rec.recommend([[], ["nope", "never"], ["i3", "i9"]], k=4)
    assert top[0] == top[1] == [("i7", 6.0), ("i14", 6.0), ("i21", 6.0), ("i28", 6.0)]
    alone = rec.recommend([["i3", "i9"]], k=4)[0]  # same items; scores to float rounding (other batch shapes)
    assert [i for i, _ in top[2]] == [i for i, _ in alone] and not {"i3", "i9"} & {i for i, _ in top[2]}
    assert [s for _, s in top[2]] == pytest.approx([s for _, s in alone], rel=1e-5)
    assert rec.popular(N + 5)[-1][1] == 0.0 and len(rec.popular(N + 5)) == N
    for bad in (["i3", "i9"], "i3", [3, 9]):  # a flat list of ids, not one list per user
        with pytest.raises(TypeError, match=r"histories.*list.* of item ids"):
            rec.recommend(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"candidates\[0\] is str"):
        rec.score([["i3"]], ["i7"])  # type: ignore[list-item]
    assert rec.recommend(h for h in [["i3", "i9"]]) == rec.recommend([["i3", "i9"]])  # a generator is read once
    scored = rec.score([["nope"], ["i3", "i9"]], [["i7", "nope", "i8"], ["i7", "i8"]])
    assert scored[0] == [6.0, None, 0.0] and scored[1] == pytest.approx(rec.score([["i3", "i9"]], [["i7", "i8"]])[0], rel=1e-5)


def test_many_histories_in_blocks_answer_as_in_one(tmp_path, monkeypatch):
    """`recommend` and `score` split a long list of histories into blocks (of rows, and of catalog
    scores): the answers are those of one block."""
    from ray_rec.model.artifact import save_model
    from ray_rec.predict import load_model, ranking

    model = make().eval()
    save_model(model, vocabulary_of(model), str(tmp_path / "m"))
    rec = load_model(str(tmp_path / "m"))
    histories = [[f"i{(7 * u + j) % N + 1}" for j in range(u % 5)] for u in range(23)]  # some empty
    cands = [[f"i{(3 * u) % N + 1}", "nope"] for u in range(23)]
    whole = rec.recommend(histories, k=5), rec.score(histories, cands)
    monkeypatch.setattr(ranking, "BLOCK_ROWS", 4)
    monkeypatch.setattr(ranking, "BLOCK_CELLS", 3 * (N + 1))  # 3 histories a block: the catalog bound wins
    blocks = rec.recommend(histories, k=5), rec.score(histories, cands)
    assert [[i for i, _ in row] for row in blocks[0]] == [[i for i, _ in row] for row in whole[0]]
    assert [s for row in blocks[0] for _, s in row] == pytest.approx([s for row in whole[0] for _, s in row], rel=1e-5)
    assert [row[1] for row in blocks[1]] == [row[1] for row in whole[1]] == [None] * 23
    assert [row[0] for row in blocks[1]] == pytest.approx([row[0] for row in whole[1]], rel=1e-5, abs=1e-6)


def test_click_times_reach_the_model_as_training_buckets_them(tmp_path):
    """`recommend` / `score` take optional click times: each known item gets the bucket training
    gives it (from the gap to the previous click, unknown items included; the first click: 1)."""
    from ray_rec.data.examples import time_buckets
    from ray_rec.model.artifact import save_model
    from ray_rec.predict import load_model, ranking

    model = make().eval()
    assert model.features.time is not None
    save_model(model, vocabulary_of(model), str(tmp_path / "m"))
    rec = load_model(str(tmp_path / "m"))
    history, stamps = ["i3", "nope", "i9", "i27"], [1_700_000_000, 1_700_000_030, 1_700_003_600, 1_700_090_000]
    deltas = np.array([-1, 30, 3570, 86400], dtype=np.float64)
    buckets = [int(b) for i, b in enumerate(time_buckets(deltas, model.config.time_buckets)) if i != 1]
    assert buckets == [1, 7, 12] and rec.lookup(history, stamps)[2] == buckets
    items, tb = torch.tensor([[3, 9, 27]]), torch.tensor([buckets])
    want_ids, want_scores = ranking.top_k(model, ranking.interests(model, items, tb), 5, exclude=items)
    got = rec.recommend([history], k=5, timestamps=[stamps])[0]
    assert [i for i, _ in got] == [f"i{i}" for i in want_ids[0].tolist()]
    assert [s for _, s in got] == pytest.approx(want_scores[0].tolist(), rel=1e-5)
    assert rec.recommend([history], k=5, timestamps=[[t * 1000 for t in stamps]]) == [got]  # milliseconds
    assert [s for _, s in rec.recommend([history], k=5)[0]] != [s for _, s in got]  # without: every gap unknown
    scored = rec.score([history, history], [["i1", "i2"], ["i1", "i2"]], timestamps=[stamps, stamps])
    assert scored[0] == pytest.approx(model.score(items, torch.tensor([[1, 2]]), tb)[0].tolist(), rel=1e-5)
    for bad, message in [([stamps[:3]], r"timestamps\[0\] has 3 values for 4 history items"),
                         ([stamps[::-1]], r"timestamps\[0\] must be oldest first"),
                         ([[1.0, float("nan"), 2.0, 3.0]], r"timestamps\[0\] holds a value that is not a finite number"),
                         ([stamps, stamps], r"1 histories but 2 timestamp lists"),
                         ([["2024-01-01", 1.0, 2.0, 3.0]], r"timestamps\[0\] must be numbers")]:
        with pytest.raises(ValueError, match=message):
            rec.recommend([history], timestamps=bad)


def test_model_metrics_and_loader_import_without_ray():
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import ray_rec, ray_rec.model, ray_rec.metrics, ray_rec.data.examples, ray_rec.model.artifact, ray_rec.predict.recommender\n"
        "from ray_rec.data.examples import collate\n"
        "from ray_rec import load_model\n"
        "assert 'boto3' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.tracker='lstm'"):
        ModelConfig(tracker="lstm")
    with pytest.raises(ValueError, match="model.dim=30 must be divisible by model.heads=4"):
        ModelConfig(dim=30, heads=4)


def test_history_length_dropout_and_tracker_depth_follow_the_data_unless_set():
    from ray_rec.config import for_data
    from ray_rec.model.loss_policy import FULL_SOFTMAX_MAX_CELLS

    from .conftest import make_manifest

    def manifest(users: int, clicks: int):
        return make_manifest(users=users, items=1000, clicks=clicks)

    short = for_data(ModelConfig(), manifest(100, 900))  # 9 clicks per user, like Amazon Beauty
    long = for_data(ModelConfig(), manifest(100, 16500))  # 165, like MovieLens-1M
    longer = for_data(ModelConfig(), manifest(100, 50000))  # 500
    assert (short.max_len, short.dropout, short.tracker_layers, short.examples) == (50, 0.5, 1, "prefixes")
    assert (long.max_len, long.dropout, long.tracker_layers, long.examples) == (80, 0.2, 2, "prefixes")  # the window: half the clicks
    assert longer.max_len == 200  # at most
    mine = for_data(ModelConfig(max_len=80, dropout=0.3, tracker_layers=3, examples="prefixes"), manifest(100, 16500))
    assert (mine.max_len, mine.dropout, mine.tracker_layers, mine.examples) == (80, 0.3, 3, "prefixes")
    unset = ModelConfig(num_items=N)  # built without a data set: the short-history values
    assert (unset.history_len, unset.dropout_p, unset.layers, unset.example_kind) == (50, 0.5, 1, "prefixes")
    # A step's batch follows the examples unless set: one target a prefix, up to L a window.
    windows = for_data(ModelConfig(examples="windows"), manifest(100, 16500))
    assert (TrainConfig().batch_for(short), TrainConfig().batch_for(windows), TrainConfig(batch_size=64).batch_for(short)) == (256, 128, 64)
    with pytest.raises(ValueError, match="model.examples='all'"):
        ModelConfig(examples="all")
    assert InterestModel(unset).features.position.num_embeddings == 50
    assert len(InterestModel(unset).tracker.blocks) == 1
    assert len(InterestModel(long).tracker.blocks) == 2
    assert long.block == "post_norm"  # filled from the tracker, so the artifact records it
    assert InterestModel(dataclasses.replace(long, tracker="gru", block="pre_norm")).tracker.gru.num_layers == 2
    # Full cross-entropy's logits grow with catalog x history length: a longer history moves the switch.
    assert ModelConfig(num_items=FULL_SOFTMAX_MAX_CELLS // 50, max_len=50).resolved_loss == "ce"
    assert ModelConfig(num_items=FULL_SOFTMAX_MAX_CELLS // 50, max_len=200).resolved_loss == "sampled_softmax"


def test_long_histories_get_sasrecs_long_settings_and_a_window_of_half_their_clicks(tmp_path):
    from ray_rec.config import load_config
    from ray_rec.data.prepare import PrepareOptions, prepare
    from ray_rec.train.local import train_local

    g = torch.Generator().manual_seed(0)
    lines = [" ".join(str(int(i)) for i in [u, *torch.randint(1, 30, (60,), generator=g)]) for u in range(1, 41)]
    (tmp_path / "long.txt").write_text("\n".join(lines) + "\n")
    prepare(PrepareOptions(input=str(tmp_path / "long.txt"), output=str(tmp_path / "data"), format="seqtxt", num_shards=1))
    said: list[str] = []
    run = train_local(str(tmp_path / "data"), load_config(None, {"model.dim": 8, "train.epochs": 2}), log=said.append)
    # ~55 clicks a user: long (dropout 0.2, two layers), a window of 50 (half of 55, at least 50)
    assert (run.model.config.max_len, run.model.config.dropout, run.model.config.layers) == (50, 0.2, 2)
    assert run.model.features.position.num_embeddings == 50
    # one example per next click: 40 users x 57 training targets, 256 a step
    assert run.history[0]["lr"] == 0.001 and run.history[0]["steps"] == 9 and run.model.config.examples == "prefixes"
    # The final fit: the returned model was trained again on every click for the best epoch count
    assert run.final_fit and sum(line.startswith("final fit epoch ") for line in said) == run.best_epoch >= 1
    assert run.test["count"] == 40  # the split run's test figures


def test_the_final_fit_reads_whole_sequences_and_skips_time_splits():
    from ray_rec.train.schedule import final_fit_line, final_fit_split

    from .conftest import make_manifest

    assert final_fit_split(make_manifest()) == "test"
    assert final_fit_split(make_manifest(protocol="time")) is None
    assert final_fit_line(3, None).startswith("final fit: skipped, the data set was split by time")
    assert "for 3 epochs at the split run's learning rates" in final_fit_line(3, "test")


def test_catalog_features_are_reused_in_inference_until_the_weights_change():
    model = make().eval()  # with a side feature, so the catalog table is computed, not the raw embedding
    items = batch()["items"]
    with torch.inference_mode():
        first = model.score_catalog(items)
        assert torch.equal(model.score_catalog(items), first)
    with torch.no_grad():
        model.features.side["cat"].weight.add_(0.5)  # what an optimizer step or a reload does
    with torch.inference_mode():
        changed = model.score_catalog(items)
    fresh = make().eval()
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        assert torch.allclose(changed, fresh.score_catalog(items))
    assert not torch.allclose(changed[:, 1:], first[:, 1:])
    without_side = InterestModel(ModelConfig(num_items=N, dim=16, heads=2, max_len=8)).eval()
    assert without_side.features.all_item_features() is without_side.features.item.weight  # no copy


def test_the_factorised_mlp_relevance_is_the_plain_mlp_on_the_pair(monkeypatch):
    from ray_rec.model import relevance

    torch.manual_seed(0)
    rel = RELEVANCES.build("mlp", ModelConfig(num_items=50, dim=8, dropout=0.0)).eval()
    u, v, items = torch.randn(3, 5, 8), torch.randn(3, 5, 7, 8), torch.randn(50, 8)

    def plain(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        u = u.unsqueeze(-2).expand_as(v)
        return (u * v).sum(-1) + rel.mlp(torch.cat([u, v, u * v, u - v], -1)).squeeze(-1)

    torch.testing.assert_close(rel(u, v), plain(u, v))
    users = u.reshape(15, 8)
    want = plain(users, items.expand(15, -1, -1))
    torch.testing.assert_close(rel.catalog(users, items), want)
    many = torch.randn(300, 8)
    want_many = plain(users, many.expand(15, -1, -1))
    monkeypatch.setattr(relevance, "_BLOCK_FLOATS", 7 * 16 * 128)  # blocks of 7 users x 128 items, the last ones short
    torch.testing.assert_close(rel.catalog(users, many), want_many)
    monkeypatch.setattr(relevance, "_BLOCK_FLOATS", 1)  # one user at a time
    torch.testing.assert_close(rel.catalog(users, many), want_many)
    assert rel.catalog(users[:0], many).shape == (0, 300)  # no users: no blocks, an empty table


def test_the_mlp_catalog_recomputed_in_backward_gives_the_same_gradients(monkeypatch):
    """In training (dropout on) the checkpointed blocks of users draw no new masks when they are
    recomputed: loss and gradients equal those of the catalog kept whole."""
    from ray_rec.model import relevance

    monkeypatch.setattr(relevance, "_BLOCK_FLOATS", 4 * 32 * 128)  # blocks of 4 users x 128 items
    rel = RELEVANCES.build("mlp", ModelConfig(num_items=300, dim=16, dropout=0.5)).train()
    u, items = torch.randn(10, 16, requires_grad=True), torch.randn(300, 16, requires_grad=True)
    grads = []
    for keep in (0, 1 << 30):  # too large to keep: recomputed; then kept whole
        monkeypatch.setattr(relevance, "_KEEP_FLOATS", keep)
        torch.manual_seed(1)  # the same dropout masks in both runs
        rel.zero_grad()
        u.grad = items.grad = None
        loss = rel.catalog(u, items).logsumexp(-1).sum()
        loss.backward()
        grads.append([loss.detach(), u.grad, items.grad, *(p.grad for p in rel.parameters())])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_the_augru_step_is_dien_s_attentional_update_gate():
    """The gru_cell + lerp step computes DIEN's AUGRU, written out gate by gate."""
    torch.manual_seed(0)
    enh = ENHANCERS.build("augru", ModelConfig(num_items=N, dim=8, dropout=0.0)).eval()
    states = torch.randn(3, 6, 8)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[0, :2] = False
    states = states * valid.unsqueeze(-1)
    shifts = consecutive_differences(states, valid)
    a = torch.sigmoid(enh.attention(torch.cat([states, shifts, states * (states - shifts)], -1))) * valid.unsqueeze(-1)
    (w_r, w_z, w_n), (b_r, b_z, b_n) = enh.input_gates.weight.chunk(3), enh.input_gates.bias.chunk(3)
    (u_r, u_z, u_n), (c_r, c_z, c_n) = enh.hidden_gates.weight.chunk(3), enh.hidden_gates.bias.chunk(3)
    e, evolved = torch.zeros(3, 8), []
    for t in range(6):
        x = states[:, t]
        r = torch.sigmoid(x @ w_r.T + b_r + e @ u_r.T + c_r)
        z = torch.sigmoid(x @ w_z.T + b_z + e @ u_z.T + c_z) * a[:, t]  # attention scales the update gate
        n = torch.tanh(x @ w_n.T + b_n + r * (e @ u_n.T + c_n))
        e = (1 - z) * e + z * n
        evolved.append(e)
    want = enh.norm(states + torch.stack(evolved, 1)) * valid.unsqueeze(-1)
    with torch.no_grad():
        torch.testing.assert_close(enh(states, valid), want)


def test_sampled_softmax_estimates_the_full_softmax():
    """With the logQ correction, K uniform negatives stand for the whole catalog of N items."""
    from ray_rec.model.losses import full_softmax_loss, sampled_softmax_loss

    n, k = 5000, 50
    targets = torch.tensor([1, 2])
    # Every item scores the same: the full softmax's loss is log(N); uncorrected, K negatives give log(1 + K).
    full = full_softmax_loss(torch.zeros(2, 1), torch.zeros(n, 1), targets, dot)
    neg_ids = torch.arange(10, 10 + k)
    sampled = sampled_softmax_loss(torch.zeros(2), torch.zeros(2, k), neg_ids, targets, torch.full((k,), k / n))
    assert full.item() == pytest.approx(torch.log(torch.tensor(float(n))).item())
    assert sampled.item() == pytest.approx(full.item(), abs=1e-3)  # log(1 + N) against log(N)
    # Drawing every item once is the full softmax (the target itself is masked out of the negatives).
    u, items = torch.randn(2, 8), torch.randn(n, 8)
    scores = dot(u, items)
    pos = scores.gather(1, (targets - 1).unsqueeze(1)).squeeze(1)
    every = sampled_softmax_loss(pos, scores, torch.arange(1, n + 1), targets, torch.ones(n))
    assert every.item() == pytest.approx(full_softmax_loss(u, items, targets, dot).item(), rel=1e-5)


def test_sampled_softmax_is_the_cross_entropy_of_the_corrected_scores_and_stays_finite_when_all_are_masked():
    """The loss is written out rather than taken from F.cross_entropy on [pos, neg], and over dot
    products fused (gradients computed in the forward pass): the same value and gradients, masks
    included, and no NaN where every negative of a position is masked (a catalog of one item draws
    only the target)."""
    from ray_rec.model.losses import sampled_dot_softmax_loss, sampled_softmax_loss

    g = torch.Generator().manual_seed(0)
    u, items, pos = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g), torch.randn(6, generator=g) * 5
    neg_ids, targets = torch.randint(1, 5, (9,), generator=g), torch.randint(1, 5, (6,), generator=g)
    expected, blocked = torch.rand(9, generator=g) + 0.1, torch.rand(6, 4, generator=g) > 0.5  # blocks among the last 4
    leaves = [u.requires_grad_(), items.requires_grad_(), pos.requires_grad_()]
    every_column = torch.cat([torch.zeros(6, 5, dtype=torch.bool), blocked], 1)
    logits = (u @ items.T - torch.log(expected)).masked_fill((neg_ids == targets.unsqueeze(1)) | every_column, float("-inf"))
    want = torch.nn.functional.cross_entropy(torch.cat([pos.unsqueeze(1), logits], 1), torch.zeros(6, dtype=torch.long))
    want_grads = torch.autograd.grad(want, leaves)
    for got in (sampled_softmax_loss(pos, u @ items.T, neg_ids, targets, expected, blocked),
                sampled_dot_softmax_loss(u, pos, items, neg_ids, targets, expected, blocked)):
        torch.testing.assert_close(got, want)
        for a, b in zip(torch.autograd.grad(got, leaves), want_grads, strict=True):
            torch.testing.assert_close(a, b)
    one_item = torch.ones(9, dtype=torch.long), torch.ones(6, dtype=torch.long)
    for one in (sampled_softmax_loss(pos, u @ items.T, *one_item, expected), sampled_dot_softmax_loss(u, pos, items, *one_item, expected)):
        assert one.item() == 0.0 and all(torch.isfinite(x).all() for x in torch.autograd.grad(one, leaves))
    assert sampled_dot_softmax_loss(u[:0], pos[:0], items, neg_ids, targets[:0], expected).item() == 0.0  # no next click


def test_in_batch_negatives_are_corrected_by_their_share_of_clicks():
    """Uniform draws plus the batch's next clicks, each negative weighted by 1 / its expected draws:
    on a long-tailed catalog the sampled partition function estimates the full one (the uniform
    draws alone, as many of them, miss the head where most of the mass is)."""
    from ray_rec.model.losses import uniform_and_in_batch, uniform_negatives

    torch.manual_seed(0)
    n, k, p = 20_000, 64, 512
    share = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.1  # Zipf-like clicks; index 1 the most clicked
    share /= share.sum()
    counts = torch.cat([torch.zeros(1, dtype=torch.float64), share * 1e7])  # (N + 1,): a long training run's counts
    logits = torch.cat([torch.zeros(1), 3.0 - torch.arange(1, n + 1).double().log()])  # popular items score high
    z = logits[1:].exp().sum()  # the full partition function

    def estimate(ids: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
        return (logits[ids].exp() / expected).sum()

    mixed, uniform = [], []
    for _ in range(200):
        targets = torch.multinomial(share, p, replacement=True) + 1  # the batch's next clicks
        ids, expected, source = uniform_and_in_batch(n, k, targets, counts, max_in_batch=p)
        assert bool((source == torch.arange(p)).all())
        assert ids.shape == expected.shape == (k + p,) and bool((ids[k:] == targets).all())
        torch.testing.assert_close(expected[k:], (k / n + p * (counts[targets] + 1) / (counts.sum() + n)).float())
        mixed.append(estimate(ids, expected))
        ids, expected = uniform_negatives(n, k + p)
        uniform.append(estimate(ids, expected))
    mixed_t, uniform_t = torch.stack(mixed), torch.stack(uniform)
    assert abs(mixed_t.mean() / z - 1) < 0.01  # unbiased on average (measured: within 0.0002 over 3 seeds)
    # and steady per step: median error 0.6% against 31% for uniform draws alone (3 seeds)
    assert (mixed_t / z - 1).abs().median() < 0.05 < (uniform_t / z - 1).abs().median()
    # Past max_in_batch, a random subset of the next clicks; the correction counts the subset.
    targets = torch.randint(1, n + 1, (5000,))
    ids, expected, source = uniform_and_in_batch(n, k, targets, counts, max_in_batch=100)
    assert ids.shape == (k + 100,) and len(set(source.tolist())) == 100 and bool((ids[k:] == targets[source]).all())
    torch.testing.assert_close(expected[:k], (k / n + 100 * (counts[ids[:k]] + 1) / (counts.sum() + n)).float())


def test_the_model_counts_next_clicks_in_training_only_and_keeps_them_out_of_its_state(monkeypatch):
    model = make(loss="sampled_softmax")
    assert model.in_batch and model.config.mixes_in_batch and "+ up to 2048 of the batch's next clicks" in model.config.loss_text()
    data = batch(negatives=False)
    model.train()
    model(data)["loss"].backward()
    counts = model.clicks_so_far(torch.device("cpu"))
    want = torch.bincount(data["targets"][data["targets"] > 0], minlength=N + 1).double()
    torch.testing.assert_close(counts, want)
    model.eval()
    with torch.no_grad():
        model(data)
    torch.testing.assert_close(model.clicks_so_far(torch.device("cpu")), want)  # evaluation does not count
    assert not any("click" in name for name in model.state_dict())
    # A position's in-batch negatives leave out its own window's next clicks (its user's own clicks).
    seen: dict[str, torch.Tensor] = {}
    real = DotRelevance.sampled_softmax_loss

    def spy(self, u, pos, items, neg_ids, targets, expected, blocked):
        seen.update(neg_ids=neg_ids, targets=targets, blocked=blocked)
        return real(self, u, pos, items, neg_ids, targets, expected, blocked)

    monkeypatch.setattr(DotRelevance, "sampled_softmax_loss", spy)
    model(data)
    has = data["targets"] > 0
    rows, k = has.nonzero(as_tuple=True)[0], len(seen["neg_ids"]) - int(has.sum())
    assert k == 8 and bool((seen["neg_ids"][k:] == data["targets"][has]).all())  # all P next clicks, in order
    # The mask covers the in-batch draws alone (the last P negatives): the uniform ones need none.
    assert seen["blocked"].shape == (len(rows), len(rows))
    assert bool((seen["blocked"] == (rows.unsqueeze(1) == rows.unsqueeze(0))).all())
    off = make(loss="sampled_softmax", in_batch_negatives=False)
    assert not off.in_batch and off.config.loss_text() == "sampled_softmax (8 negatives)"
    assert not make(loss="ce").in_batch and not make(relevance="mlp", loss="sampled_softmax").config.mixes_in_batch


def dot(u: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    return u @ items.T


@pytest.mark.parametrize("relevance", ["dot", "mlp"])
def test_full_softmax_in_chunks_gives_the_same_loss_and_gradients(relevance):
    """A batch whose logits pass the memory bound goes in chunks, with the same loss and gradients."""
    from ray_rec.model.losses import full_softmax_loss

    torch.manual_seed(0)
    scorer = RELEVANCES.build(relevance, ModelConfig(num_items=300, dim=8, dropout=0.0))
    u, items = torch.randn(37, 8, requires_grad=True), torch.randn(300, 8, requires_grad=True)
    targets = torch.randint(1, 301, (37,))
    params = [u, items, *scorer.parameters()]
    want = torch.nn.functional.cross_entropy(scorer.catalog(u, items), targets - 1)  # autograd, logits whole
    want_grads = torch.autograd.grad(want, params)
    catalog = None if relevance == "dot" else scorer.catalog  # None: the dot product's fused path
    for max_cells in (37 * 300, 10 * 300, 1):  # one chunk; chunks of 10 positions (the last one 7); one row each
        loss = full_softmax_loss(u, items, targets, catalog, max_cells=max_cells)
        torch.testing.assert_close(loss, want)
        for got, expected in zip(torch.autograd.grad(loss, params), want_grads, strict=True):
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("catalog_cells", ["small", "large"])
def test_the_mlp_relevance_also_trains_its_dot_term(monkeypatch, catalog_cells):
    """MLP relevance under sampled softmax adds the dot term's own softmax: over the whole catalog
    while `auto` would give the dot model the full softmax, else over 2048 shared negatives."""
    from ray_rec.model import loss_policy
    from ray_rec.model.losses import full_softmax_loss, sampled_softmax_loss

    if catalog_cells == "large":
        monkeypatch.setattr(loss_policy, "FULL_SOFTMAX_MAX_CELLS", N * 8 - 1)
    model = make(relevance="mlp", in_batch_negatives=False).eval()  # eval: no dropout draws
    dot_model = make(relevance="dot", loss="sampled_softmax")
    assert model.dot_term is not None and dot_model.dot_term is None
    assert make(relevance="mlp", loss="bce").dot_term is None
    data = batch(negatives=False)
    torch.manual_seed(5)
    got = model(data)["main"]
    torch.manual_seed(5)  # the same draws, written out
    _, interest = model.encode(data["items"], data["time_buckets"])
    has = data["targets"] > 0
    u, tgt = interest[has], data["targets"][has]
    feats = model.features.all_item_features()
    neg_ids = torch.randint(1, N + 1, (8,))
    pos = model.relevance(u, feats[tgt].unsqueeze(1)).squeeze(1)
    want = sampled_softmax_loss(pos, model.relevance.catalog(u, feats[neg_ids]), neg_ids, tgt, torch.full((8,), 8 / N))
    if catalog_cells == "small":
        dot_term = full_softmax_loss(u, feats[1:], tgt)
    else:
        dot_ids = torch.randint(1, N + 1, (2048,))
        dot_term = sampled_softmax_loss((u * feats[tgt]).sum(-1), u @ feats[dot_ids].T, dot_ids, tgt, torch.full((2048,), 2048 / N))
    torch.testing.assert_close(got, want + dot_term)


def test_docstring_examples_run():
    """Every `>>>` example in the package's docstrings (found by scanning, so new ones count too)."""
    import doctest
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    files = sorted(p for p in (root / "ray_rec").rglob("*.py") if ">>>" in p.read_text())
    assert len(files) >= 5
    for path in files:
        module = importlib.import_module(".".join(path.relative_to(root).with_suffix("").parts))
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, f"{path.name}: {result.failed} of {result.attempted} examples failed"
        runnable = any(">>>" in line and "doctest: +SKIP" not in line for line in path.read_text().splitlines())
        assert result.attempted > 0 or not runnable, f"{path.name}: examples found but none ran"
