"""`ray-rec train`: data-parallel training on Ray Train, checkpoints and the final artifact.

The per-worker loop only wires Ray in: it takes its shard of the Ray Data pipeline, wraps the
model with ``prepare_model`` (DDP; gloo on CPU, nccl on GPU), runs the plain `train_step`, evaluates
its share of the validation users, and reports. Rank 0 writes checkpoints and the metrics file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ray_rec import storage
from ray_rec.config import Config, config_from_dict, for_data
from ray_rec.data.examples import BUCKET_WINDOW, browse_width, collate, evaluation_examples
from ray_rec.data.pipeline import limit_memory, read_sequences, training_dataset, validation_sample
from ray_rec.data.prepare import read_manifest
from ray_rec.errors import TrainingError
from ray_rec.metrics import RankingMetrics
from ray_rec.model.artifact import REQUIRED_FILES
from ray_rec.model.interest_model import InterestModel
from ray_rec.ray_session import usable_cores
from ray_rec.train.checkpoint import newest_complete_checkpoint, read_checkpoint, write_checkpoint
from ray_rec.train.feed import EpochPrefetcher, ExampleCache, epoch_chunks, training_batches
from ray_rec.train.lineage import start_lineage, write_lineage
from ray_rec.train.loop import (
    Progress,
    batch_line,
    decay_on_plateau,
    evaluate,
    make_optimizer,
    sparse_item_gradients,
    sparse_items_line,
    steps_line,
    train_step,
    worker_batch,
)
from ray_rec.train.report import write_metrics_files
from ray_rec.train.tracking import EXPERIMENT, close_run, track_run, tracking_uri
from ray_rec.vocab import Vocabulary

logger = logging.getLogger(__name__)

RUN_NAME = "run"


@dataclass
class TrainResult:
    """Where the run left its outputs and how it went."""

    output: str
    model_uri: str
    best_epoch: int
    epochs_run: int
    best_metrics: dict[str, float]
    seconds: float
    tracking: dict[str, str] | None = None  # the MLflow tracking URI and run id, when tracked


def _log(msg: str) -> None:
    """Progress from rank 0, through logging: Ray Train sends a worker's log records to the driver
    once, while a `print` there reaches it twice (Train's print patch tees it to stdout and logs it)."""
    if ray.train.get_context().get_world_rank() == 0:
        logger.info("[ray-rec] %s", msg)


def _threads_per_worker(use_gpu: bool) -> int:
    """Intra-op threads for this worker: its node's usable cores shared among the workers there.

    Counted on the worker's own node (a cluster's nodes differ from the driver's). A GPU worker's
    host threads only feed the device: one.
    """
    if use_gpu:
        return 1
    return max(1, usable_cores() // ray.train.get_context().get_local_world_size())


def _evaluate_shard(model: InterestModel, shard: Any, cfg: Config, cache: ExampleCache, epoch: int) -> dict[str, float]:
    """Full-ranking validation on this worker's users, summed over all workers."""
    def stream() -> Iterator[dict[str, np.ndarray]]:
        for table in shard.iter_batches(batch_size=cfg.train.eval_batch_size, batch_format="pyarrow"):
            examples = evaluation_examples(table, model.config.history_len, model.config.time_buckets)
            if len(examples["targets"]):
                yield examples

    batches = (collate(examples) for examples in cache.chunks(stream))
    paced = Progress(cfg.train.progress_s).users(batches, _log, f"epoch {epoch} validation",
                                                 ray.train.get_context().get_world_size())
    full, _ = evaluate(model, paced, cfg.eval.ks)
    sums = full.sums.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    merged = RankingMetrics(full.ks)
    merged.merge(sums)
    return merged.result()


def _maybe_fail(fail_once: dict[str, Any] | None, epoch: int, step: int) -> None:
    """Test hook: kill this worker process once (SIGKILL) at a given epoch and step."""
    if not fail_once or ray.train.get_context().get_world_rank() != 0:
        return
    if epoch == fail_once["epoch"] and step == fail_once.get("step", 1) and not os.path.exists(fail_once["marker"]):
        with open(fail_once["marker"], "w") as f:
            f.write(f"killed at epoch {epoch} step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def _quiet_train_loggers() -> None:
    """Ray Train logs every report and checkpoint at INFO from each worker; our own epoch line
    says it. Its loggers: ``ray.train``, and the worker context's, which is named by its file path
    (``getLogger(__file__)``), so outside the ``ray.train`` tree. (Train's ``LoggingConfig`` level
    would also drop our own INFO progress lines.)"""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context

        context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # another Ray layout: its line stays, nothing else changes
        pass


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    _quiet_train_loggers()
    cfg = config_from_dict(loop_config["config"])
    manifest = loop_config["manifest"]
    output = loop_config["output"]
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    # train.batch_size is the whole step's: from here on, cfg holds this worker's share of it.
    cfg = replace(cfg, train=replace(cfg.train, batch_size=worker_batch(cfg.train.batch_size, world)))
    torch.manual_seed(cfg.train.seed + rank)
    threads = _threads_per_worker(loop_config["use_gpu"])
    torch.set_num_threads(threads)
    _log(f"{threads} intra-op threads per worker (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")
    mcfg = for_data(cfg.model, manifest)
    vocab = Vocabulary.load(loop_config["data"])
    model = InterestModel(mcfg)
    model.features.set_item_side(torch.as_tensor(vocab.side_matrix()))
    model.features.item.sparse = sparse_item_gradients(mcfg, cfg.train, loop_config["use_gpu"])
    optimizer = make_optimizer(model, cfg.train)
    state: dict[str, Any] = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad": 0, "resumes": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    stored = newest_complete_checkpoint(storage.join(output, RUN_NAME))
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = read_checkpoint(folder, model, optimizer)
    if stored is not None and stored[1] > state["epoch"]:
        with tempfile.TemporaryDirectory() as folder:
            storage.copy_dir(stored[0], folder)
            state = read_checkpoint(folder, model, optimizer)
    if state["epoch"] > 0:
        state["resumes"] += 1
        _log(f"resumed from the checkpoint of epoch {state['epoch']}")
    ddp_model = ray.train.torch.prepare_model(model)
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    train_cache, valid_cache = ExampleCache(cfg.data.cache_mb), ExampleCache(cfg.data.cache_mb)
    chunk_rows = BUCKET_WINDOW * cfg.train.batch_size
    prefetcher = EpochPrefetcher(
        lambda e: train_cache.epoch(lambda: epoch_chunks(train_shard, cfg, e, rank), chunk_rows,
                                    np.random.default_rng([cfg.data.seed, e, rank, 1])),
        state["epoch"] + 1, cfg.train.epochs)
    try:
        _epochs(loop_config, cfg, state, model, ddp_model, optimizer, vocab, prefetcher, valid_shard, valid_cache, output, rank)
    finally:
        prefetcher.close()


def _epochs(loop_config: dict[str, Any], cfg: Config, state: dict[str, Any], model: InterestModel, ddp_model: Any,
            optimizer: Any, vocab: Vocabulary, prefetcher: EpochPrefetcher, valid_shard: Any, valid_cache: ExampleCache,
            output: str, rank: int) -> None:
    tcfg = cfg.train
    for epoch in range(state["epoch"] + 1, tcfg.epochs + 1):
        t0 = time.monotonic()
        total, steps, examples, wait = 0.0, 0, 0, 0.0
        batches = training_batches(prefetcher.epoch(), cfg, epoch, rank)
        pace, world = Progress(tcfg.progress_s), ray.train.get_context().get_world_size()
        while True:
            t_wait = time.monotonic()
            batch = next(batches, None)
            wait += time.monotonic() - t_wait
            if batch is None:
                break
            steps += 1
            _maybe_fail(loop_config.get("fail_once"), epoch, steps)
            total += train_step(ddp_model, batch, optimizer, tcfg.grad_clip)["loss"]
            examples += int(batch["items"].shape[0])
            if (seconds := pace.due()) is not None:
                _log(steps_line(f"{epoch}/{tcfg.epochs}", steps, examples * world, seconds, wait, total / steps))
        train_s = time.monotonic() - t0
        metrics: dict[str, Any] = {"epoch": epoch, "resumes": state["resumes"], "loss": total / max(steps, 1), "train_s": train_s,
                                   "data_wait_s": wait, "steps": steps, "examples": examples * world,
                                   "examples_per_s": examples * world / max(train_s, 1e-9)}
        evaluated = epoch % tcfg.eval_every == 0 or epoch == tcfg.epochs
        if evaluated:
            t_val = time.monotonic()
            val = _evaluate_shard(model, valid_shard, cfg, valid_cache, epoch)
            metrics.update({f"val_{name}": value for name, value in val.items() if name != "count"})
            metrics.update({"eval_users": int(val["count"]), "eval_s": time.monotonic() - t_val})
            if val[tcfg.select_by] > state["best"]:
                state.update(best=val[tcfg.select_by], best_epoch=epoch, bad=0)
            else:
                state["bad"] += 1
                decay_on_plateau(optimizer, state["bad"], tcfg, _log)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        metrics.setdefault(cfg.score, state["best"])  # Ray Train ranks checkpoints by it on every report
        state["epoch"] = epoch
        state["history"].append(metrics)
        stop = state["bad"] >= tcfg.patience
        _log(
            f"epoch {epoch}/{tcfg.epochs} loss {metrics['loss']:.4f} "
            + (f"val {tcfg.select_by} {metrics[cfg.score]:.4f} "
               f"on {metrics['eval_users']:,} users in {metrics['eval_s']:.1f} s " if evaluated else "")
            + f"({metrics['examples_per_s']:,.0f} examples/s)"
        )
        with tempfile.TemporaryDirectory() as folder:
            ckpt = None
            if rank == 0:
                write_checkpoint(folder, model, vocab, optimizer, state, loop_config.get("lineage"))
                write_metrics_files(output, state["history"])
                if loop_config.get("tracker") is not None:
                    loop_config["tracker"].log_metrics(metrics, step=epoch)
                ckpt = Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=ckpt)
        if stop:
            _log(f"early stop: no better validation {tcfg.select_by} for {state['bad']} evaluations (best epoch {state['best_epoch']})")
            break


def _storage(output: str) -> tuple[str, Any]:
    """Ray Train's storage path and filesystem for an output URI."""
    if storage.is_s3(output):
        fs, path = storage.resolve(output)
        return path, fs
    os.makedirs(output, exist_ok=True)
    return os.path.abspath(output), None


def _aws_env() -> dict[str, str]:
    """Where S3 is, for the training workers; never the credentials. Ray's runtime-env agent logs
    the environment it sets up, so keys passed here end up in log files (a test checks). Workers
    get credentials the standard way: the environment of the process that started Ray, or the
    node's instance profile / IAM role."""
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
    return {n: os.environ[n] for n in names if n in os.environ}


def train(
    data: str,
    output: str,
    config: Config,
    workers: int = 2,
    use_gpu: bool = False,
    resume: bool = False,
    fail_once: dict[str, Any] | None = None,
    overwrite: bool = False,
    allow_changes: bool = False,
    tracking: str | None = None,
    experiment: str = EXPERIMENT,
) -> TrainResult:
    """Train on a prepared dataset with ``workers`` data-parallel Ray Train workers.

    Writes checkpoints under ``<output>/run``, ``metrics.jsonl`` and ``metrics.png``, the run's
    ``lineage.json``, and the model artifact of the best epoch to ``<output>/model``; every
    checkpoint and the artifact carry the lineage. ``resume`` continues the run in ``output``
    with the same settings (changed ones only with ``allow_changes``). ``tracking``: an MLflow
    tracking URI (default ``MLFLOW_TRACKING_URI``; none: no tracking), runs go to ``experiment``.

    Raises:
        TrainingError: the output already holds a run (without ``resume``), there is nothing to
            resume, or a resume changes the data set, the model or (without ``allow_changes``) a setting.
        OutputError: the output holds files no training run wrote (unless ``overwrite``), or the data.
    """
    if workers < 1:
        raise TrainingError(f"--workers={workers} must be >= 1")
    data, output = storage.absolute(data), storage.absolute(output)  # workers run in other folders
    manifest = read_manifest(data)
    run_dir = storage.join(output, RUN_NAME)
    if storage.exists(run_dir) and not resume:
        raise TrainingError(f"{output} already holds a training run: pass --resume to continue it, or choose another --output")
    if resume and not storage.exists(run_dir):
        raise TrainingError(f"--resume: {output} holds no training run to continue")
    storage.claim_output(output, "train", overwrite, reads=(data,))
    mcfg = for_data(config.model, manifest)
    lineage, changes = start_lineage(output, config, mcfg, data, manifest, workers, "cuda" if use_gpu else "cpu",
                                     resume, allow_changes)
    tracker = track_run(lineage, tracking_uri(tracking), output, experiment, changes)
    write_lineage(output, lineage)  # before any training: a resume compares against it
    logger.info("model: %s", mcfg.describe())
    logger.info(batch_line(config.train.batch_size, workers))
    if manifest["has_browse"] and mcfg.resolved_loss != "bce":
        logger.info("the log's browse events are not used: the %s loss contrasts the next click with the catalog "
                    "(model.loss=bce trains on browsed items as negatives)", mcfg.resolved_loss)
    if sparse_item_gradients(mcfg, config.train, use_gpu):
        logger.info(sparse_items_line(mcfg))
    sample = validation_sample(manifest, config.train.eval_users)
    kept, shards = len(sample["files"]["valid"]), len(manifest["files"]["valid"])
    if kept < shards:
        logger.info("validation: about %s of %s users (%d of %d shards of the valid split; train.eval_users=%d, 0 = all)",
                    f"{round(manifest['counts']['users'] * kept / shards):,}", f"{manifest['counts']['users']:,}",
                    kept, shards, config.train.eval_users)
    started = time.monotonic()
    storage_path, fs = _storage(output)
    limit_memory(config.data.pipeline_memory_mb)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "manifest": manifest,
            "data": data,
            "output": output,
            "fail_once": fail_once,
            "use_gpu": use_gpu,
            "lineage": lineage,
            "tracker": tracker,
        },
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        datasets={
            "train": training_dataset(data, mcfg, browse_width(manifest, mcfg.resolved_loss), config.data.seed, manifest),
            "valid": read_sequences(data, "valid", sample),
        },
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.train.keep_checkpoints, checkpoint_score_attribute=config.score, checkpoint_score_order="max"
            ),
            worker_runtime_env={"env_vars": _aws_env()},  # type: ignore[call-arg]
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        if tracker is not None:
            tracker.finish("FAILED")
        raise TrainingError(
            f"training failed after {config.train.max_failures} recoveries: {exc}. "
            f"Fix the cause, then rerun with --resume to continue from the last checkpoint"
        ) from None
    if result.error is not None:
        raise TrainingError(f"training failed: {result.error}")
    best = result.get_best_checkpoint(config.score, "max") if result.best_checkpoints else result.checkpoint
    if best is None:
        raise TrainingError("training finished without a checkpoint")
    model_uri = storage.join(output, "model")
    with best.as_directory() as folder:
        with open(os.path.join(folder, "history.json")) as f:
            state = json.load(f)
        staging = storage.join(output, "_model-staging")
        storage.delete_dir(staging)
        with tempfile.TemporaryDirectory() as tmp:
            for name in REQUIRED_FILES:  # the artifact, without the optimizer and loop state
                shutil.copy(os.path.join(folder, name), tmp)
            storage.copy_dir(tmp, staging)
        storage.delete_dir(model_uri)
        storage.move_dir(staging, model_uri)
    best_row: dict[str, Any] = next((r for r in state["history"] if r["epoch"] == state["best_epoch"]), {})
    final_history = result.metrics or {}
    if tracker is not None:
        close_run(tracker, output, model_uri, best_row)
    return TrainResult(
        output=output,
        model_uri=model_uri,
        best_epoch=state["best_epoch"],
        epochs_run=int(final_history.get("epoch", state["epoch"])),
        best_metrics={k: v for k, v in best_row.items() if k.startswith("val_")},
        seconds=time.monotonic() - started,
        tracking=lineage.get("tracking"),
    )

