"""Promotion of a sweep's best encoders in the MLflow model registry: the best cell of each paradigm becomes a new
version of ``<experiment>-<paradigm>`` and takes the alias ``champion``."""

from __future__ import annotations

from typing import Any

from retriever.config import ExperimentConfig
from retriever.report.ranking import best_cells, primary_metric
from retriever.tracking import TrackingTarget

CHAMPION = "champion"


def register_best(
    records: list[dict[str, Any]], cfg: ExperimentConfig, tracking: TrackingTarget
) -> dict[str, dict[str, Any]]:
    """Register the best encoder of each paradigm (its run's ``encoder`` artifact) as `<experiment>-<paradigm>` with
    the alias `champion`; cells without an MLflow run are skipped. Returns what was registered, per paradigm."""
    from mlflow.tracking import MlflowClient

    dataset, metric = primary_metric(cfg)
    # The registry of this sweep's store, named explicitly: a process-wide registry URI (another sweep's, set by
    # `mlflow.set_registry_uri`) must not receive these versions.
    client = MlflowClient(tracking_uri=tracking.uri, registry_uri=tracking.uri)
    registered = {}
    for paradigm, record in best_cells(records, dataset, metric).items():
        run_id = record.get("tracking_run_id")
        if not run_id:
            continue
        name = f"{cfg.tracking.experiment}-{paradigm}"
        if not _exists(client, name):
            client.create_registered_model(name)
        version = client.create_model_version(name, f"runs:/{run_id}/encoder", run_id=run_id)
        client.set_registered_model_alias(name, CHAMPION, version.version)
        client.set_model_version_tag(name, version.version, "cell", record["cell"])
        score = record["metrics"][dataset][metric]
        registered[paradigm] = {"model": name, "version": version.version, "cell": record["cell"], metric: score}
    return registered


def _exists(client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


__all__ = ["CHAMPION", "register_best"]
