"""`ray-rec train`: the driver. Data-parallel training on Ray Train (the worker function is
`ray_rec.train.worker.train_loop_per_worker`), checkpoints, the final fit and the artifact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ray_rec import storage
from ray_rec.config import Config, for_data
from ray_rec.data.manifest import read_manifest
from ray_rec.data.pipeline import limit_memory, read_sequences, training_sequences, validation_sample
from ray_rec.errors import TrainingError
from ray_rec.model.artifact import REQUIRED_FILES
from ray_rec.train.checkpoint import remove_partial_checkpoints
from ray_rec.train.lineage import start_lineage, write_lineage
from ray_rec.train.optim import sparse_items_line
from ray_rec.train.schedule import epoch_rates, final_fit_line, final_fit_split
from ray_rec.train.tracking import EXPERIMENT, close_run, track_run, tracking_uri
from ray_rec.train.worker import batch_line, train_loop_per_worker

logger = logging.getLogger(__name__)

RUN_NAME = "run"
FINAL_RUN_NAME = "final"  # the final fit's checkpoints, beside the split run's
SPLIT_MODEL = "split_model"  # the split run's best model, beside the final fit's `model`: what evaluation measures


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
    split_model_uri: str | None = None  # the split run's best model, when the final fit made the artifact

    @property
    def final_fit(self) -> bool:
        """Whether the artifact was trained again on every click (`train.final_fit`)."""
        return self.split_model_uri is not None


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
    resources_per_worker: dict[str, float] | None = None,
    resume: bool = False,
    fail_once: dict[str, Any] | None = None,
    overwrite: bool = False,
    allow_changes: bool = False,
    tracking: str | None = None,
    experiment: str = EXPERIMENT,
) -> TrainResult:
    """Train on a prepared dataset with ``workers`` data-parallel Ray Train workers.

    Writes checkpoints under ``<output>/run``, ``metrics.jsonl`` and ``metrics.png``, the run's
    ``lineage.json``, and the model artifact to ``<output>/model``: with ``train.final_fit`` (and a
    leave-one-out data set) a model trained again on every click for the best epoch's steps
    (checkpoints under ``<output>/final``; the best epoch's model, which `ray-rec evaluate` measures,
    goes to ``<output>/split_model``), else the best epoch's; its ``info["training"]["fit"]`` says
    which. The returned metrics are the split run's. Every checkpoint and the artifact carry
    the lineage; the loop state's ``placements`` lists each worker's Ray node id, once per (re)start.
    ``resources_per_worker``: what each worker asks Ray for (default one CPU, or one GPU with
    ``use_gpu``), e.g. a custom resource that only one node type has. ``resume`` continues the run in ``output``
    with the same settings (changed ones only with ``allow_changes``). ``tracking``: an MLflow
    tracking URI (default ``MLFLOW_TRACKING_URI``; none: no tracking), runs go to ``experiment``.

    Raises:
        TrainingError: the output already holds a run (without ``resume``), there is nothing to
            resume, or a resume changes the data set, the model or (without ``allow_changes``) a setting.
        OutputError: the output holds files no training run wrote (unless ``overwrite``), or the data.
    """
    if workers < 1:
        raise TrainingError(f"--workers={workers} must be >= 1")
    check_resources(resources_per_worker)
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
    logger.info(batch_line(config.train.batch_for(mcfg), workers, mcfg.example_kind))
    if manifest.has_browse and mcfg.resolved_loss != "bce":
        logger.info("the log's browse events are not used: the %s loss contrasts the next click with the catalog "
                    "(model.loss=bce trains on browsed items as negatives)", mcfg.resolved_loss)
    if (line := sparse_items_line(mcfg, config.train, use_gpu)) is not None:
        logger.info(line)
    sample = validation_sample(manifest, config.train.eval_users)
    kept, shards = len(sample.files["valid"]), len(manifest.files["valid"])
    if kept < shards:
        logger.info("validation: about %s of %s users (%d of %d shards of the valid split; train.eval_users=%d, 0 = all)",
                    f"{round(manifest.counts.users * kept / shards):,}", f"{manifest.counts.users:,}",
                    kept, shards, config.train.eval_users)
    started = time.monotonic()
    limit_memory(config.data.pipeline_memory_mb)
    loop_config = {"config": config.to_dict(), "manifest": manifest, "data": data, "output": output, "fail_once": fail_once,
                   "use_gpu": use_gpu, "resources_per_worker": resources_per_worker, "lineage": lineage, "tracker": tracker, "run_name": RUN_NAME, "final": None}
    result = _fit(loop_config, workers, {
        "train": training_sequences(data, config.data.seed, manifest),
        "valid": read_sequences(data, "valid", sample),
    }, CheckpointConfig(num_to_keep=config.train.keep_checkpoints, checkpoint_score_attribute=config.rank_by,
                        checkpoint_score_order="max"))
    best = result.get_best_checkpoint(config.rank_by, "max") if result.best_checkpoints else result.checkpoint
    if best is None:
        raise TrainingError("training finished without a checkpoint")
    split = final_fit_split(manifest) if config.train.final_fit else None
    model_uri, split_model_uri = storage.join(output, "model"), storage.join(output, SPLIT_MODEL) if split else None
    with best.as_directory() as folder:  # one download: the loop state and the split run's model
        with open(os.path.join(folder, "history.json")) as f:
            state = json.load(f)
        _export(folder, output, split_model_uri or model_uri)
    if config.train.final_fit:
        logger.info(final_fit_line(state["best_epoch"], split))
    if split is not None:
        rates = epoch_rates(state["history"], config.train.lr)[: state["best_epoch"]]
        loop_config.update(run_name=FINAL_RUN_NAME, fail_once=None, final={
            "epochs": state["best_epoch"], "rates": rates, "split": {"best": state["best"], "best_epoch": state["best_epoch"]}})
        final = _fit(loop_config, workers, {
            "train": training_sequences(data, config.data.seed, manifest, split),
        }, CheckpointConfig(num_to_keep=1))
        if final.checkpoint is None:
            raise TrainingError("the final fit finished without a checkpoint")
        with final.checkpoint.as_directory() as folder:
            _export(folder, output, model_uri)
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
        split_model_uri=split_model_uri,
    )



def check_resources(resources: dict[str, float] | None) -> None:
    """Raises TrainingError unless ``resources`` maps resource names to non-negative numbers."""
    if resources is None:
        return
    if not isinstance(resources, dict) or not resources or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for k, v in resources.items()):
        raise TrainingError(f"--resources-per-worker must map resource names to non-negative numbers, "
                            f'like {{"CPU": 1, "train_slot": 1}}; got {resources!r}')


def _fit(loop_config: dict[str, Any], workers: int, datasets: dict[str, Any], checkpoints: CheckpointConfig) -> Any:
    """One Ray Train run of `train_loop_per_worker` (the split run, or the final fit); its result.

    Raises:
        TrainingError: the workers failed more than ``train.max_failures`` times, or the run did.
    """
    config = loop_config["config"]["train"]
    storage_path, fs = _storage(loop_config["output"])
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=loop_config["use_gpu"],
                                     resources_per_worker=loop_config["resources_per_worker"]),
        datasets=datasets,
        run_config=RunConfig(
            name=loop_config["run_name"],
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=config["max_failures"]),
            checkpoint_config=checkpoints,
            worker_runtime_env={"env_vars": _aws_env()},  # type: ignore[call-arg]
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        if loop_config["tracker"] is not None:
            loop_config["tracker"].finish("FAILED")
        raise TrainingError(
            f"training failed after {config['max_failures']} recoveries: {exc}. "
            f"Fix the cause, then rerun with --resume to continue from the last checkpoint"
        ) from None
    if result.error is not None:
        raise TrainingError(f"training failed: {result.error}")
    if removed := remove_partial_checkpoints(storage.join(loop_config["output"], loop_config["run_name"])):
        logger.info("removed %d checkpoint folder(s) a lost worker left half-uploaded: %s", len(removed), ", ".join(removed))
    return result


def _export(folder: str, output: str, model_uri: str) -> None:
    """The artifact files of a checkpoint ``folder`` (without the optimizer and loop state) to
    ``model_uri``, through a staging folder, so a failed copy never leaves a half-written model."""
    staging = storage.join(output, "_model-staging")
    storage.delete_dir(staging)
    with tempfile.TemporaryDirectory() as tmp:
        for name in REQUIRED_FILES:
            shutil.copy(os.path.join(folder, name), tmp)
        storage.copy_dir(tmp, staging)
    storage.delete_dir(model_uri)
    storage.move_dir(staging, model_uri)
