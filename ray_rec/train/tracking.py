"""Experiment tracking on MLflow (the optional ``ray-rec[mlflow]`` extra).

Without a tracking URI nothing here imports MLflow. With one, the driver opens (or, on resume,
reopens) a run and logs the parameters, rank 0 logs every epoch's metrics and learning rate, and
the driver adds the metrics plot, the artifact's location and the final state; `ray-rec
evaluate` adds the test metrics to the run the artifact names. A tracking server that is down
never stops the work: the first failure is logged as a warning, later calls are tried again
quietly (each bounded by `REQUEST_TIMEOUT_S`), and a recovery is logged.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

EXPERIMENT = "ray_rec"
REQUEST_TIMEOUT_S = 10
REQUEST_RETRIES = 1


def tracking_uri(given: str | None) -> str | None:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else None (no tracking)."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or None


def flatten(config: dict[str, Any]) -> dict[str, str]:
    """``{"train": {"lr": 0.001}}`` -> ``{"train.lr": "0.001"}``: MLflow parameters."""
    return {f"{section}.{key}": str(value) for section, values in config.items() for key, value in values.items()}


class Tracker:
    """One MLflow run, written to by whichever process holds this object (it pickles as its URI
    and run id). Every method returns instead of raising when the server fails."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self._client: Any = None
        self._failing = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (Tracker, (self.uri, self.run_id))

    @property
    def client(self) -> Any:
        if self._client is None:
            # Bounded requests: MLflow's defaults (7 retries, 120 s timeout) would hold an epoch for minutes.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(REQUEST_RETRIES))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(REQUEST_TIMEOUT_S))
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @classmethod
    def open(cls, uri: str, run_id: str | None, run_name: str, experiment: str = EXPERIMENT) -> Tracker:
        """Start a new run (``run_id`` None) or reopen one; raises if the server cannot be reached
        at the start, when the user can still fix the URI."""
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ValueError("tracking needs MLflow: pip install 'ray-rec[mlflow]'") from None
        tracker = cls(uri, run_id or "")
        client = tracker.client
        try:
            if run_id:
                client.update_run(run_id, status="RUNNING")
            else:
                found = client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found else client.create_experiment(experiment)
                tracker.run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        except Exception as exc:  # MLflow raises its own and requests' errors
            raise ValueError(f"cannot reach the MLflow tracking server at {uri}: {exc}") from None
        return tracker

    @property
    def ok(self) -> bool:
        """Whether the last call reached the server."""
        return not self._failing

    def _call(self, what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as exc:  # a tracking server's trouble must never stop training
            if not self._failing:
                logger.warning("MLflow at %s failed to %s (%s); training goes on, later calls will try again",
                               self.uri, what, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            self._failing = True
            return
        if self._failing:
            logger.warning("MLflow at %s answers again", self.uri)
            self._failing = False

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters a call
            self._call("log parameters", functools.partial(self.client.log_batch, self.run_id, params=items[start : start + 100]))

    def log_metrics(self, metrics: dict[str, Any], step: int, prefix: str = "") -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(prefix + k.replace("@", "_at_"), float(v), now, step) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self._call("log metrics", lambda: self.client.log_batch(self.run_id, metrics=rows))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call("set tags", lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]))

    def log_file(self, path: str) -> None:
        self._call("upload a file", lambda: self.client.log_artifact(self.run_id, path))

    def finish(self, status: str = "FINISHED") -> None:
        self._call("close the run", lambda: self.client.set_terminated(self.run_id, status=status))


def track_run(lineage: dict[str, Any], uri: str | None, output: str, experiment: str, changes: list[str]) -> Tracker | None:
    """The MLflow run of a training run, when ``uri`` is given: the one ``lineage`` names on that
    server (a resume), else a new one named after ``output`` with every setting as a parameter.
    Records it in ``lineage["tracking"]``."""
    before = lineage.get("tracking") or {}
    if uri is None:
        if before:
            logger.warning("this run was tracked at %s (MLflow run %s): pass --tracking-uri to go on logging it",
                           before["uri"], before["run_id"])
        return None
    tracker = Tracker.open(uri, before.get("run_id") if before.get("uri") == uri else None,
                           run_name=output.rstrip("/").rsplit("/", 1)[-1], experiment=experiment)
    lineage["tracking"] = {"uri": uri, "run_id": tracker.run_id}
    if tracker.run_id != before.get("run_id"):
        tracker.log_params({**flatten(lineage["config"]), "data.uri": lineage["data"]["uri"],
                            "data.manifest_sha256": lineage["data"]["manifest_sha256"],
                            "run.workers": str(lineage["workers"]), "run.device": lineage["device"],
                            "code.commit": str(lineage["code"]["commit"])})
    if changes:
        tracker.set_tags({f"ray_rec.resume_change.{len(lineage['changes'])}": "; ".join(changes)})
    logger.info("tracking: MLflow run %s at %s", tracker.run_id, uri)
    return tracker


def close_run(tracker: Tracker, output: str, model_uri: str, best_row: dict[str, Any]) -> None:
    """The driver's last words to a tracked run: the curves plot, where the artifact is, the best epoch."""
    from ray_rec import storage

    with tempfile.TemporaryDirectory() as tmp:
        plot = os.path.join(tmp, "metrics.png")
        if storage.exists(storage.join(output, "metrics.png")):
            storage.download(storage.join(output, "metrics.png"), plot)
            tracker.log_file(plot)
    tracker.set_tags({"ray_rec.model_uri": model_uri, "ray_rec.output": output})
    tracker.log_metrics({k: v for k, v in best_row.items() if k.startswith("val_") or k == "epoch"}, step=0, prefix="best_")
    tracker.finish()
