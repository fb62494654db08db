"""Ray Train: 2 workers on S3 data, checkpoints, artifact, failure recovery, --resume, evaluate."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from bench.output import this_ray
from ray_rec import load_model, storage
from ray_rec.config import load_config
from ray_rec.errors import TrainingError


def history(output: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(storage.join(output, "metrics.jsonl")).decode().splitlines()]


def valid_users(data: str) -> list[int]:
    """Users in each shard of the valid split, in the manifest's order."""
    import pyarrow.parquet as pq

    from ray_rec.data.pipeline import split_paths

    paths, fs = split_paths(data, "valid")
    return [pq.ParquetFile(fs.open_input_file(p)).metadata.num_rows for p in paths]


@pytest.mark.slow
def test_two_workers_write_checkpoints_and_a_loadable_artifact_to_s3(trained, s3_data, s3):
    keys = [o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="runs/main/")["Contents"]]
    checkpoints = {k.split("/")[3] for k in keys if k.startswith("runs/main/run/checkpoint_2")}
    assert 1 <= len(checkpoints) <= 2  # best 2 kept
    assert "runs/main/metrics.jsonl" in keys and "runs/main/metrics.png" in keys
    rows = history(trained.output)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["val_NDCG@10"] > 0 for r in rows)
    assert all(0 < r["lr"] <= 0.001 for r in rows)  # the rate each epoch ended at (halved on plateaus)
    assert [r["eval_users"] for r in rows] == [sum(valid_users(s3_data))] * 3  # fewer than train.eval_users: all
    # train.batch_size (64) is the whole step's: two workers of 32, so an epoch takes its windows 64 a
    # step (one chunk a worker here); at 64 a worker it would take 128 a step, in half the steps
    assert all((r["steps"] - 1) * 64 < r["examples"] <= r["steps"] * 64 for r in rows), rows
    rec = load_model(trained.model_uri)
    assert rec.config.num_items > 0 and rec.config.side_features == {"category": 6}
    assert len(rec.recommend([["i1", "i2"]], k=5)[0]) == 5
    # The final fit (on by default): the artifact was trained again on every click for the best
    # epoch's epochs, at the rates they ran at; the split run's best model sits beside it.
    assert trained.final_fit and trained.split_model_uri == storage.join(trained.output, "split_model")
    final, split = rec.info["training"], load_model(trained.split_model_uri).info["training"]
    assert final["fit"] == "final" and split["fit"] == "split"
    assert final["epoch"] == final["best_epoch"] == split["best_epoch"] == trained.best_epoch >= 1
    assert any(k.startswith("runs/main/final/checkpoint_") for k in keys)
    final_rows = json.loads(storage.read_bytes(storage.join(trained.output, "final", sorted(
        k for k in storage.list_files(storage.join(trained.output, "final")) if k.endswith("history.json"))[-1])))["history"]
    assert [r["lr"] for r in final_rows] == [0.001] * trained.best_epoch and all("val_NDCG@10" not in r for r in final_rows)
    # The final fit reads the test split's whole sequences: one more click a user than training saw.
    assert sum(r["examples"] for r in final_rows) >= sum(r["examples"] for r in rows[: trained.best_epoch])
    weights = [load_model(u).model.state_dict()["features.item.weight"] for u in (trained.model_uri, trained.split_model_uri)]
    assert not np.allclose(weights[0].numpy(), weights[1].numpy())


