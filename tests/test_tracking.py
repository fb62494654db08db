"""Runs a team can compare: lineage in every artifact, checked resumes, MLflow against a real server."""

from __future__ import annotations

import json
import threading
import time

import pytest

from ray_rec import load_model, storage
from ray_rec.config import load_config
from ray_rec.errors import TrainingError

# ------------------------------------------------------------------------------- configuration


def test_cutoffs_and_the_selection_metric_are_configuration():
    config = load_config(None, {"eval.ks": [20, 1, 5], "train.select_by": "HR@1"})
    assert config.eval.ks == (1, 5, 20) and config.score == "val_HR@1"
    assert config.to_dict()["eval"] == {"ks": [1, 5, 20]}
    assert load_config(None, {"train.select_by": "MRR"}).score == "val_MRR"
    for bad, says in (({"train.select_by": "HR@3"}, "needs 3 among eval.ks"), ({"train.select_by": "AUC"}, "HR@k"),
                      ({"eval.ks": [0]}, "eval.ks"), ({"eval.ks": "ten"}, "whole numbers"), ({"evaluation.ks": [5]}, "unknown")):
        with pytest.raises(ValueError, match=says):
            load_config(None, bad)


# ------------------------------------------------------------------------------------- resume


def _lineage(**changes):
    from ray_rec.config import ModelConfig
    from ray_rec.train.lineage import run_lineage

    config = load_config(None, changes)
    from .conftest import make_manifest

    manifest = make_manifest(users=10, items=5)
    return run_lineage(config, ModelConfig(num_items=5, dim=config.model.dim, block=config.model.block), "s3://b/ds", manifest, 2, "cpu")


def test_a_resume_refuses_another_data_set_or_model_and_changed_settings_unless_allowed():
    from ray_rec.train.lineage import resume_lineage

    stored = _lineage()
    lineage, changes = resume_lineage(stored, _lineage(), allow_changes=False)
    assert changes == [] and lineage["started"] == stored["started"]  # the same run goes on
    other_data = {**_lineage(), "data": {**stored["data"], "manifest_sha256": "0" * 16}}
    with pytest.raises(TrainingError, match="manifest"):
        resume_lineage(stored, other_data, allow_changes=True)
    with pytest.raises(TrainingError, match=r"model\.dim: 64 -> 32"):
        resume_lineage(stored, _lineage(**{"model.dim": 32}), allow_changes=True)
    with pytest.raises(TrainingError, match=r"train\.lr: 0\.001 -> 0\.01.*--allow-changes"):
        resume_lineage(stored, _lineage(**{"train.lr": 0.01}), allow_changes=False)
    lineage, changes = resume_lineage(stored, _lineage(**{"train.lr": 0.01, "train.epochs": 5}), allow_changes=True)
    assert changes == ["train.epochs: 200 -> 5", "train.lr: 0.001 -> 0.01"]
    assert lineage["changes"][-1]["settings"] == changes and lineage["config"]["train"]["lr"] == 0.01
    # A run stored before `model.block` existed was built pre-norm: it resumes as pre_norm, not as today's default.
    before = _lineage(**{"model.block": "pre_norm"})
    del before["config"]["model"]["block"]
    assert resume_lineage(before, _lineage(**{"model.block": "pre_norm"}), allow_changes=False)[1] == []
    with pytest.raises(TrainingError, match=r"model\.block: 'pre_norm' -> 'post_norm'"):
        resume_lineage(before, _lineage(**{"model.block": "post_norm"}), allow_changes=True)


@pytest.mark.slow
def test_resume_of_a_real_run_is_checked_before_training_starts(trained, s3_data, tiny_data, s3):
    from ray_rec.train.trainer import train

    stored = json.loads(storage.read_bytes(storage.join(trained.output, "lineage.json")))
    same = {"model.dim": 16, "train.epochs": 3, "train.batch_size": 64}
    with pytest.raises(TrainingError, match="the run was trained on s3://"):
        train(tiny_data, trained.output, load_config(None, same), workers=2, resume=True)  # another data set
    with pytest.raises(TrainingError, match="model differs"):
        train(s3_data, trained.output, load_config(None, {**same, "model.dim": 8}), workers=2, resume=True)
    with pytest.raises(TrainingError, match="train.batch_size: 64 -> 32"):
        train(s3_data, trained.output, load_config(None, {**same, "train.batch_size": 32}), workers=2, resume=True)
    assert json.loads(storage.read_bytes(storage.join(trained.output, "lineage.json"))) == stored  # untouched


# ------------------------------------------------------------------------------------ lineage


