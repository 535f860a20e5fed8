"""The report of a sweep directory: the results table (cells and baselines), scaling plots, power-law fits, the
paper's findings and the significance of the best cells, written to ``<sweep>/report/``, logged to the sweep's MLflow
parent run, and the best encoder per paradigm promoted in the MLflow model registry.

Baselines are written by the sweep next to its cells: ``<sweep>/baselines/<id>/result.json`` (``{"kind": "bm25" |
"step0", "name", "backbone", "paradigm", "loss": null, "parameters", "flops": 0, "metrics", "status"}``) with their
runs at ``<sweep>/baselines/<id>/eval/<safe dataset>/run.trec``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from retriever.config import ExperimentConfig
from retriever.outputs import atomic_directory
from retriever.records import collect_baselines, collect_cells
from retriever.report.baselines import baseline_metrics
from retriever.report.findings import Findings, judge_sweep, unjudged
from retriever.report.findings_page import findings_summary, write_findings
from retriever.report.formatting import metric_column
from retriever.report.promotion import register_best
from retriever.report.ranking import best_cells, primary_metric
from retriever.report.scaling import write_report
from retriever.report.significance import compare_best, significance_summary
from retriever.tracking import RunTracker, TrackingTarget, safe_metric_name

log = logging.getLogger(__name__)

# Per-query values need the qrels and every run file; without them the report is still written.
_UNREADABLE = (OSError, LookupError, ValueError)


def judge_findings_safely(root: Path, records: list[dict[str, Any]], cfg: ExperimentConfig) -> Findings:
    """The findings of the sweep on the primary metric; when the per-query values cannot be read (qrels or run
    files unavailable or malformed), every finding is inconclusive and says why."""
    dataset, metric = primary_metric(cfg)
    try:
        return judge_sweep(root, records, cfg, dataset, metric)
    except _UNREADABLE as exc:
        log.warning("findings not judged: %s: %s", type(exc).__name__, exc)
        return unjudged(dataset, metric, f"per-query values could not be read ({type(exc).__name__}: {exc})")


def compare_best_safely(root: Path, records: list[dict[str, Any]], cfg: ExperimentConfig) -> dict[str, Any]:
    """`compare_best` on the primary metric; when the qrels or runs cannot be read, no comparisons and why."""
    from retriever.data.catalog import resolve_dataset
    from retriever.data.sources import load_source

    dataset, metric = primary_metric(cfg)
    try:
        qrels = load_source(resolve_dataset(dataset, cfg)).qrels()
        return compare_best(root, records, qrels, dataset=dataset, metric=metric)
    except _UNREADABLE as exc:
        log.warning("best cells not compared: %s: %s", type(exc).__name__, exc)
        reason = f"per-query values could not be read ({type(exc).__name__}: {exc})"
        return {"dataset": dataset, "metric": metric, "comparisons": [], "missing": [reason]}


def write_sweep_report(
    root: Path, cfg: ExperimentConfig, parent_run_id: str | None, tracking: TrackingTarget | None
) -> dict[str, str]:
    """Write `<sweep>/report/` from the cells' and baselines' records, with the paper's findings and the
    significance of the best cells; log it to the parent run and register the best encoders (with tracking)."""
    root = Path(root)
    report_dir = root / "report"
    records = collect_cells(root)
    baselines = collect_baselines(root)
    dataset, metric = primary_metric(cfg)
    findings = judge_findings_safely(root, records, cfg)
    significance = compare_best_safely(root, records, cfg)
    # Written whole into a temporary folder that replaces the previous report: a failure keeps the old one.
    with atomic_directory(report_dir, overwrite=True, what="the sweep report") as work:
        logged = write_findings(work, findings)
        (work / "significance.json").write_text(json.dumps(significance, indent=2) + "\n")
        paths = write_report(
            records,
            work,
            baselines=baselines,
            compare=metric_column(dataset, metric),
            sections=[*findings_summary(findings, link="findings.md"), "", *significance_summary(significance)],
        )
        files = {
            "markdown": paths.markdown,
            "csv": paths.csv,
            "fits": paths.fits,
            "findings": work / "findings.md",
            "significance": work / "significance.json",
        }
        if paths.plots:
            files["plots"] = paths.plots[0].parent
        if tracking and parent_run_id:
            _log_to_parent(RunTracker.of(tracking, parent_run_id), work, records, baselines, logged, cfg)
            registered = register_best(records, cfg, tracking)
            (work / "registered.json").write_text(json.dumps(registered, indent=2) + "\n")
            files["registered"] = work / "registered.json"
    return {key: str(report_dir / Path(path).relative_to(work)) for key, path in files.items()}


def _log_to_parent(
    parent: RunTracker,
    report_dir: Path,
    records: list[dict[str, Any]],
    baselines: list[dict[str, Any]],
    findings: dict[str, dict[str, Any]],
    cfg: ExperimentConfig,
) -> None:
    """The report folder, the best value per paradigm, the baselines' metrics and the findings (tags, metrics)."""
    dataset, metric = primary_metric(cfg)
    parent.log_artifact(report_dir, "report")
    for paradigm, record in best_cells(records, dataset, metric).items():
        value = record["metrics"][dataset][metric]
        parent.log_metrics({f"best/{paradigm}/{safe_metric_name(metric)}": value})
    baseline_values = baseline_metrics(baselines)
    if baseline_values:
        parent.log_metrics(baseline_values)
    parent.set_tags(findings["tags"])
    if findings["metrics"]:
        parent.log_metrics(findings["metrics"])


__all__ = ["compare_best_safely", "judge_findings_safely", "write_sweep_report"]
