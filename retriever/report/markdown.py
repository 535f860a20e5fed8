"""The Markdown of the results page: the paper-style results table (metrics ×100 with one decimal as in the paper,
41.7, best value of each column in bold, FLOPs as ``6.2e19``, parameters as ``1.24B``; ``percent=False,
decimals=4`` gives raw scores, 0.4170), the table of power-law fits and the note on baseline rows."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from retriever.report.fits import ScalingFit
from retriever.report.formatting import (
    BEIR_PREFIX,
    MISSING,
    dataset_label,
    format_count,
    format_flops,
    format_metric,
    md_cell,
    metric_label,
    percent_of,
    split_metric_column,
)
from retriever.report.tables import INDEX_NAMES, baseline_comparison, baseline_values, bm25_reference, metric_columns


def to_markdown(
    df: pd.DataFrame,
    percent: bool = True,
    decimals: int = 1,
    bold_best: bool = True,
    baselines: pd.DataFrame | None = None,
    compare: str | None = None,
) -> str:
    """The results table (from `results_table`) as a Markdown table.

    Columns: Backbone, Paradigm, Loss, Params, FLOPs, Steps, then one per (dataset, metric). Metric cells of failed
    cells read ``failed``, missing values ``–``. With ``bold_best`` the best formatted value of every metric column
    (ties included) is bold.

    ``baselines`` (from `baseline_table`) are appended below the cells with ``baseline`` in the Loss column (BM25:
    Backbone ``BM25``; step 0: ``baseline (step 0)``); they are never bold. With ``compare`` (a metric column) two
    columns follow: the value as a percentage of BM25's (`baseline_comparison`) and whether the cell beats its
    step-0 row (``yes`` / ``no``).
    """
    if list(df.index.names) != INDEX_NAMES:
        raise ValueError(f"expected a table from results_table (index {INDEX_NAMES}), got index {df.index.names}")
    baselines = baselines if baselines is not None and len(baselines) else None
    columns = metric_columns(df)
    n_beir = len({split_metric_column(c)[0] for c in columns if c.startswith(BEIR_PREFIX)})
    header = ["Backbone", "Paradigm", "Loss", "Params", "FLOPs", "Steps"]
    header += [f"{dataset_label(d, n_beir)} {metric_label(m)}" for d, m in map(split_metric_column, columns)]
    if not columns:
        header.append("Status")
    comparison = None
    if compare is not None and baselines is not None:
        comparison = baseline_comparison(df, baselines, compare)
        header += [f"{metric_label(split_metric_column(compare)[1])} vs BM25", "> step 0"]
    lines = [_row(header), "|" + "|".join([":---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    lines += _cell_rows(df, columns, _metric_cells(df, columns, percent, decimals, bold_best), comparison)
    if baselines is not None:
        vs_bm25 = None
        if comparison is not None:
            vs_bm25 = baseline_values(baselines, compare) / bm25_reference(baselines, compare)
        lines += _baseline_rows(baselines, columns, percent, decimals, vs_bm25)
    return "\n".join(lines) + "\n"


def _row(values: Sequence[object]) -> str:
    return "| " + " | ".join(md_cell(str(v)) for v in values) + " |"


def _numbers(row: pd.Series) -> list[str]:
    steps = MISSING if pd.isna(row["steps"]) else f"{int(row['steps']):,}"
    return [format_count(row["parameters"]), format_flops(row["flops"]), steps]


def _metric_cells(
    df: pd.DataFrame, columns: Sequence[str], percent: bool, decimals: int, bold_best: bool
) -> dict[str, list[str]]:
    """The formatted metric values of every column, the best of each (ties included) bold when `bold_best`."""
    failed = df["status"] != "ok"
    cells = {c: [format_metric(v, percent, decimals) for v in df[c]] for c in columns}
    if bold_best:
        for c in columns:
            values = [float(s) for s, bad in zip(cells[c], failed) if s != MISSING and not bad]
            if values:
                best = max(values)
                cells[c] = [f"**{s}**" if s != MISSING and float(s) == best else s for s in cells[c]]
    return cells


def _cell_rows(
    df: pd.DataFrame, columns: Sequence[str], cells: dict[str, list[str]], comparison: pd.DataFrame | None
) -> list[str]:
    lines = []
    for i, ((backbone, paradigm, loss), row) in enumerate(df.iterrows()):
        failed = row["status"] != "ok"
        out = [backbone, paradigm, loss.upper(), *_numbers(row)]
        out += ["failed" if failed else cells[c][i] for c in columns]
        if not columns:
            out.append(str(row["status"]))
        if comparison is not None:
            beats = comparison["beats_step0"].iloc[i]
            out += [
                percent_of(comparison["vs_bm25"].iloc[i]),
                MISSING if pd.isna(beats) else "yes" if beats else "no",
            ]
        lines.append(_row(out))
    return lines


def _baseline_rows(
    baselines: pd.DataFrame, columns: Sequence[str], percent: bool, decimals: int, vs_bm25: pd.Series | None
) -> list[str]:
    lines = []
    for name, row in baselines.iterrows():
        is_bm25 = row["kind"] == "bm25"
        out = [
            "BM25" if is_bm25 else (row["backbone"] or name),
            row["paradigm"] or MISSING,
            "baseline" if is_bm25 else "baseline (step 0)",
            *_numbers(row),
        ]
        ok = row["status"] == "ok"
        out += [format_metric(row[c], percent, decimals) if ok else "failed" for c in columns]
        if not columns:
            out.append(str(row["status"]))
        if vs_bm25 is not None:
            out += [percent_of(vs_bm25[name]), MISSING]
        lines.append(_row(out))
    return lines


def fits_markdown(fits: Sequence[ScalingFit], n_beir: int) -> list[str]:
    """The table of the fits that were made, and how many lines were not fitted."""
    made = [f for f in fits if f.law is not None]
    lines = [
        "| Dataset | Metric | Paradigm | Loss | x | a | b | R² | cells |",
        "|:---|:---|:---|:---|:---|---:|---:|---:|---:|",
    ]
    for f in made:
        assert f.law is not None
        lines.append(
            f"| {dataset_label(f.dataset, n_beir)} | {metric_label(f.metric)} | {f.paradigm} | {f.loss.upper()} | "
            f"{f.x_axis} | {f.law.a:.4g} | {round(f.law.b, 4) + 0.0:+.4f} | {f.law.r2:.4f} | {f.law.n_points} |"
        )
    skipped = len(fits) - len(made)
    note = [f"\n{skipped} line(s) not fitted; fits.json gives the reason for each."] if skipped else []
    return (lines if made else ["No line could be fitted."]) + note


def baselines_note(compare: str | None) -> list[str]:
    """What the baseline rows (and the comparison columns on `compare`) of the results table are."""
    note = (
        "Rows marked `baseline` are not cells: BM25 and the untrained (step-0) encoder of each backbone and paradigm; "
        "they are neither fitted nor plotted, and never bold."
    )
    if compare is not None:
        dataset, metric = split_metric_column(compare)
        note += (
            f" *{metric_label(metric)} vs BM25*: {dataset_label(dataset)} {metric_label(metric)} as a percentage of "
            "BM25's; *> step 0*: whether a cell is above its step-0 row."
        )
    return [note]
