"""The sweep report: the results table, scaling plots and power-law fits of a sweep directory, logged to the sweep's
MLflow parent run, and the best encoder per paradigm registered in the MLflow model registry."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from retriever.config import ExperimentConfig
from retriever.tracking import RunTracker, safe_metric_name

log = logging.getLogger(__name__)


def primary_metric(cfg: ExperimentConfig) -> tuple[str, str]:
    """(dataset, metric) that ranks encoders: the first evaluation dataset's protocol's first metric."""
    from retriever.evaluation import protocol_for_dataset

    dataset = cfg.eval.datasets[0]
    return dataset, protocol_for_dataset(dataset).primary_metric


def best_cells(records: list[dict[str, Any]], dataset: str, metric: str) -> dict[str, dict[str, Any]]:
    """The best finished cell of each paradigm by `metric` on `dataset`."""
    best: dict[str, dict[str, Any]] = {}
    for record in records:
        value = record.get("metrics", {}).get(dataset, {}).get(metric)
        if record.get("status") != "ok" or value is None:
            continue
        current = best.get(record["paradigm"])
        if current is None or value > current["metrics"][dataset][metric]:
            best[record["paradigm"]] = record
    return best


def register_best(
    records: list[dict[str, Any]], cfg: ExperimentConfig, tracking: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Register the best encoder of each paradigm as `<experiment>-<paradigm>` with the alias `champion`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    dataset, metric = primary_metric(cfg)
    client = MlflowClient(tracking_uri=tracking["uri"])
    mlflow.set_registry_uri(tracking["uri"])
    registered = {}
    for paradigm, record in best_cells(records, dataset, metric).items():
        run_id = record.get("tracking_run_id")
        if not run_id:
            continue
        name = f"{cfg.tracking.experiment}-{paradigm}"
        if not _exists(client, name):
            client.create_registered_model(name)
        version = client.create_model_version(name, f"runs:/{run_id}/encoder", run_id=run_id)
        client.set_registered_model_alias(name, "champion", version.version)
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


def write_sweep_report(
    root: Path, cfg: ExperimentConfig, parent_run_id: str | None, tracking: dict[str, Any] | None
) -> dict[str, str]:
    """Write `<sweep>/report/` from the cells' records; log it to the parent run; register the best encoders."""
    from retriever.analysis import write_report
    from retriever.sweep import collect_cells

    records = collect_cells(root)
    paths = write_report(records, Path(root) / "report")
    files = {"markdown": str(paths.markdown), "csv": str(paths.csv), "fits": str(paths.fits)}
    if paths.plots:
        files["plots"] = str(paths.plots[0].parent)
    if tracking and parent_run_id:
        parent = RunTracker(tracking["uri"], tracking["experiment_id"], parent_run_id)
        parent.log_artifact(Path(root) / "report", "report")
        dataset, metric = primary_metric(cfg)
        for paradigm, record in best_cells(records, dataset, metric).items():
            value = record["metrics"][dataset][metric]
            parent.log_metrics({f"best/{paradigm}/{safe_metric_name(metric)}": value})
        registered = register_best(records, cfg, tracking)
        (Path(root) / "report" / "registered.json").write_text(json.dumps(registered, indent=2) + "\n")
        files["registered"] = str(Path(root) / "report" / "registered.json")
    return files
