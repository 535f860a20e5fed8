"""The scaling report of a sweep's records: `write_report` writes ``results.md``, ``results.csv``, ``fits.json`` and
``plots/*.png`` and returns their paths (`ReportPaths`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from retriever.report.fits import X_AXES, FitTarget, ScalingFit, scaling_fits
from retriever.report.formatting import (
    BEIR_MEAN,
    BEIR_PREFIX,
    dataset_label,
    metric_column,
    metric_label,
    split_metric_column,
)
from retriever.report.markdown import baselines_note, fits_markdown, to_markdown
from retriever.report.plots import plot_scaling, slug
from retriever.report.tables import baseline_table, metric_columns, results_csv_table, results_table


@dataclass(frozen=True)
class ReportPaths:
    """The files of a written report (``plots`` in the order they appear in results.md)."""

    markdown: Path
    csv: Path
    fits: Path
    plots: list[Path] = field(default_factory=list)

    def all(self) -> list[Path]:
        return [self.markdown, self.csv, self.fits, *self.plots]


def _plotted_columns(df: pd.DataFrame, plot_beir_datasets: bool) -> list[str]:
    columns = metric_columns(df)
    has_mean = any(c.startswith(BEIR_MEAN + ":") for c in columns)
    return [c for c in columns if plot_beir_datasets or not has_mean or not c.startswith(BEIR_PREFIX)]


def write_report(
    records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    target: FitTarget = "error",
    min_span: float = 2.0,
    percent: bool = True,
    decimals: int = 1,
    plot_beir_datasets: bool = False,
    title: str = "Scaling report",
    baselines: Sequence[Mapping[str, Any]] = (),
    compare: str | None = None,
    sections: Sequence[str] = (),
) -> ReportPaths:
    """Write results.md, results.csv, fits.json and plots/*.png under ``out_dir``.

    Every metric column is fitted (fits.json); plots cover every metric column except the single BEIR sets when a
    BEIR mean exists (``plot_beir_datasets=True`` plots them too). ``baselines`` (`baseline_table` records) become
    rows of the table marked ``baseline``, never fitted nor plotted; ``compare`` is the metric column the cells are
    compared with them on (default: the first metric column). ``sections`` are Markdown lines placed after the table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = results_table(records)
    fits = scaling_fits(df, target=target, min_span=min_span)
    n_beir = len({split_metric_column(c)[0] for c in metric_columns(df) if c.startswith(BEIR_PREFIX)})
    base = baseline_table(baselines, metric_columns(df)) if baselines else None
    if compare is None:
        compare = next(iter(metric_columns(df)), None)
    elif compare not in metric_columns(df):
        compare = None  # e.g. every cell failed: nothing to compare the baselines with

    csv_path = out / "results.csv"
    results_csv_table(df, base, compare).to_csv(csv_path)
    fits_path = _write_fits(out / "fits.json", fits, target, min_span)
    plotted = _plotted_columns(df, plot_beir_datasets)
    plots = _write_plots(out / "plots", fits, plotted, n_beir, percent)

    failed = int((df["status"] != "ok").sum())
    unit = "×100" if percent else "raw scores"
    md = [
        f"# {title}",
        "",
        f"{len(df)} cells ({failed} failed). Metrics: {unit}, {decimals} decimal(s), best per column in bold. "
        "FLOPs: training FLOPs used. Params: total parameters.",
        *(["", *baselines_note(compare)] if base is not None else []),
        "",
        to_markdown(df, percent=percent, decimals=decimals, baselines=base, compare=compare).rstrip("\n"),
        "",
        *([*sections, ""] if sections else []),
        "## Power-law fits",
        "",
        f"Fitted per paradigm × loss by least squares in log-log space: `{_form(target)}`, x = parameters or "
        f"training FLOPs (lines whose x spans less than ×{min_span:g} are not fitted).",
        "",
        *fits_markdown([f for f in fits if metric_column(f.dataset, f.metric) in plotted], n_beir),
    ]
    if len(plotted) < len(metric_columns(df)):
        md += ["", "The single BEIR sets are summarised by their mean here; fits.json holds their fits too."]
    if plots:
        md += ["", "## Plots", ""]
        md += [f"![{p.stem}](plots/{p.name})" for p in plots]
    md_path = out / "results.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return ReportPaths(markdown=md_path, csv=csv_path, fits=fits_path, plots=plots)


def _form(target: FitTarget) -> str:
    return "1 - metric = a * x**b" if target == "error" else "metric = a * x**b"


def _write_fits(path: Path, fits: Sequence[ScalingFit], target: FitTarget, min_span: float) -> Path:
    payload = {
        "form": _form(target),
        "target": target,
        "method": "ordinary least squares on (ln x, ln y); r2 of that log-log regression",
        "min_span": min_span,
        "fits": [f.to_dict() for f in fits],
    }
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _write_plots(
    folder: Path, fits: Sequence[ScalingFit], columns: Sequence[str], n_beir: int, percent: bool
) -> list[Path]:
    """One plot per metric column and x axis that has points, in column order."""
    plots: list[Path] = []
    for column in columns:
        dataset, metric = split_metric_column(column)
        for axis in X_AXES:
            group = [f for f in fits if (f.dataset, f.metric, f.x_axis) == (dataset, metric, axis) and f.points]
            if group:
                name = f"{slug(dataset)}__{slug(metric)}__vs_{axis}.png"
                label = f"{dataset_label(dataset, n_beir)} {metric_label(metric)}"
                plots.append(plot_scaling(group, folder / name, title=label, percent=percent))
    return plots
