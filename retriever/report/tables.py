"""The results table of a sweep and its baseline rows, as DataFrames (results.csv is written from them).

**Table.** `results_table` gives one row per backbone × paradigm × loss (index levels ``backbone``, ``paradigm``,
``loss``), sorted by parameters, then paradigm and loss in the order of `retriever.config.Paradigm` / ``LossName``
(dense, sparse; cl, kd, cl+kd). Columns: ``status``, ``parameters``, ``trainable_parameters``, ``flops`` (training
FLOPs used), ``steps``, then one column per (dataset, metric) named ``"<dataset>:<metric>"`` (`metric_column`),
datasets in the order MS MARCO dev, DL19, DL20, other datasets, BEIR sets, and metrics in their protocol's order.
With two or more ``beir/*`` datasets, ``"beir-mean:<metric>"`` columns hold the unweighted mean over them
(`retriever.evaluation.beir_mean`); a cell that lacks any of those sets gets NaN there rather than a mean over a
different subset. Failed cells stay in the table and are left out of fits and plots.

**Baselines.** `baseline_table` reads baseline records (BM25 and each backbone × paradigm's untrained encoder) into
rows indexed by name with the same metric columns; `baseline_comparison` gives each cell's value as a fraction of
BM25's (``vs_bm25``) and whether it beats its step-0 row (``beats_step0``). results.csv (`results_csv_table`) has a
leading ``row`` column (``cell``, ``bm25``, ``step0``) and, with baselines, their rows and those two comparison
columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from retriever.data.sources import MSMARCO
from retriever.evaluation import beir_mean, protocol_for_dataset
from retriever.records import RecordError
from retriever.report.formatting import (
    BEIR_MEAN,
    BEIR_PREFIX,
    LOSSES,
    PARADIGMS,
    metric_column,
    order_key,
)
from retriever.report.validation import (
    BASELINE_KINDS,
    INT_FIELDS,
    NUMBER_COLUMNS,
    parse_baseline,
    parse_cell,
)

INDEX_NAMES = ["backbone", "paradigm", "loss"]

_DATASET_ORDER = (MSMARCO["dev"], MSMARCO["dl19"], MSMARCO["dl20"])


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The (dataset, metric) columns of a results table, in table order."""
    return [c for c in df.columns if ":" in str(c)]


def _dataset_key(dataset: str) -> tuple[int, int, str]:
    if dataset in _DATASET_ORDER:
        return (0, _DATASET_ORDER.index(dataset), "")
    if dataset == BEIR_MEAN:
        return (3, 0, "")
    return (2 if dataset.startswith(BEIR_PREFIX) else 1, 0, dataset)


def _metric_order(dataset: str, metrics: Iterable[str]) -> list[str]:
    try:
        known: Sequence[str] = protocol_for_dataset(dataset).metrics
    except KeyError:  # a dataset without a default protocol: alphabetical
        known = ()
    return sorted(metrics, key=lambda m: order_key(m, known))


