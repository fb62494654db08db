"""What every Ray Train worker runs: its shard of the Ray Data pipeline, the model wrapped with
``prepare_model`` (DDP; gloo on CPU, nccl on GPU), the plain `train_step`, validation on its share
of the validation users, and reports. Rank 0 writes checkpoints and the metrics file.

One function serves both fits of a run: the split run (validation, `Plateau`) and the final fit
(``loop_config["final"]``: every click, a fixed number of epochs at the split run's rates).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from ray_rec import storage
from ray_rec.config import Config, config_from_dict, for_data
from ray_rec.data.examples import BUCKET_WINDOW, collate, evaluation_examples
from ray_rec.metrics import RankingMetrics
from ray_rec.model.interest_model import InterestModel
from ray_rec.ray_session import usable_cores
from ray_rec.train.checkpoint import newest_complete_checkpoint, read_checkpoint, write_checkpoint
from ray_rec.train.feed import EpochPrefetcher, ExampleCache, epoch_chunks, training_batches
from ray_rec.train.loop import (
    Progress,
    evaluate,
    make_optimizer,
    sparse_item_gradients,
    steps_line,
    train_step,
    worker_batch,
)
from ray_rec.train.report import write_metrics_files
from ray_rec.train.schedule import Plateau, halve_rate, set_rate
from ray_rec.vocab import Vocabulary

logger = logging.getLogger("ray_rec.train.trainer")  # the driver's progress logger: one name for both


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
    final = loop_config.get("final")
    state: dict[str, Any] = {"epoch": 0, "best": -1.0, "best_epoch": 0, "steps": 0, "resumes": 0, "history": [],
                             "fit": "final" if final else "split", **(final["split"] if final else {})}
    checkpoint = ray.train.get_checkpoint()
    stored = newest_complete_checkpoint(storage.join(output, loop_config["run_name"]))
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
    valid_shard = None if final else ray.train.get_dataset_shard("valid")  # the final fit does not validate
    train_cache, valid_cache = ExampleCache(cfg.data.cache_mb), ExampleCache(cfg.data.cache_mb)
    chunk_rows = BUCKET_WINDOW * cfg.train.batch_size
    prefetcher = EpochPrefetcher(
        lambda e: train_cache.epoch(lambda: epoch_chunks(train_shard, cfg, e, rank), chunk_rows,
                                    np.random.default_rng([cfg.data.seed, e, rank, 1])),
        state["epoch"] + 1, _last_epoch(loop_config, cfg))
    try:
        _epochs(loop_config, cfg, state, model, ddp_model, optimizer, vocab, prefetcher, valid_shard, valid_cache, output, rank)
    finally:
        prefetcher.close()


def _last_epoch(loop_config: dict[str, Any], cfg: Config) -> int:
    final = loop_config.get("final")
    return int(final["epochs"]) if final else cfg.train.epochs


def _epochs(loop_config: dict[str, Any], cfg: Config, state: dict[str, Any], model: InterestModel, ddp_model: Any,
            optimizer: Any, vocab: Vocabulary, prefetcher: EpochPrefetcher, valid_shard: Any, valid_cache: ExampleCache,
            output: str, rank: int) -> None:
    tcfg, final = cfg.train, loop_config.get("final")
    plateau = Plateau(tcfg)
    plateau.restore(state)  # its counters live in the loop state, beside the epoch and history
    last = _last_epoch(loop_config, cfg)
    what = "final fit epoch" if final else "epoch"
    for epoch in range(state["epoch"] + 1, last + 1):
        if final:
            set_rate(optimizer, final["rates"][epoch - 1])
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
                _log(steps_line(f"{epoch}/{last}", steps, examples * world, seconds, wait, total / steps))
        train_s = time.monotonic() - t0
        state["steps"] = state.get("steps", 0) + steps
        metrics: dict[str, Any] = {"epoch": epoch, "resumes": state["resumes"], "loss": total / max(steps, 1), "train_s": train_s,
                                   "data_wait_s": wait, "steps": steps, "examples": examples * world,
                                   "examples_per_s": examples * world / max(train_s, 1e-9)}
        verdict = "same"
        evaluated = not final and (epoch % tcfg.eval_every == 0 or epoch == tcfg.epochs)
        if evaluated:
            t_val = time.monotonic()
            val = _evaluate_shard(model, valid_shard, cfg, valid_cache, epoch)
            metrics.update({f"val_{name}": value for name, value in val.items() if name != "count"})
            metrics.update({"eval_users": int(val["count"]), "eval_s": time.monotonic() - t_val})
            verdict = plateau.validated(epoch, state["steps"], val[tcfg.select_by])
            if verdict == "halve":
                halve_rate(optimizer, plateau.stalled(), _log)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        if not final:
            metrics.setdefault(cfg.score, plateau.best)  # Ray Train ranks checkpoints by it on every report
        state["epoch"] = epoch
        if not final:
            state.update(plateau.state())
        state["history"].append(metrics)
        _log(
            f"{what} {epoch}/{last} loss {metrics['loss']:.4f} "
            + (f"val {tcfg.select_by} {metrics[cfg.score]:.4f} "
               f"on {metrics['eval_users']:,} users in {metrics['eval_s']:.1f} s " if evaluated else "")
            + (f"lr {metrics['lr']:g} " if final else "")
            + f"({metrics['examples_per_s']:,.0f} examples/s)"
        )
        with tempfile.TemporaryDirectory() as folder:
            ckpt = None
            if rank == 0:
                write_checkpoint(folder, model, vocab, optimizer, state, loop_config.get("lineage"))
                if not final:
                    write_metrics_files(output, state["history"])
                if loop_config.get("tracker") is not None:
                    loop_config["tracker"].log_metrics(metrics, step=epoch, prefix="final_" if final else "")
                ckpt = Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=ckpt)
        if verdict == "stop":
            _log(f"early stop: {plateau.stalled()}, {state['steps'] - plateau.best_step:,} steps "
                 f"(best epoch {plateau.best_epoch})")
            break
