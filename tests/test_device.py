"""Device placement: every path that feeds the model (training steps, validation, evaluation,
`recommend`/`score`, the Serve batch) moves its tensors to the model's device.

Without a GPU, the model runs on `tests.placement`'s stand-in device, where a tensor left on the
host fails as it would on CUDA. The ``gpu`` tests run the same paths on a real GPU when there is one
(`bench/gpu_check.sh`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_rec.config import ModelConfig, load_config
from ray_rec.device import DeviceError, resolve_device, to_device
from ray_rec.model.interest_model import InterestModel
from ray_rec.predict.ranking import evaluate
from ray_rec.predict.recommender import Recommender, load_model
from ray_rec.train.fit import train_step
from ray_rec.train.local import train_local
from ray_rec.train.optim import make_optimizer
from ray_rec.vocab import Vocabulary
from tests.conftest import tiny_artifact
from tests.placement import DEVICE, Misplaced, OnDevice, OtherDevice


def gpu(test: Callable[..., None]) -> Callable[..., None]:
    """A test that needs a CUDA GPU (``-m gpu``; bench/gpu_check.sh runs them on one)."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs these)")
    return pytest.mark.gpu(skip(test))  # type: ignore[no-any-return]

# Every network, loss and input the model can read: full and sampled softmax (uniform, in-batch),
# BCE with browsed negatives, the auxiliary loss, both relevance networks, times and side features.
VARIANTS = {
    "default": {},
    "sampled-in-batch": {"model.loss": "sampled_softmax", "model.num_negatives": 16, "model.in_batch_negatives": True},
    "bce-browsed-aux-gru": {"model.loss": "bce", "model.aux_loss_weight": 0.5, "model.tracker": "gru",
                            "model.enhancer": "augru"},
    "mlp": {"model.relevance": "mlp", "model.tracker_layers": 2},
}


def _config(overrides: dict[str, object]) -> object:
    return load_config(None, {"model.dim": 16, "train.epochs": 2, "train.batch_size": 32, "train.eval_batch_size": 64,
                              "train.final_fit": True, **overrides})


def test_the_stand_in_device_fails_where_cuda_would() -> None:
    """The check itself: a host tensor fed to a model on the device fails; moved, it runs."""
    with OtherDevice():
        model = InterestModel(ModelConfig(num_items=30, dim=8)).to(DEVICE)
        history = torch.tensor([[0, 3, 7], [1, 2, 4]])
        with pytest.raises(Misplaced):
            model.user_interest(history)
        with pytest.raises(Misplaced):  # a host random generator drawing on the device
            torch.randint(0, 5, (3,), generator=torch.Generator(), device=DEVICE)
        u = model.user_interest(to_device({"h": history}, DEVICE)["h"])
        assert isinstance(u, OnDevice) and u.shape == (2, 8) and torch.isfinite(u.cpu()).all()
        with pytest.raises(TypeError):  # as on a GPU: no numpy view of device memory
            u.numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_validation_and_the_final_fit_keep_every_tensor_on_the_model_device(tiny_data: str, variant: str) -> None:
    """`train_local` on the device runs training steps, validation, the test evaluation and the
    final fit: every batch, mask, index, buffer and optimizer state on the model's device."""
    with OtherDevice():
        run = train_local(tiny_data, _config(VARIANTS[variant]), device=DEVICE)
        assert run.final_fit and len(run.history) == 2
        assert {p.device for p in run.model.parameters()} | {b.device for b in run.model.buffers()} == {DEVICE}
        assert np.isfinite([r["loss"] for r in run.history]).all() and 0 <= run.test["NDCG@10"] <= 1
        sampled = evaluate(run.model, [{k: torch.as_tensor(v) for k, v in b.items()} for b in _eval_batches(tiny_data, run)],
                           sampled_negatives=5)[1]
        assert sampled is not None and sampled.result()["count"] > 0


def _eval_batches(data: str, run: object) -> list[dict[str, np.ndarray]]:
    from ray_rec.data.local import InMemoryExamples

    model = run.model  # type: ignore[attr-defined]
    examples = InMemoryExamples.evaluation(data, "valid", model.config.history_len, model.config.time_buckets)
    return [{k: v.numpy() for k, v in b.items()} for b in examples.batches(64)]


