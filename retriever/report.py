"""The sweep report: the results table (cells and baselines), scaling plots, power-law fits and the paper's findings
of a sweep directory, logged to the sweep's MLflow parent run, and the best encoder per paradigm registered in the
MLflow model registry.

Baselines are written by the sweep next to its cells: ``<sweep>/baselines/<id>/result.json`` (``{"kind": "bm25" |
"step0", "name", "backbone", "paradigm", "loss": null, "parameters", "flops": 0, "metrics", "status"}``) with their
runs at ``<sweep>/baselines/<id>/eval/<safe dataset>/run.trec``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.config import ExperimentConfig
from retriever.records import BASELINES_DIR, RESULT_FILE
from retriever.tracking import RunTracker, safe_metric_name

if TYPE_CHECKING:
    from retriever.findings import Findings

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


def collect_baselines(root: Path) -> list[dict[str, Any]]:
    """The baseline records of a sweep, ``<sweep>/baselines/<id>/result.json`` (BM25, step-0 encoders), in id order;
    each gets its folder name as ``id`` unless it has one. Their runs follow the cells' layout: ``<id>/eval/``."""
    from retriever.analysis import RecordError

    records = []
    for path in sorted((Path(root) / BASELINES_DIR).glob(f"*/{RESULT_FILE}")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise RecordError(f"{path}: expected a JSON object (a baseline record), got {type(record).__name__}")
        records.append({"id": path.parent.name, **record})
    return records


def baseline_metrics(baselines: list[dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics of the baselines: ``baseline/<id>/<safe dataset>/<metric>`` (e.g. ``baseline/bm25/
    synthetic_test/ndcg_at_10``), finished baselines only."""
    from retriever.records import safe_name

    return {
        safe_metric_name(f"baseline/{record['id']}/{safe_name(dataset)}/{metric}"): float(value)
        for record in baselines
        if record.get("status", "ok") == "ok"
        for dataset, scores in (record.get("metrics") or {}).items()
        for metric, value in scores.items()
    }


def judge_findings_safely(root: Path, records: list[dict[str, Any]], cfg: ExperimentConfig) -> Findings:
    """The findings of the sweep on the primary metric; when the per-query values cannot be read (qrels or run
    files unavailable or malformed), every finding is inconclusive and says why, so the report is still written."""
    from retriever.findings import judge_sweep, unjudged

    dataset, metric = primary_metric(cfg)
    try:
        return judge_sweep(root, records, cfg, dataset, metric)
    except (OSError, LookupError, ValueError) as exc:
        log.warning("findings not judged: %s: %s", type(exc).__name__, exc)
        return unjudged(dataset, metric, f"per-query values could not be read ({type(exc).__name__}: {exc})")


def write_sweep_report(
    root: Path, cfg: ExperimentConfig, parent_run_id: str | None, tracking: dict[str, Any] | None
) -> dict[str, str]:
    """Write `<sweep>/report/` from the cells' and baselines' records, with the paper's findings; log it to the
    parent run (baseline metrics, findings as tags and metrics, the report folder); register the best encoders."""
    from retriever.analysis import metric_column, write_report
    from retriever.findings import findings_summary, write_findings
    from retriever.sweep import collect_cells

    report_dir = Path(root) / "report"
    records = collect_cells(root)
    baselines = collect_baselines(root)
    dataset, metric = primary_metric(cfg)
    findings = judge_findings_safely(Path(root), records, cfg)
    logged = write_findings(report_dir, findings)
    paths = write_report(
        records,
        report_dir,
        baselines=baselines,
        compare=metric_column(dataset, metric),
        sections=findings_summary(findings, link="findings.md"),
    )
    files = {
        "markdown": str(paths.markdown),
        "csv": str(paths.csv),
        "fits": str(paths.fits),
        "findings": str(report_dir / "findings.md"),
    }
    if paths.plots:
        files["plots"] = str(paths.plots[0].parent)
    if tracking and parent_run_id:
        parent = RunTracker(tracking["uri"], tracking["experiment_id"], parent_run_id)
        parent.log_artifact(report_dir, "report")
        for paradigm, record in best_cells(records, dataset, metric).items():
            value = record["metrics"][dataset][metric]
            parent.log_metrics({f"best/{paradigm}/{safe_metric_name(metric)}": value})
        baseline_values = baseline_metrics(baselines)
        if baseline_values:
            parent.log_metrics(baseline_values)
        parent.set_tags(logged["tags"])
        if logged["metrics"]:
            parent.log_metrics(logged["metrics"])
        registered = register_best(records, cfg, tracking)
        (report_dir / "registered.json").write_text(json.dumps(registered, indent=2) + "\n")
        files["registered"] = str(report_dir / "registered.json")
    return files