def results_table(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per backbone × paradigm × loss cell; see the module docstring for columns and order."""
    if not records:
        raise RecordError("no result records; the sweep produced no cells")
    cells = [parse_cell(record, i) for i, record in enumerate(records)]
    seen: dict[tuple[str, str, str], str] = {}
    for cell in cells:
        key = (cell.backbone, cell.paradigm, cell.loss)
        if key in seen:
            raise RecordError(f"{cell.where} duplicates {seen[key]}: one record per backbone × paradigm × loss")
        seen[key] = cell.where
    cells.sort(
        key=lambda c: (
            math.inf if c.numbers["parameters"] is None else c.numbers["parameters"],
            c.backbone,
            order_key(c.paradigm, PARADIGMS),
            order_key(c.loss, LOSSES),
        )
    )

    columns, beir_sets, mean_metrics = _metric_layout([cell.metrics for cell in cells])
    rows = [
        {"status": cell.status, **cell.numbers, **_metric_row(cell.metrics, beir_sets, mean_metrics)} for cell in cells
    ]
    index = pd.MultiIndex.from_tuples([(c.backbone, c.paradigm, c.loss) for c in cells], names=INDEX_NAMES)
    df = pd.DataFrame(rows, index=index, columns=["status", *NUMBER_COLUMNS, *columns])
    for name in INT_FIELDS:
        df[name] = df[name].astype("Int64")
    df["flops"] = df["flops"].astype(float)
    df[columns] = df[columns].astype(float)
    return df


def _metric_layout(all_metrics: Sequence[Mapping[str, Mapping[str, float]]]) -> tuple[list[str], list[str], set[str]]:
    """(metric columns in table order, BEIR sets, metrics of the BEIR mean) of a set of records' metrics."""
    per_dataset: dict[str, set[str]] = {}
    for metrics in all_metrics:
        for dataset, scores in metrics.items():
            per_dataset.setdefault(dataset, set()).update(scores)
    beir_sets = sorted(d for d in per_dataset if d.startswith(BEIR_PREFIX))
    mean_metrics = set.intersection(*(per_dataset[d] for d in beir_sets)) if len(beir_sets) >= 2 else set()

    columns: list[str] = []
    for dataset in sorted(per_dataset, key=_dataset_key):
        columns += [metric_column(dataset, m) for m in _metric_order(dataset, per_dataset[dataset])]
    # The BEIR mean follows the BEIR protocol's metric order.
    columns += [metric_column(BEIR_MEAN, m) for m in _metric_order(beir_sets[0], mean_metrics)] if mean_metrics else []
    return columns, beir_sets, mean_metrics


def _metric_row(
    metrics: Mapping[str, Mapping[str, float]], beir_sets: Sequence[str], mean_metrics: Iterable[str]
) -> dict[str, float]:
    """One record's metric columns, with the BEIR mean where the record has every BEIR set."""
    row = {metric_column(dataset, m): v for dataset, scores in metrics.items() for m, v in scores.items()}
    for metric in mean_metrics:
        if all(metric in metrics.get(d, {}) for d in beir_sets):
            row[metric_column(BEIR_MEAN, metric)] = beir_mean({d: {metric: metrics[d][metric]} for d in beir_sets})[
                metric
            ]
    return row


def baseline_table(baselines: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per baseline record (index ``name``; BM25 first, then step-0 encoders by parameters).

    A baseline record is ``{"kind": "bm25" | "step0", "name", "backbone", "paradigm", "parameters", "flops",
    "metrics", "status"}`` (backbone and paradigm null for BM25; a step-0 row needs both). Columns: ``kind``,
    ``backbone``, ``paradigm``, ``status``, the number columns of `results_table`, then the metric columns (with the
    BEIR mean), or exactly ``columns`` (a results table's metric columns) when given.
    """
    rows = [parse_baseline(record, i) for i, record in enumerate(baselines)]
    names = [b.name for b in rows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RecordError(f"baseline names must be unique; repeated: {', '.join(duplicates)}")
    rows.sort(
        key=lambda b: (
            order_key(b.kind, BASELINE_KINDS),
            math.inf if b.numbers["parameters"] is None else b.numbers["parameters"],
            b.name,
        )
    )
    layout, beir_sets, mean_metrics = _metric_layout([b.metrics for b in rows])
    columns = layout if columns is None else list(columns)
    data = [
        {
            "kind": b.kind,
            "backbone": b.backbone,
            "paradigm": b.paradigm,
            "status": b.status,
            **b.numbers,
            **_metric_row(b.metrics, beir_sets, mean_metrics),
        }
        for b in rows
    ]
    df = pd.DataFrame(
        data,
        index=pd.Index([b.name for b in rows], name="name", dtype=object),
        columns=["kind", "backbone", "paradigm", "status", *NUMBER_COLUMNS, *columns],
    )
    for key in ("backbone", "paradigm"):  # keep None (BM25 has neither), not NaN
        df[key] = pd.Series([getattr(b, key) for b in rows], index=df.index, dtype=object)
    for name in INT_FIELDS:
        df[name] = df[name].astype("Int64")
    df["flops"] = df["flops"].astype(float)
    df[columns] = df[columns].astype(float)
    return df


def baseline_values(baselines: pd.DataFrame, column: str) -> pd.Series:
    if column in baselines.columns:
        return baselines[column].astype(float).where(baselines["status"] == "ok")
    return pd.Series(math.nan, index=baselines.index, dtype=float)


def bm25_reference(baselines: pd.DataFrame, column: str) -> float:
    """BM25's value in a metric column of a baseline table (NaN without one; two BM25 values are an error)."""
    bm25 = baseline_values(baselines, column)[baselines["kind"] == "bm25"].dropna()
    if len(bm25) > 1:
        raise RecordError(f"more than one BM25 baseline has a {column} value: {', '.join(bm25.index)}")
    return float(bm25.iloc[0]) if len(bm25) else math.nan


def baseline_comparison(df: pd.DataFrame, baselines: pd.DataFrame, column: str) -> pd.DataFrame:
    """Each cell of a results table against the baselines on one metric column.

    ``vs_bm25``: the cell's value divided by BM25's (NaN without a BM25 row or a value); ``beats_step0``: whether
    the cell's value is above its step-0 row's (same backbone and paradigm; NA without one).
    """
    if column not in df.columns:
        raise ValueError(f"{column!r} is not a column of the results table; metric columns: {metric_columns(df)}")
    values = baseline_values(baselines, column)
    ok = baselines["status"] == "ok"
    step0: dict[tuple[str, str], float] = {}
    for name, row in baselines[(baselines["kind"] == "step0") & ok].iterrows():
        key = (row["backbone"], row["paradigm"])
        if key in step0:
            raise RecordError(f"two step-0 baselines for {key[0]} {key[1]} (one is {name!r})")
        step0[key] = float(values[name])
    reference = bm25_reference(baselines, column)
    out = pd.DataFrame(index=df.index)
    cell = df[column].astype(float).where(df["status"] == "ok")
    out["vs_bm25"] = cell / reference if reference > 0 else math.nan
    beats = []
    for (backbone, paradigm, _), value in cell.items():
        base = step0.get((backbone, paradigm), math.nan)
        beats.append(pd.NA if math.isnan(value) or math.isnan(base) else bool(value > base))
    out["beats_step0"] = pd.array(beats, dtype="boolean")
    return out


def results_csv_table(
    df: pd.DataFrame, baselines: pd.DataFrame | None = None, compare: str | None = None
) -> pd.DataFrame:
    """results.csv: the cells (`results_table`) with a leading ``row`` column (``cell``); with baselines, their rows
    below (``row`` = kind, ``name``, index (backbone or name, paradigm, ``baseline``)) and, when ``compare`` is set,
    the cells' ``vs_bm25`` and ``beats_step0`` (`baseline_comparison`) as the last columns."""
    table = df.copy()
    table.insert(0, "row", "cell")
    if baselines is None or not len(baselines):
        return table
    table.insert(1, "name", None)
    if compare is not None:
        table = table.join(baseline_comparison(df, baselines, compare))
    rows = baselines.reset_index()
    rows.index = pd.MultiIndex.from_arrays(
        [rows["backbone"].fillna(rows["name"]), rows["paradigm"], ["baseline"] * len(rows)], names=INDEX_NAMES
    )
    rows = rows.rename(columns={"kind": "row"}).drop(columns=["backbone", "paradigm"])
    if compare is not None:
        rows["vs_bm25"] = baseline_values(baselines, compare).to_numpy() / bm25_reference(baselines, compare)
    return pd.concat([table, rows[[c for c in table.columns if c in rows.columns]]])