def test_a_training_step_on_the_device_gives_the_host_step_s_loss() -> None:
    """Same model, same batch: the step on the device computes what the host computes."""
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=40, dim=8, loss="ce")
    host = InterestModel(cfg)
    with OtherDevice():
        device = InterestModel(cfg)
        device.load_state_dict(host.state_dict())
        device.to(DEVICE)
        batch = {"items": torch.tensor([[0, 3, 7, 9], [1, 2, 3, 4]]), "targets": torch.tensor([[3, 7, 9, 5], [2, 3, 4, 6]])}
        host.eval(), device.eval()  # no dropout: the two must agree
        on_device = float(device(to_device(batch, DEVICE))["loss"].detach())
    assert on_device == pytest.approx(float(host(batch)["loss"].detach()), rel=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_training_runs_every_network_and_loss_with_the_fp32_loss(variant: str) -> None:
    """``train.precision=bf16`` (autocast) on the CPU: every network and loss takes it, and the
    loss (its softmax over the catalog in fp32) stays near the fp32 one."""
    cfg = _config(VARIANTS[variant]).model  # type: ignore[attr-defined]
    torch.manual_seed(0)
    model = InterestModel(ModelConfig(**{**cfg.__dict__, "num_items": 60, "max_len": 8, "dropout": 0.0})).eval()
    rng = np.random.default_rng(0)
    items = torch.as_tensor(rng.integers(1, 61, (16, 8)))
    batch = {"items": items, "targets": torch.roll(items, -1, 1), "negatives": torch.as_tensor(rng.integers(0, 61, (16, 8, 3)))}
    torch.manual_seed(1)
    full = float(model(batch)["loss"].detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        half = model(batch)["loss"]
    assert half.dtype == torch.float32 and float(half.detach()) == pytest.approx(full, rel=0.05)
    optimizer = make_optimizer(model, load_config(None, {}).train)
    assert np.isfinite(train_step(model, batch, optimizer, 1.0, precision="bf16")["loss"])


def _recommender(artifact: str, device: torch.device | str) -> Recommender:
    loaded = load_model(artifact, device="cpu")
    return Recommender(loaded.model, loaded.vocab, loaded.meta, loaded.uri, device)


def test_recommend_and_score_run_on_the_model_device_and_answer_as_on_the_host(tmp_path: Path) -> None:
    histories = [["i1", "i2", "i3"], ["i4"], ["i5", "i9", "unknown"]]
    stamps = [[1.0e9, 1.0e9 + 60, 1.0e9 + 3600], [1.0e9], [1.0e9, 1.0e9 + 5, 1.0e9 + 9]]
    artifact = tiny_artifact(tmp_path)
    host = _recommender(artifact, "cpu")
    expected = host.recommend(histories, k=5, timestamps=stamps), host.score(histories, [["i7", "i8"], ["x"], ["i1"]])
    with OtherDevice():
        rec = _recommender(artifact, DEVICE)
        assert rec.device == DEVICE and isinstance(rec.model.features.item.weight, OnDevice)
        top = rec.recommend(histories, k=5, timestamps=stamps)
        scores = rec.score(histories, [["i7", "i8"], ["x"], ["i1"]])
    assert [[i for i, _ in row] for row in top] == [[i for i, _ in row] for row in expected[0]]
    assert np.allclose([s for _, s in sum(top, [])], [s for _, s in sum(expected[0], [])], atol=1e-5)
    assert scores[1] == [None] and np.allclose(scores[0] + scores[2], expected[1][0] + expected[1][2], atol=1e-5)


def test_the_serve_batch_answers_mixed_requests_on_the_model_device(tmp_path: Path) -> None:
    """The replica's batched call (`RecommenderService._answer_all`, the body of its Serve batch):
    scoring, recommending and by-user-id requests of one batch, across a hot reload's two models
    (one on the device, one on the host), each answered by its own."""
    pytest.importorskip("ray")  # a GPU machine without Ray runs the rest of this file
    from ray_rec.serve.app import Ask, RecommenderService
    from ray_rec.serve.schemas import RecommendRequest, ScoreRequest, ServeArgs
    from ray_rec.serve.state import Event, MemoryStore

    cls = RecommenderService.func_or_class  # Serve's queue needs a replica around `_batched`
    artifact = tiny_artifact(tmp_path)
    service = cls.__new__(cls)
    service.args, service.store = ServeArgs(model_uri=artifact), MemoryStore(10)
    asyncio.run(service.store.append([Event("u", "i7", 1.0), Event("u", "i8", 2.0)]))
    bodies = [(RecommendRequest(history=["i1", "i2", "i3"], k=4), {"k": 4, "exclude": True}),
              (ScoreRequest(history=["i4"], candidates=["i5", "i6", "nope"]), {"candidates": [5, 6, 0]}),
              (RecommendRequest(user_id="u", k=2, exclude_history=False), {"k": 2, "exclude": False})]
    with OtherDevice():
        on_device, on_host = _recommender(artifact, DEVICE), _recommender(artifact, "cpu")
        asks = [Ask(body, on_device, {**fields, "explain": 0}) for body, fields in bodies]
        replies = asyncio.run(cls._answer_all(service, [*asks, Ask(bodies[0][0], on_host, {**bodies[0][1], "explain": 0})]))
    answers = [r.answer for r in replies]
    assert [len(a.items) for a in (answers[0], answers[2])] == [4, 2] and replies[2].history == ["i7", "i8"]
    assert answers[1].scores[2] is None and all(isinstance(s, float) for s in answers[1].scores[:2])
    assert not set(answers[0].items) & {1, 2, 3} and answers[3].items == answers[0].items
    assert np.allclose(answers[3].scores, answers[0].scores, atol=1e-5)


def test_evaluate_and_batch_score_actors_rank_on_their_model_device(tiny_data: str, tmp_path: Path) -> None:
    """`ray-rec evaluate`'s and `ray-rec batch-score`'s scoring actors (called here in-process),
    their model on the device: the same ranks and top-k as on the host."""
    pytest.importorskip("ray")
    from ray_rec.data.local import read_split
    from ray_rec.model.artifact import save_model
    from ray_rec.predict.batch_score import TopK
    from ray_rec.predict.evaluate import RankUsers

    run = train_local(tiny_data, _config({"train.epochs": 1, "train.final_fit": False}), evaluate_test=False)
    save_model(run.model, Vocabulary.load(tiny_data), str(tmp_path / "model"))
    table = read_split(tiny_data, "test")
    popularity = np.arange(run.model.config.num_items + 1, dtype=np.float64)  # any scores: host and device must agree
    rank, top = RankUsers(str(tmp_path / "model"), popularity, seed=0), TopK(str(tmp_path / "model"), k=5)
    expected = rank(table), top(table)
    with OtherDevice():
        for actor in (rank, top):
            actor.rec = Recommender(actor.rec.model, actor.rec.vocab, actor.rec.meta, actor.rec.uri, DEVICE)
        ranks, tops = rank(table), top(table)
    assert all(np.array_equal(ranks[k], expected[0][k]) for k in ("full", "sampled", "popularity"))
    assert tops.column("items").to_pylist() == expected[1].column("items").to_pylist()


def test_devices_are_named_clearly(tmp_path: Path) -> None:
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(DeviceError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="sees no GPU"):
            load_model(tiny_artifact(tmp_path), device="cuda:0")


def test_checkpoints_and_artifacts_saved_from_the_device_load_on_the_host(tmp_path: Path) -> None:
    from ray_rec.model.artifact import save_model
    from ray_rec.train.checkpoint import read_checkpoint, write_checkpoint
    from ray_rec.train.optim import make_optimizer

    cfg = load_config(None, {"model.dim": 8})
    mcfg = ModelConfig(num_items=20, dim=8, max_len=5, heads=1)
    vocab = Vocabulary(ids=[f"i{i}" for i in range(1, 21)], counts=np.ones(20, dtype=np.int64), side_values={},
                       side_table=np.zeros((20, 0), dtype=np.int64))
    with OtherDevice():
        model = InterestModel(mcfg).to(DEVICE)
        optimizer = make_optimizer(model, cfg.train)
        train_step(model, {"items": torch.tensor([[0, 1, 2]]), "targets": torch.tensor([[1, 2, 3]])}, optimizer, 1.0)
        write_checkpoint(str(tmp_path / "ckpt"), model, vocab, optimizer, {"epoch": 1, "history": []}, None)
        save_model(model, vocab, str(tmp_path / "model"))
        weights = {k: v.cpu() for k, v in model.state_dict().items()}
    host = InterestModel(mcfg)
    read_checkpoint(str(tmp_path / "ckpt"), host, make_optimizer(host, cfg.train))
    assert all(torch.equal(host.state_dict()[k], w) for k, w in weights.items())
    assert load_model(str(tmp_path / "model"), device="cpu").device == torch.device("cpu")


@gpu
def test_on_a_gpu_training_and_ranking_run_on_it_in_both_precisions(tiny_data: str) -> None:
    for precision in ("fp32", "bf16"):
        run = train_local(tiny_data, _config({"train.precision": precision}), device="cuda")
        assert next(run.model.parameters()).is_cuda and np.isfinite([r["loss"] for r in run.history]).all()
        assert run.test["count"] > 0


@gpu
def test_on_a_gpu_recommend_matches_the_cpu(tmp_path: Path) -> None:
    histories = [["i1", "i2", "i3"], ["i4"]]
    artifact = tiny_artifact(tmp_path)
    cpu = _recommender(artifact, "cpu").recommend(histories, k=5)
    cuda = load_model(artifact, device="cuda")
    assert cuda.device.type == "cuda"
    assert [[i for i, _ in r] for r in cuda.recommend(histories, k=5)] == [[i for i, _ in r] for r in cpu]