@pytest.mark.slow
def test_resume_continues_a_stopped_run(ray_cluster, s3_data, s3, tmp_path, caplog):
    import logging

    from ray_rec.train.trainer import train

    caplog.set_level(logging.INFO, logger="ray_rec.train.trainer")

    out = s3.uri("runs/stopped")
    # Validation on about 1 user: the first of the valid split's two shards (every epoch the same).
    # Sampled softmax: the item table's gradients are sparse (DDP's sparse all-reduce, lazy Adam's
    # state in the checkpoint resumed from); the `trained` fixture covers the dense ones.
    config = load_config(None, {"model.dim": 16, "train.epochs": 3, "train.batch_size": 64, "train.max_failures": 0,
                                "train.eval_users": 1, "model.loss": "sampled_softmax",
                                "train.progress_s": 0})  # a progress line after every step and validation batch
    with pytest.raises(TrainingError, match="training failed"):
        train(s3_data, out, config, workers=2, fail_once={"epoch": 2, "step": 1, "marker": str(tmp_path / "m")})
    with pytest.raises(TrainingError, match="already holds a training run"):
        train(s3_data, out, config, workers=2)
    result = train(s3_data, out, config, workers=2, resume=True)
    rows = history(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["resumes"] for r in rows] == [0, 1, 1]
    assert result.epochs_run == 3
    first, second = valid_users(s3_data)
    assert first and second and [r["eval_users"] for r in rows] == [first] * 3
    said = caplog.text  # the first lines: what validation reads, and that the log's browses go unused
    assert f"validation: about {round((first + second) / 2):,} of" in said and "(1 of 2 shards of the valid split" in said
    assert "browse events are not used: the sampled_softmax loss" in said
    assert "item table: sparse gradients" in said
    assert "batch: 64 prefixes a step, 32 on each of 2 workers (train.batch_size=64)" in said


def test_progress_lines_come_at_most_every_interval_and_count_users_over_workers():
    import torch

    from ray_rec.progress import Progress
    from ray_rec.train.fit import steps_line

    pace = Progress(60.0, iter([0.0, 20.0, 61.0, 70.0, 125.0, 130.0]).__next__)  # starts at 0
    assert [pace.due() for _ in range(5)] == [None, 61.0, None, 125.0, None]
    said: list[str] = []
    batches = [{"targets": torch.zeros(n)} for n in (3, 5)]
    assert list(Progress(0.0, iter([0.0, 2.0, 4.0]).__next__).users(batches, said.append, "validation", 2)) == batches
    assert said == ["validation: 6 users ranked in 2 s (3/s)", "validation: 16 users ranked in 4 s (4/s)"]
    assert steps_line("1/3", 1, 2560, 40.2, 38.6, 9.12344) == (
        "epoch 1/3: 1 step, about 2,560 examples in 40 s (64/s; 39 s of it waiting for data), loss 9.1234 so far")
    assert steps_line("1/3", 12, 30720, 80.0, 39.0, 8.5).startswith("epoch 1/3: 12 steps, about 30,720 examples")
    with pytest.raises(ValueError, match="train.progress_s=-1"):
        load_config(None, {"train.progress_s": -1})


def test_the_schedule_reads_a_moving_average_of_the_validations():
    import random

    from ray_rec.train.schedule import Plateau

    def run(smoothing: float, scores: list[float]) -> tuple[list[str], Plateau]:
        plateau = Plateau(load_config(None, {"train.smoothing": smoothing, "train.lr_patience": 0,
                                             "train.patience": 1000}).train)
        return [plateau.validated(e, e * 10, s) for e, s in enumerate(scores, 1)], plateau

    verdicts, plateau = run(0.5, [0.1, 0.2, 0.1, 0.2])  # averages 0.1, 0.15, 0.125, 0.1625
    assert verdicts == ["better", "better", "same", "better"] and plateau.best == pytest.approx(0.1625)
    plateau.validated(5, 50, 0.0)
    assert "(average)" in plateau.stalled() and "(average)" not in run(0.0, [0.1, 0.0])[1].stalled()  # what the log names
    assert run(0.0, [0.1, 0.2, 0.1, 0.2])[0] == ["better", "better", "same", "same"]
    # A run that peaks at epoch 30 and declines, its validations scattered by their standard error
    # (a small validation set): averaged, the epoch picked is on average nearer the true peak.
    def picked(smoothing: float, seed: int) -> float:
        noise, truth = random.Random(seed), [0.1 - 2e-5 * (e - 30) ** 2 for e in range(1, 81)]
        plateau = Plateau(load_config(None, {"train.smoothing": smoothing, "train.lr_patience": 0, "train.patience": 10,
                                             "train.patience_steps": 0}).train)
        for epoch, score in enumerate(truth, 1):
            if plateau.validated(epoch, epoch, score + noise.gauss(0.0, 0.005)) == "stop":
                break
        return truth[plateau.best_epoch - 1]

    raw, averaged = (sum(picked(s, seed) for seed in range(200)) / 200 for s in (0.0, 0.5))
    assert averaged > raw + 3e-4
    with pytest.raises(ValueError, match="train.smoothing=1"):
        load_config(None, {"train.smoothing": 1.0})


