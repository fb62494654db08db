"""What every Ray Train worker runs: its shard of the Ray Data pipeline, the model wrapped with
``prepare_model`` (DDP; gloo on CPU, nccl on GPU), the plain `train_step`, validation on its share
of the validation users, and reports. Rank 0 writes checkpoints and the metrics file.

One function serves both fits of a run: the split run (validation) and the final fit
(``loop_config["final"]``: every click, a fixed number of epochs at the split run's rates); the
epochs themselves are `ray_rec.train.fit.fit`'s.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from ray_rec import storage
from ray_rec.config import Config, config_from_dict, for_data
from ray_rec.data.examples import BUCKET_WINDOW, browse_width, collate, evaluation_examples
from ray_rec.data.pipeline import example_chunks
from ray_rec.device import device_name, model_device
from ray_rec.metrics import RankingMetrics
from ray_rec.model.interest_model import InterestModel
from ray_rec.predict.ranking import evaluate
from ray_rec.progress import Progress
from ray_rec.ray_session import usable_cores
from ray_rec.train.checkpoint import newest_complete_checkpoint, read_checkpoint, write_checkpoint
from ray_rec.train.feed import EpochPrefetcher, ExampleCache, epoch_chunks, in_step, training_batches
from ray_rec.train.fit import fit, new_state
from ray_rec.train.optim import make_optimizer, sparse_item_gradients
from ray_rec.train.report import write_metrics_files
from ray_rec.vocab import Vocabulary

logger = logging.getLogger("ray_rec.train.trainer")  # the driver's progress logger: one name for both


def worker_batch(batch_size: int, workers: int) -> int:
    """Examples each of ``workers`` data-parallel workers takes a step. ``train.batch_size`` is the
    whole step's (all workers together), split evenly and rounded up where the workers do not
    divide it, so the worker count leaves the optimisation as it is: the same batch, learning
    rate and steps an epoch (a batch that grows with the workers lost quality; BENCHMARKS.md).

    Example:
        >>> worker_batch(128, 2), worker_batch(128, 3), worker_batch(2, 4)
        (64, 43, 1)
    """
    return -(-batch_size // workers)


def batch_line(batch_size: int, workers: int, kind: str = "windows") -> str:
    """The first-lines note on how a step's batch of ``kind`` (prefixes or windows) is split over the workers.

    Example:
        >>> batch_line(128, 3)
        'batch: 129 windows a step, 43 on each of 3 workers (train.batch_size=128, rounded up to a multiple of 3)'
    """
    each = worker_batch(batch_size, workers)
    if workers == 1:
        return f"batch: {batch_size} {kind} a step (1 worker)"
    rounded = f", rounded up to a multiple of {workers}" if each * workers != batch_size else ""
    return f"batch: {each * workers} {kind} a step, {each} on each of {workers} workers (train.batch_size={batch_size}{rounded})"


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
    sums = full.sums.to(model_device(model), copy=True)  # NCCL reduces device tensors only
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    merged = RankingMetrics(full.ks)
    merged.merge(sums)
    return merged.result()


def _worker_nodes() -> list[str]:
    """The Ray node id of every worker of this run, by rank: one entry of the loop state's
    ``placements``, which grows by one at each (re)start, so a run shows where it trained."""
    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


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
    mcfg = for_data(cfg.model, manifest)
    # train.batch_size is the whole step's: from here on, cfg holds this worker's share of it.
    cfg = replace(cfg, train=replace(cfg.train, batch_size=worker_batch(cfg.train.batch_for(mcfg), world)))
    torch.manual_seed(cfg.train.seed + rank)
    threads = _threads_per_worker(loop_config["use_gpu"])
    torch.set_num_threads(threads)
    _log(f"{threads} intra-op threads per worker (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")
    vocab = Vocabulary.load(loop_config["data"])
    device = ray.train.torch.get_device()
    _log(f"device: {device_name(device)}, {cfg.train.precision}")
    model = InterestModel(mcfg)
    model.features.set_item_side(torch.as_tensor(vocab.side_matrix()))
    model.to(device)  # before the optimizer and a checkpoint's state: both then live on the device
    model.features.item.sparse = sparse_item_gradients(mcfg, cfg.train, loop_config["use_gpu"])
    optimizer = make_optimizer(model, cfg.train)
    final = loop_config.get("final")
    state: dict[str, Any] = {**new_state(), "fit": "final" if final else "split", **(final["split"] if final else {})}
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
    state["placements"] = [*state.get("placements", []), _worker_nodes()]
    ddp_model = ray.train.torch.prepare_model(model)
    # The workers' step agreement (`in_step`) runs on the CPU: a gloo group beside NCCL's on GPUs.
    step_group = dist.new_group(backend="gloo") if world > 1 and loop_config["use_gpu"] else None
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = None if final else ray.train.get_dataset_shard("valid")  # the final fit does not validate
    train_cache, valid_cache = ExampleCache(cfg.data.cache_mb), ExampleCache(cfg.data.cache_mb)
    chunk_rows = BUCKET_WINDOW * cfg.train.batch_for(mcfg)
    max_browse = browse_width(manifest, mcfg.resolved_loss)
    last = int(final["epochs"]) if final else cfg.train.epochs
    prefetcher = EpochPrefetcher(
        lambda e: train_cache.epoch(lambda: epoch_chunks(example_chunks(train_shard, manifest, mcfg, max_browse, chunk_rows),
                                                         cfg, e, rank), chunk_rows,
                                    np.random.default_rng([cfg.data.seed, e, rank, 1])),
        state["epoch"] + 1, last)

    def batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        mine = training_batches(prefetcher.epoch(), cfg, epoch, rank)
        return in_step(mine, step_group, lambda n: _log(f"epoch {epoch}: {n:,} examples of the longer shards left out "
                                                         "(the workers step together)")) if world > 1 else mine

    def after_epoch(metrics: dict[str, Any], verdict: str) -> None:
        with tempfile.TemporaryDirectory() as folder:
            ckpt = None
            if rank == 0:
                write_checkpoint(folder, model, vocab, optimizer, state, loop_config.get("lineage"))
                if not final:
                    write_metrics_files(output, state["history"])
                if loop_config.get("tracker") is not None:
                    loop_config["tracker"].log_metrics(metrics, step=metrics["epoch"], prefix="final_" if final else "")
                ckpt = Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=ckpt)

    try:
        fit(ddp_model, optimizer, cfg, state, batches, last, _log,
            validate=None if final else lambda epoch: _evaluate_shard(model, valid_shard, cfg, valid_cache, epoch),
            rates=final["rates"] if final else None, after_epoch=after_epoch,
            before_step=lambda epoch, step: _maybe_fail(loop_config.get("fail_once"), epoch, step), world=world)
    finally:
        prefetcher.close()