def _check_lineage(lineage: dict, data: str, workers: int) -> None:
    from ray_rec.data.manifest import read_manifest
    from ray_rec.train.lineage import manifest_fingerprint

    assert set(lineage["config"]) == {"model", "data", "train", "eval"}
    assert lineage["config"]["model"]["num_items"] > 0 and lineage["config"]["model"]["max_len"] == 50  # as trained
    assert lineage["data"] == {**lineage["data"], "uri": data, "manifest_sha256": manifest_fingerprint(read_manifest(data))}
    assert lineage["code"]["ray_rec"] and lineage["code"]["commit"]  # this checkout is a git repository
    assert lineage["versions"]["ray"].startswith("2.") and lineage["versions"]["torch"]
    assert lineage["seeds"] == {"data": 0, "train": 0} and lineage["workers"] == workers and lineage["device"] == "cpu"


@pytest.mark.slow
def test_an_s3_run_records_its_lineage_in_every_checkpoint_and_the_artifact(trained, s3_data, s3):
    rec = load_model(trained.model_uri)
    _check_lineage(rec.info["lineage"], s3_data, workers=2)
    assert rec.info["version"] == rec.version and rec.info["training"]["best_epoch"] == trained.best_epoch
    checkpoints = [k for k in storage.list_files(storage.join(trained.output, "run")) if k.endswith("/config.json")]
    assert checkpoints
    for key in checkpoints:
        meta = json.loads(storage.read_bytes(storage.join(trained.output, "run", key)))
        assert meta["lineage"]["data"] == rec.info["lineage"]["data"]


# ------------------------------------------------------------------------------------- MLflow


def _run(mlflow_server, run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    return client, client.get_run(run_id)


@pytest.mark.slow
def test_a_tracked_local_run_is_in_mlflow_and_its_artifact_names_the_run(ray_cluster, tiny_data, mlflow_server, tmp_path):
    from ray_rec.predict.evaluate import evaluate_model, log_to_run
    from ray_rec.train.trainer import train

    config = load_config(None, {"model.dim": 16, "train.epochs": 2, "train.batch_size": 64, "eval.ks": [5, 10]})
    result = train(tiny_data, str(tmp_path / "run"), config, workers=1, tracking=mlflow_server.uri, experiment="tests")
    rec = load_model(result.model_uri)
    _check_lineage(rec.info["lineage"], tiny_data, workers=1)
    tracked = rec.info["lineage"]["tracking"]
    assert tracked == result.tracking and tracked["uri"] == mlflow_server.uri
    client, run = _run(mlflow_server, tracked["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    params = run.data.params
    assert params["train.lr"] == "0.001" and params["eval.ks"] == "[5, 10]" and params["data.uri"] == tiny_data
    assert params["code.commit"] == rec.info["lineage"]["code"]["commit"]
    for metric in ("loss", "lr", "val_NDCG_at_10", "val_HR_at_5"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2], metric
    assert "val_NDCG_at_20" not in run.data.metrics  # only the configured cut-offs
    assert run.data.tags["ray_rec.model_uri"] == result.model_uri
    assert "metrics.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    # `ray-rec evaluate` adds the test metrics to the same run
    # (the split run's model: the artifact is the final fit, which saw the test targets)
    for metric in ("final_loss", "final_lr"):  # the final fit's epochs, in the same run
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == list(range(1, result.best_epoch + 1))
    evaluated = evaluate_model(tiny_data, result.split_model_uri, split="test")
    assert set(evaluated["full_ranking"]) >= {"HR@5", "NDCG@10"} and "NDCG@20" not in evaluated["full_ranking"]
    assert log_to_run(evaluated, mlflow_server.uri)
    _, run = _run(mlflow_server, tracked["run_id"])
    assert run.data.metrics["test_NDCG_at_10"] == pytest.approx(evaluated["full_ranking"]["NDCG@10"])


@pytest.mark.slow
def test_training_goes_on_when_the_tracking_server_goes_down(ray_cluster, tiny_data, mlflow_server, tmp_path):
    """The server is killed once the first epoch's metrics reach it: every epoch still trains and
    the artifact is written; back up, the server holds the epochs logged before it went down."""
    from mlflow.tracking import MlflowClient

    from ray_rec.train.trainer import train

    config = load_config(None, {"model.dim": 16, "train.epochs": 8, "train.batch_size": 64})
    client, seen = MlflowClient(mlflow_server.uri), threading.Event()

    def kill_after_epoch_one() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not seen.is_set():
            try:
                runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.mlflow.runName = 'down'")
                if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                    seen.set()
                    mlflow_server.stop()
                    return
            except Exception:  # the server may still be starting the run
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_after_epoch_one)
    watcher.start()
    try:
        result = train(tiny_data, str(tmp_path / "down"), config, workers=1, tracking=mlflow_server.uri)
    finally:
        watcher.join()
        mlflow_server.start()
    assert seen.is_set()
    assert result.epochs_run == 8 and load_model(result.model_uri).info["lineage"]["tracking"] == result.tracking
    assert result.tracking is not None
    history = MlflowClient(mlflow_server.uri).get_metric_history(result.tracking["run_id"], "loss")
    assert 1 <= len(history) < 8