def test_learning_rate_halves_and_training_stops_after_validations_and_steps_both():
    import torch

    from ray_rec.train.optim import make_optimizer
    from ray_rec.train.schedule import Plateau, epoch_rates, halve_rate

    def verdicts(cfg, steps_per_epoch: int, epochs: int) -> list[str]:
        plateau = Plateau(cfg)
        out = [plateau.validated(1, steps_per_epoch, 0.5)]  # the best, then nothing better
        for epoch in range(2, epochs + 1):
            out.append(plateau.validated(epoch, epoch * steps_per_epoch, 0.4))
            if out[-1] == "stop":
                break
        return out

    cfg = load_config(None, {"train.lr_patience": 3, "train.lr_patience_steps": 500,
                             "train.patience": 10, "train.patience_steps": 1500}).train
    # Many steps an epoch (Beauty: 176): the counts of validations decide, as they always did.
    many = verdicts(cfg, 176, 40)
    assert [i + 1 for i, v in enumerate(many) if v == "halve"] == [4, 7, 10] and many[-1] == "stop" and len(many) == 11
    # 9 steps an epoch (1,000 users of long histories): halving only after 500 steps without a better
    # score, stopping only after 1,500 (a minimum budget, where 10 validations would be 90 steps).
    few = verdicts(cfg, 9, 400)
    halves = [i + 1 for i, v in enumerate(few) if v == "halve"]
    assert halves[0] == 1 + 56 and all(b - a == 56 for a, b in zip(halves, halves[1:]))  # ceil(500 / 9) epochs apart
    assert few[-1] == "stop" and (len(few) - 1) * 9 >= 1500 > (len(few) - 2) * 9
    # A better score resets both counts; it never halves or stops.
    plateau = Plateau(cfg)
    assert [plateau.validated(e, e * 9, 0.1 * e) for e in range(1, 5)] == ["better"] * 4
    assert plateau.best_epoch == 4 and plateau.best_step == 36
    restored = Plateau(cfg)
    restored.restore(plateau.state())  # as a resumed run reads its checkpoint
    assert restored.state() == plateau.state()
    constant = load_config(None, {"train.lr_patience": 0}).train
    assert "halve" not in verdicts(constant, 176, 40)

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    optimizer = make_optimizer(model, load_config(None, {"train.lr": 0.004}).train)
    assert halve_rate(optimizer, "why") == 0.002
    assert {g["lr"] for g in optimizer.param_groups} == {0.002}  # every group, the weight-decayed and the rest
    resumed = make_optimizer(model, cfg)  # as a resumed run builds it, then loads the checkpoint's state
    resumed.load_state_dict(optimizer.state_dict())
    assert {g["lr"] for g in resumed.param_groups} == {0.002}
    # The final fit replays the rates each epoch ran at (a row's lr is the one after its validation).
    assert epoch_rates([{"lr": 0.001}, {"lr": 0.0005}, {"lr": 0.0005}], 0.001) == [0.001, 0.001, 0.0005]
    for bad in ({"train.lr_patience": -1}, {"train.patience_steps": -1}, {"train.final_fit": "yes"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            load_config(None, bad)


def test_the_batch_is_the_whole_steps_split_evenly_over_the_workers():
    from ray_rec.train.worker import batch_line, worker_batch

    assert [worker_batch(128, w) for w in (1, 2, 3, 4, 200)] == [128, 64, 43, 32, 1]
    assert batch_line(128, 1) == "batch: 128 windows a step (1 worker)"
    assert batch_line(128, 2) == "batch: 128 windows a step, 64 on each of 2 workers (train.batch_size=128)"
    assert batch_line(128, 3).endswith("43 on each of 3 workers (train.batch_size=128, rounded up to a multiple of 3)")


def test_checkpoint_folders_a_lost_worker_left_half_uploaded_are_removed_and_never_resumed_from(s3):
    from ray_rec.model.artifact import REQUIRED_FILES
    from ray_rec.train.checkpoint import STATE_FILES, newest_complete_checkpoint, remove_partial_checkpoints

    run = s3.uri("partial-checkpoints/run")
    for folder, epoch, names in (("checkpoint_a", 2, (*REQUIRED_FILES, *STATE_FILES)),
                                 ("checkpoint_b", 3, ("history.json", "weights.safetensors"))):
        for name in names:
            storage.write_bytes(storage.join(run, folder, name), json.dumps({"epoch": epoch}).encode())
    storage.write_bytes(storage.join(run, "result.json"), b"{}")
    assert newest_complete_checkpoint(run) == (storage.join(run, "checkpoint_a"), 2)
    assert remove_partial_checkpoints(run) == ["checkpoint_b"]
    assert sorted({f.split("/")[0] for f in storage.list_files(run)}) == ["checkpoint_a", "result.json"]
    assert remove_partial_checkpoints(run) == []


def test_resume_without_a_run_is_a_clear_error(ray_cluster, tiny_data, tmp_path):
    from ray_rec.train.trainer import train

    with pytest.raises(TrainingError, match="holds no training run"):
        train(tiny_data, str(tmp_path / "empty"), load_config(None), resume=True)


def test_scoring_actors_use_their_nodes_cores_and_one_per_node(ray_cluster):
    """Ray sets OMP_NUM_THREADS=1 in a 1-CPU actor; evaluate's and batch-score's actors take their
    node's cores back, and the pool grows up to one actor per live node with CPUs."""
    import ray

    from ray_rec.ray_session import scoring_pool, usable_cores, use_node_cores

    @ray.remote(num_cpus=1)
    def threads() -> tuple[int, int, str | None]:
        import os

        import torch

        before = torch.get_num_threads()
        use_node_cores()
        return before, torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    before, after, omp = ray.get(threads.remote())
    assert (before, omp) == (1, "1") and after == usable_cores()
    pool, gpus = scoring_pool()
    assert (pool.min_size, pool.max_size, gpus) == (1, 1, 0)  # this one-node Ray
    cpu, gpu_only, dead = ({"Alive": True, "Resources": {"CPU": 8.0}}, {"Alive": True, "Resources": {"GPU": 1.0}},
                           {"Alive": False, "Resources": {"CPU": 8.0}})
    two_gpus = {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}}
    assert scoring_pool([cpu, cpu, cpu, gpu_only, dead])[0].max_size == 3
    assert scoring_pool([gpu_only])[0].max_size == 1  # waits for a node with CPUs (an autoscaler adds one)
    # --gpu: one actor per GPU, each holding one; none yet: one actor that waits for one
    pool, gpus = scoring_pool([cpu, gpu_only, two_gpus, {**two_gpus, "Alive": False}], gpu=True)
    assert (pool.max_size, gpus) == (3, 1)
    pool, gpus = scoring_pool([cpu], gpu=True)
    assert (pool.max_size, gpus) == (1, 1)


@pytest.mark.slow
def test_reading_a_split_starts_no_actors_and_reshuffles_its_files_every_pass(ray_cluster, s3_data):
    """Reads are plain tasks: an actor pool per pass would cost seconds a pass and, on an autoscaling
    cluster, an actor placed on a node being removed would fail the read."""
    import ray
    from ray.util.state import list_actors

    from ray_rec.data.pipeline import read_sequences

    def actors() -> set[str]:
        return {a.actor_id for a in list_actors(address=this_ray(), limit=10_000)}

    before = actors()
    ds = read_sequences(s3_data, "train", shuffle_seed=3)
    passes = [[u for b in ds.iter_batches(batch_format="pyarrow") for u in b["user_id"].to_pylist()] for _ in range(6)]
    started = [a.class_name for a in list_actors(address=this_ray(), limit=10_000) if a.actor_id not in before]
    assert not [name for name in started if "Footer" in name], started
    assert ray.data.DataContext.get_current().use_datasource_v2  # the caller's context is left as it was
    assert all(sorted(p) == sorted(passes[0]) for p in passes)  # every user, once a pass
    assert len({tuple(p) for p in passes}) > 1  # the file order is drawn anew for each pass


def test_evaluate_reports_full_sampled_and_popularity(trained, s3_data):
    from ray_rec.predict.evaluate import evaluate_model

    said: list[str] = []
    from ray_rec.predict.evaluate import EvaluationError

    with pytest.raises(EvaluationError, match="is the final fit: it was trained again on every click"):
        evaluate_model(s3_data, trained.model_uri, split="test")  # it saw the test targets
    result = evaluate_model(s3_data, trained.split_model_uri, split="test", progress=said.append, progress_s=0)
    num_items = load_model(trained.model_uri).config.num_items
    assert said[:2] == ["counting the train split's clicks (the popularity baseline)",
                        f"ranking the test split's users over {num_items:,} items"]
    # While ranking, lines on the users the scoring actors have counted (progress_s=0: every poll);
    # the last line is the driver's own count of every user.
    counts = [int(m.group(1).replace(",", "")) for line in said[2:-1] if (m := re.match(r"([\d,]+) users ranked in ", line))]
    assert len(counts) == len(said) - 3 >= 1 and counts == sorted(counts) and counts[-1] <= 240, said
    assert said[-1].startswith("240 users ranked in ")
    full = result["full_ranking"]
    assert set(full) >= {"HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR"}
    assert full["count"] == 240
    assert 0 <= full["NDCG@10"] <= full["HR@10"] <= full["HR@20"] <= 1
    sampled = result["sampled_100"]
    assert sampled["count"] == 240 and 0 <= sampled["NDCG@10"] <= sampled["HR@10"] <= 1
    assert full["NDCG@10"] > result["popularity_full_ranking"]["NDCG@10"]


@pytest.mark.slow
def test_batch_score_writes_top_k_for_every_user(trained, s3_data, s3):
    from ray_rec.predict.batch_score import batch_score

    out, lines = s3.uri("scores/test"), []
    assert batch_score(s3_data, trained.model_uri, out, k=5, progress=lines.append, progress_s=0) == 240
    assert lines[0].startswith("ranking the test split's users over ") and lines[-1].startswith("all users written")
    counts = [int(m.group(1).replace(",", "")) for line in lines[1:-1] if (m := re.match(r"([\d,]+) users scored in ", line))]
    assert len(counts) == len(lines) - 2 >= 1 and counts == sorted(counts) and counts[-1] <= 240, lines
    fs, path = storage.resolve(out)
    import pyarrow.dataset as pads

    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    # plain Parquet lists that any reader takes, not Ray's pickled-object or tensor extension types
    assert table.schema.field("items").type == pa.list_(pa.string()), table.schema
    assert table.schema.field("scores").type == pa.list_(pa.float32()), table.schema
    assert table.num_rows == 240 and all(len(r) == 5 for r in table.column("items").to_pylist())
    assert all(s == sorted(s, reverse=True) for s in table.column("scores").to_pylist())
    model, row = load_model(trained.model_uri), table.slice(0, 1).to_pylist()[0]
    history, times = _user_clicks(s3_data, "test", row["user_id"], model.vocab)
    want = model.recommend([history], k=5, timestamps=[times])[0]
    assert row["items"] == [str(i) for i, _ in want] and row["scores"] == pytest.approx([s for _, s in want], rel=1e-4, abs=1e-5)


def _user_clicks(data: str, split: str, user: Any, vocab: Any) -> tuple[list[Any], list[int]]:
    """One user's clicks in a split of a prepared dataset, as raw ids and their times, read with pyarrow."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from ray_rec.data.examples import CLICK
    from ray_rec.data.pipeline import split_paths

    paths, fs = split_paths(data, split)
    table = pads.dataset(paths, filesystem=fs, format="parquet").to_table()
    (row,) = table.filter(pc.equal(table["user_id"], user)).to_pylist()
    clicks = [(i, t) for i, e, t in zip(row["items"], row["events"], row["timestamps"]) if e == CLICK]
    return [vocab.raw_id(i) for i, _ in clicks], [t for _, t in clicks]


def _chunks(n_chunks: int, rows: int, start: int = 0) -> list[dict[str, np.ndarray]]:
    return [{"items": np.arange(start + i * rows, start + (i + 1) * rows, dtype=np.int32).reshape(-1, 1) * np.ones((1, 4), np.int32)}
            for i in range(n_chunks)]


def counting(n_chunks: int, rows: int) -> tuple[Any, list[int]]:
    """A stream of chunks, and the list that counts how often it was started."""
    calls: list[int] = []

    def stream():
        calls.append(1)
        yield from _chunks(n_chunks, rows)

    return stream, calls


def test_example_cache_replays_a_pass_that_fits_in_a_new_order_without_streaming():
    from ray_rec.train.feed import ExampleCache

    stream, calls = counting(5, 10)

    cache = ExampleCache(limit_mb=1)
    first = list(cache.epoch(stream, 8, np.random.default_rng(1)))
    second = list(cache.epoch(stream, 8, np.random.default_rng(2)))
    third = list(cache.epoch(stream, 8, np.random.default_rng(3)))
    assert len(calls) == 1  # the pipeline ran once
    assert [len(c["items"]) for c in first] == [10] * 5
    assert [len(c["items"]) for c in second] == [8] * 6 + [2]
    ids = [np.concatenate([c["items"][:, 0] for c in e]) for e in (second, third)]
    assert sorted(ids[0]) == list(range(50)) and sorted(ids[1]) == list(range(50))  # each row exactly once
    assert not np.array_equal(ids[0], ids[1])  # reshuffled every epoch
    assert (second[0]["items"] == second[0]["items"][:, :1]).all()  # rows stay whole


def test_example_cache_keeps_streaming_what_does_not_fit_or_did_not_finish():
    from ray_rec.train.feed import ExampleCache

    big, calls = counting(4, 20_000)  # 4 x 20,000 x 4 int32 = 1.28 MB

    cache = ExampleCache(limit_mb=1)
    for epoch in range(3):
        assert sum(len(c["items"]) for c in cache.epoch(big, 100, np.random.default_rng(epoch))) == 80_000
    assert len(calls) == 3 and cache.rows is None and cache.too_big

    cache = ExampleCache(limit_mb=1)
    partial = cache.epoch(lambda: iter(_chunks(3, 10)), 8, np.random.default_rng(0))
    next(partial)
    partial.close()  # a pass cut short (a stop, a failure) is never replayed
    assert cache.rows is None


def test_example_cache_off_streams_every_pass():
    from ray_rec.train.feed import ExampleCache

    stream, calls = counting(2, 5)

    cache = ExampleCache(limit_mb=0)
    for _ in range(3):
        assert [len(c["items"]) for c in cache.chunks(stream)] == [5, 5]
        assert sum(len(c["items"]) for c in cache.epoch(stream, 4, np.random.default_rng(0))) == 10
    assert len(calls) == 6


def test_example_cache_replays_validation_chunks_in_order():
    from ray_rec.train.feed import ExampleCache

    stream, calls = counting(3, 4)

    cache = ExampleCache(limit_mb=1)
    passes = [[c["items"][:, 0].tolist() for c in cache.chunks(stream)] for _ in range(3)]
    assert passes[0] == passes[1] == passes[2] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert len(calls) == 1


def _in_step_worker(rank: int, sizes: list[list[int]], init: str, out: Any) -> None:
    import torch
    import torch.distributed as dist

    from ray_rec.train.feed import in_step

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=len(sizes))
    left: list[int] = []
    batches = ({"items": torch.full((n, 3), i)} for i, n in enumerate(sizes[rank]))
    trained = [int(b["items"][0, 0]) for b in in_step(batches, left_out=left.append)]
    dist.destroy_process_group()
    out.put((rank, trained, left))


@pytest.mark.parametrize("sizes, steps, left", [
    ([[4, 4, 4], [4, 4, 4, 4, 1]], 3, [5]),  # the second worker has 5 examples more
    ([[4, 4, 4, 2], [4, 4, 4]], 3, [2]),
    ([[4, 4], [4, 3]], 2, []),  # equal steps: nothing left out
])
def test_data_parallel_workers_step_together_and_leave_the_longer_shards_surplus_out(tmp_path, sizes, steps, left):
    """Workers build examples from equal numbers of sequences, so their batch counts differ: every
    worker trains the steps all of them have (real gloo all-reduces, two processes)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_in_step_worker, args=(r, sizes, f"file://{tmp_path}/rendezvous", out)) for r in range(2)]
    for p in procs:
        p.start()
    results = {rank: (trained, said) for rank, trained, said in (out.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    assert results[0] == results[1] == (list(range(steps)), left)
