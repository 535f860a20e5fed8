"""MLflow tracking: SQLite by default (file stores are refused by MLflow >= 3.13), any tracking URI by config.

`open_experiment` is the one set-up every stage uses (URI, artifact location, experiment and its kind tag). One
parent run per sweep, one child run per cell (tag `mlflow.parentRunId`), logged from one process (the driver or
rank 0 of a trainer). Metric names are made MLflow-safe (`ndcg@10` → `ndcg_at_10`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retriever.config import TrackingConfig

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. :/]")


def safe_metric_name(name: str) -> str:
    """An MLflow-safe metric name: `ndcg@10` → `ndcg_at_10`, `mrr@10-l2` → `mrr_at_10_l2`.

    MLflow accepts alphanumerics and `_ - . space : /`; `@` becomes `_at_`, `-` and anything else `_`.
    """
    return _UNSAFE.sub("_", name.replace("@", "_at_").replace("-", "_"))


TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def tracking_uri(settings: TrackingConfig, output_dir: str | Path) -> str:
    """The config's `tracking.tracking_uri`, else MLFLOW_TRACKING_URI, else SQLite under ``output_dir``."""
    if settings.tracking_uri:
        return settings.tracking_uri
    if os.environ.get(TRACKING_URI_ENV):
        return os.environ[TRACKING_URI_ENV]
    db = (Path(output_dir) / "mlflow.db").resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def artifact_location(settings: TrackingConfig, output_dir: str | Path, uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: the configured location; for a tracking server, the server's
    own (None: with `mlflow server --serve-artifacts` clients upload over HTTP, so nodes need no shared disk); else
    a folder next to the SQLite database."""
    if settings.artifact_location:
        return settings.artifact_location
    if is_server(uri):
        return None
    path = (Path(output_dir) / "mlartifacts").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def _client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# MLflow 3's UI opens an experiment without this tag in its GenAI view; ours hold training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


@dataclass(frozen=True)
class TrackingTarget:
    """Where a stage logs: the tracking URI and the experiment's id (plain strings: it crosses process bounds)."""

    uri: str
    experiment_id: str


def open_experiment(settings: TrackingConfig, output_dir: str | Path) -> TrackingTarget | None:
    """The configured experiment, created (with its artifact location) when missing and tagged as a model
    development experiment when untagged; None when tracking is off."""
    if not settings.enabled:
        return None
    uri = tracking_uri(settings, output_dir)
    client = _client(uri)
    found = client.get_experiment_by_name(settings.experiment)
    if found is None:
        from mlflow.exceptions import MlflowException

        try:
            experiment_id = client.create_experiment(
                settings.experiment,
                artifact_location=artifact_location(settings, output_dir, uri),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
            return TrackingTarget(uri, experiment_id)
        except MlflowException as error:
            # Two jobs starting together both saw no experiment; the one that lost the race joins the winner's.
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(settings.experiment)
            if found is None:
                raise
    if EXPERIMENT_KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return TrackingTarget(uri, found.experiment_id)


# A failed or killed run's error message; when the run is resumed it moves to the second tag.
ERROR_TAG = "error"
PREVIOUS_ERROR_TAG = "previous_error"


class RunTracker:
    """One MLflow run, created or resumed by id; every call is a no-op when tracking is disabled."""

    def __init__(self, uri: str | None, experiment_id: str | None, run_id: str | None) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.run_id = run_id
        self._client = _client(uri) if uri else None

    @classmethod
    def disabled(cls) -> RunTracker:
        return cls(None, None, None)

    @classmethod
    def of(cls, target: TrackingTarget | None, run_id: str | None) -> RunTracker:
        """The run `run_id` of `target`'s experiment (disabled without either)."""
        if target is None or run_id is None:
            return cls.disabled()
        return cls(target.uri, target.experiment_id, run_id)

    @property
    def enabled(self) -> bool:
        return self._client is not None and self.run_id is not None

    @classmethod
    def start(
        cls,
        uri: str,
        experiment_id: str,
        *,
        run_name: str,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> RunTracker:
        """Resume `run_id` when given (after a restart), else create a run (nested under `parent_run_id`).

        A resumed run's `error` tag (why the previous attempt stopped) becomes `previous_error`."""
        client = _client(uri)
        if run_id is not None:
            error = client.get_run(run_id).data.tags.get(ERROR_TAG)
            if error is not None:
                client.set_tag(run_id, PREVIOUS_ERROR_TAG, error)
                client.delete_tag(run_id, ERROR_TAG)
            client.update_run(run_id, status="RUNNING")
            return cls(uri, experiment_id, run_id)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        return cls(uri, experiment_id, run.info.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(safe_metric_name(k), float(v), stamp, step or 0) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            for key, value in tags.items():
                self._client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def last_step(self, metric: str) -> int:
        """The highest step logged for `metric` in this run (0: none): a resumed run logs only later steps, since
        MLflow keeps every point it is sent, also a second one for the same step."""
        if not self.enabled:
            return 0
        history = self._client.get_metric_history(self.run_id, safe_metric_name(metric))
        return max((m.step for m in history), default=0)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self._client.set_terminated(self.run_id, status=status)

    def fail(self, error: BaseException) -> None:
        """End the run as `status_for(error)`, with the error's message as the tag `error`."""
        if self.enabled:
            self._client.set_tag(self.run_id, ERROR_TAG, error_message(error))
            self.end(status_for(error))


def status_for(error: BaseException) -> str:
    """KILLED for an interrupt (Ctrl-C, or a signal turned into SystemExit), FAILED for anything else."""
    return "KILLED" if isinstance(error, KeyboardInterrupt | SystemExit) else "FAILED"


def error_message(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text if len(text) <= 5000 else text[:4997] + "..."


def end_running_runs(
    target: TrackingTarget, run_name: str, parent_run_id: str | None, error: BaseException
) -> list[str]:
    """End the RUNNING runs named `run_name` (under `parent_run_id`) as `status_for(error)`: runs whose process was
    killed before it could end them (a Ray worker torn down after another rank failed). Returns their ids."""
    client = _client(target.uri)
    name = run_name.replace("'", "\\'")
    query = f"attributes.run_name = '{name}' AND attributes.status = 'RUNNING'"
    if parent_run_id:
        query += f" AND tags.mlflow.parentRunId = '{parent_run_id}'"
    runs = client.search_runs([target.experiment_id], filter_string=query, max_results=100)
    ended = []
    for run in runs:
        if not parent_run_id and "mlflow.parentRunId" in run.data.tags:
            continue
        tracker = RunTracker(target.uri, target.experiment_id, run.info.run_id)
        tracker.fail(error)
        ended.append(run.info.run_id)
    return ended
