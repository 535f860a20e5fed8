"""The scaling report: the results table of a sweep, power-law fits and metric-vs-scale plots.

Input is one record per sweep cell, a plain dict as the sweep collects it::

    {"backbone": "llama-3.2-1b", "paradigm": "sparse", "loss": "cl", "parameters": 1_235_814_400,
     "trainable_parameters": 11_272_192, "flops": 6.2e19, "steps": 33250, "status": "ok",
     "metrics": {"msmarco-passage/dev/small": {"mrr@10": 0.417, "recall@1000": 0.98}, ...}}

``metrics`` maps a dataset id to ranx-named scores in [0, 1] (``ndcg@10``, ``mrr@10-l2``, ...). A cell with
``status: "failed"`` needs no metrics (nor numbers): it stays in the table, marked failed, and is left out of fits
and plots.

**Table.** `results_table` gives one row per backbone × paradigm × loss (index levels ``backbone``, ``paradigm``,
``loss``), sorted by parameters, then paradigm and loss in the order of `retriever.config.Paradigm` / ``LossName``
(dense, sparse; cl, kd, cl+kd). Columns: ``status``, ``parameters``, ``trainable_parameters``, ``flops`` (training
FLOPs used), ``steps``, then one column per (dataset, metric) named ``"<dataset>:<metric>"`` (`metric_column`),
datasets in the order MS MARCO dev, DL19, DL20, other datasets, BEIR sets, and metrics in their protocol's order.
With two or more ``beir/*`` datasets, ``"beir-mean:<metric>"`` columns hold the unweighted mean over them
(`retriever.evaluation.beir_mean`); a cell that lacks any of those sets gets NaN there rather than a mean over a
different subset. `to_markdown` renders the paper-style table: metrics ×100 with one decimal as in the paper (41.7),
best value of each column in bold, FLOPs as ``6.2e19``, parameters as ``1.24B``; ``percent=False, decimals=4``
gives raw scores (0.4170) instead. The CSV (``DataFrame.to_csv``) keeps full precision.

**Baselines.** `baseline_table` reads baseline records (``{"kind": "bm25" | "step0", "name", "backbone",
"paradigm", "parameters", "flops", "metrics", "status"}``: BM25 and each backbone × paradigm's untrained encoder) into
rows indexed by name with the same metric columns. They are shown below the cells (Loss ``baseline``), never bold,
never fitted nor plotted; `baseline_comparison` gives each cell's value as a fraction of BM25's (``vs_bm25``) and
whether it beats its step-0 row (``beats_step0``). results.csv (`results_csv_table`) has a leading ``row`` column
(``cell``, ``bm25``, ``step0``) and, with baselines, their rows and those two comparison columns.

**Fits.** `fit_power_law` fits y = a·x^b by ordinary least squares on (ln x, ln y): ln y = ln a + b·ln x; r2 is
the coefficient of determination of that log-log regression. Only points with finite x > 0 and y > 0 are used and
at least two distinct x are needed, otherwise there is no fit (None). The scaling fits of the report
(`scaling_fits`) use the *error* form by default: 1 − metric = a·x^b, so b < 0 when the metric improves with
scale. Retrieval metrics are bounded by 1, and a power law in the metric itself would cross 1; the error form is
the usual scaling-law shape (a quantity that falls as a power of compute or size) and stays below 1 for any
x. ``target="metric"`` fits metric = a·x^b instead. A fit is made per (dataset, metric) column, per paradigm × loss
line, against ``parameters`` and against ``flops``; lines whose x spans less than ``min_span`` (×2 by default) are
not fitted: cells of one sweep share a FLOP budget, and a power law through nearly equal x is meaningless.

**Plots.** PNGs drawn with matplotlib's Agg canvas (no pyplot state): one file per plotted metric column and x axis
(log scale), one marker style per paradigm and one colour per loss, the fitted curve drawn through each line with
its exponent b in the legend. `write_report` writes ``results.md``, ``results.csv``, ``fits.json`` and
``plots/*.png`` and returns their paths (`ReportPaths`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from retriever.config import LossName, Paradigm
from retriever.data.sources import BEIR_13, MSMARCO
from retriever.evaluation import beir_mean, protocol_for_dataset

FitTarget = Literal["error", "metric"]
XAxis = Literal["parameters", "flops"]

BEIR_PREFIX = "beir/"
BEIR_MEAN = "beir-mean"
STATUSES = ("ok", "failed")
BASELINE_KINDS = ("bm25", "step0")
PARADIGMS: tuple[str, ...] = get_args(Paradigm)
LOSSES: tuple[str, ...] = get_args(LossName)
X_AXES: tuple[XAxis, ...] = ("parameters", "flops")
NUMBER_COLUMNS = ("parameters", "trainable_parameters", "flops", "steps")
INDEX_NAMES = ["backbone", "paradigm", "loss"]

_INT_FIELDS = ("parameters", "trainable_parameters", "steps")
_DATASET_LABELS = {MSMARCO["dev"]: "MS MARCO dev", MSMARCO["dl19"]: "DL19", MSMARCO["dl20"]: "DL20"}
_DATASET_LABELS.update({dataset_id: name for name, dataset_id in BEIR_13.items()})
_DATASET_ORDER = (MSMARCO["dev"], MSMARCO["dl19"], MSMARCO["dl20"])
_METRIC_NAMES = {"mrr": "MRR", "ndcg": "nDCG", "recall": "R", "precision": "P", "map": "MAP", "hits": "Hits"}
_METRIC_RE = re.compile(r"^(?P<name>[a-z_]+)(?:@(?P<k>\d+))?(?:-l(?P<level>\d+))?$")
_LOSS_COLOURS = {"cl": "C0", "kd": "C1", "cl+kd": "C2"}
_PARADIGM_STYLES = {"sparse": ("o", "-"), "dense": ("s", "--")}
_MISSING = "–"


class RecordError(ValueError):
    """A sweep result record is malformed (the message names the record and the field)."""


# --------------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class _Cell:
    backbone: str
    paradigm: str
    loss: str
    status: str
    numbers: dict[str, float | None]
    metrics: dict[str, dict[str, float]]
    where: str


def _number(value: Any, where: str, name: str, integer: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise RecordError(f"{where}: {name} must be a number, got {value!r}")
    if not math.isfinite(float(value)) or value < 0:
        raise RecordError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    if integer and float(value) != int(value):
        raise RecordError(f"{where}: {name} must be a whole number, got {value!r}")
    return float(value)


def _metrics(value: Any, where: str) -> dict[str, dict[str, float]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RecordError(f"{where}: metrics must map dataset id -> {{metric: score}}, got {type(value).__name__}")
    out: dict[str, dict[str, float]] = {}
    for dataset, scores in value.items():
        if not isinstance(dataset, str) or not dataset or ":" in dataset:
            raise RecordError(f"{where}: dataset ids must be non-empty strings without ':', got {dataset!r}")
        if not isinstance(scores, Mapping):
            raise RecordError(f"{where}: metrics[{dataset!r}] must map metric name -> score, got {scores!r}")
        out[dataset] = {}
        for metric, score in scores.items():
            if not isinstance(metric, str) or not metric or ":" in metric:
                raise RecordError(f"{where}: metric names must be non-empty strings without ':', got {metric!r}")
            ok = isinstance(score, int | float | np.integer | np.floating) and not isinstance(score, bool)
            if not ok or not 0.0 <= float(score) <= 1.0:
                raise RecordError(
                    f"{where}: metrics[{dataset!r}][{metric!r}] = {score!r}; scores are ranx values in [0, 1] "
                    "(not percentages)"
                )
            out[dataset][metric] = float(score)
    return out


def _cell(record: Any, index: int) -> _Cell:
    where = f"record {index}"
    if not isinstance(record, Mapping):
        raise RecordError(f"{where}: expected a dict, got {type(record).__name__}")
    for key in ("backbone", "paradigm", "loss", "status"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise RecordError(f"{where}: {key!r} must be a non-empty string, got {record.get(key)!r}")
    where = f"record {index} ({record['backbone']}/{record['paradigm']}/{record['loss']})"
    for key, known in (("paradigm", PARADIGMS), ("loss", LOSSES), ("status", STATUSES)):
        if record[key] not in known:
            raise RecordError(f"{where}: unknown {key} {record[key]!r}; expected one of {', '.join(known)}")
    numbers = {name: _number(record.get(name), where, name, name in _INT_FIELDS) for name in NUMBER_COLUMNS}
    status = record["status"]
    if status == "ok":
        if numbers["parameters"] is None:
            raise RecordError(f"{where}: a cell with status 'ok' needs 'parameters' (total parameter count)")
        if "metrics" not in record or not record["metrics"]:
            raise RecordError(
                f"{where}: a cell with status 'ok' needs 'metrics'; mark cells that did not finish as status 'failed'"
            )
    metrics = _metrics(record.get("metrics"), where) if status == "ok" else {}
    return _Cell(record["backbone"], record["paradigm"], record["loss"], status, numbers, metrics, where)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Result records from a JSON file (a list of records) or a JSONL file (one record per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file (expected a JSON list or JSONL of cell records)")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise RecordError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(records, list):
        raise RecordError(f"{path}: expected a JSON list of cell records, got {type(records).__name__}")
    return records


# --------------------------------------------------------------------------------------------------------------
# Table


def metric_column(dataset: str, metric: str) -> str:
    """The results-table column of one metric on one dataset: ``"<dataset>:<metric>"``."""
    return f"{dataset}:{metric}"


def split_metric_column(column: str) -> tuple[str, str]:
    """(dataset, metric) of a metric column; raises ValueError for the other columns."""
    dataset, sep, metric = column.rpartition(":")
    if not sep or not dataset or not metric:
        raise ValueError(f"{column!r} is not a metric column (expected '<dataset>:<metric>')")
    return dataset, metric


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The (dataset, metric) columns of a results table, in table order."""
    return [c for c in df.columns if ":" in str(c)]


def _order(value: str, known: Sequence[str]) -> tuple[int, str]:
    return (known.index(value), "") if value in known else (len(known), value)


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
    return sorted(metrics, key=lambda m: _order(m, known))


def results_table(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per backbone × paradigm × loss cell; see the module docstring for columns and order."""
    if not records:
        raise RecordError("no result records; the sweep produced no cells")
    cells = [_cell(record, i) for i, record in enumerate(records)]
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
            _order(c.paradigm, PARADIGMS),
            _order(c.loss, LOSSES),
        )
    )

    columns, beir_sets, mean_metrics = _metric_layout([cell.metrics for cell in cells])
    rows = [
        {"status": cell.status, **cell.numbers, **_metric_row(cell.metrics, beir_sets, mean_metrics)} for cell in cells
    ]
    index = pd.MultiIndex.from_tuples([(c.backbone, c.paradigm, c.loss) for c in cells], names=INDEX_NAMES)
    df = pd.DataFrame(rows, index=index, columns=["status", *NUMBER_COLUMNS, *columns])
    for name in _INT_FIELDS:
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


# --------------------------------------------------------------------------------------------------------------
# Baselines


@dataclass(frozen=True)
class _Baseline:
    kind: str
    name: str
    backbone: str | None
    paradigm: str | None
    status: str
    numbers: dict[str, float | None]
    metrics: dict[str, dict[str, float]]


def _optional_str(record: Mapping[str, Any], key: str, where: str) -> str | None:
    value = record.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise RecordError(f"{where}: {key!r} must be a non-empty string or null, got {value!r}")
    return value


def _baseline(record: Any, index: int) -> _Baseline:
    where = f"baseline {index}"
    if not isinstance(record, Mapping):
        raise RecordError(f"{where}: expected a dict, got {type(record).__name__}")
    if not isinstance(record.get("name"), str) or not record["name"]:
        raise RecordError(f"{where}: 'name' must be a non-empty string, got {record.get('name')!r}")
    where = f"baseline {index} ({record['name']})"
    kind, status = record.get("kind"), record.get("status", "ok")
    if kind not in BASELINE_KINDS:
        raise RecordError(f"{where}: unknown kind {kind!r}; expected one of {', '.join(BASELINE_KINDS)}")
    if status not in STATUSES:
        raise RecordError(f"{where}: unknown status {status!r}; expected one of {', '.join(STATUSES)}")
    backbone, paradigm = _optional_str(record, "backbone", where), _optional_str(record, "paradigm", where)
    if paradigm is not None and paradigm not in PARADIGMS:
        raise RecordError(f"{where}: unknown paradigm {paradigm!r}; expected one of {', '.join(PARADIGMS)}")
    if kind == "step0" and (backbone is None or paradigm is None):
        raise RecordError(f"{where}: a step-0 baseline needs its 'backbone' and 'paradigm'")
    numbers = {name: _number(record.get(name), where, name, name in _INT_FIELDS) for name in NUMBER_COLUMNS}
    if status == "ok" and not record.get("metrics"):
        raise RecordError(f"{where}: a baseline with status 'ok' needs 'metrics'")
    metrics = _metrics(record.get("metrics"), where) if status == "ok" else {}
    return _Baseline(kind, record["name"], backbone, paradigm, status, numbers, metrics)


def baseline_table(baselines: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per baseline record (index ``name``; BM25 first, then step-0 encoders by parameters).

    A baseline record is ``{"kind": "bm25" | "step0", "name", "backbone", "paradigm", "parameters", "flops",
    "metrics", "status"}`` (backbone and paradigm null for BM25; a step-0 row needs both). Columns: ``kind``,
    ``backbone``, ``paradigm``, ``status``, the number columns of `results_table`, then the metric columns (with the
    BEIR mean), or exactly ``columns`` (a results table's metric columns) when given.
    """
    rows = [_baseline(record, i) for i, record in enumerate(baselines)]
    names = [b.name for b in rows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RecordError(f"baseline names must be unique; repeated: {', '.join(duplicates)}")
    rows.sort(
        key=lambda b: (
            _order(b.kind, BASELINE_KINDS),
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
    for name in _INT_FIELDS:
        df[name] = df[name].astype("Int64")
    df["flops"] = df["flops"].astype(float)
    df[columns] = df[columns].astype(float)
    return df


def _baseline_values(baselines: pd.DataFrame, column: str) -> pd.Series:
    if column in baselines.columns:
        return baselines[column].astype(float).where(baselines["status"] == "ok")
    return pd.Series(math.nan, index=baselines.index, dtype=float)


def bm25_reference(baselines: pd.DataFrame, column: str) -> float:
    """BM25's value in a metric column of a baseline table (NaN without one; two BM25 values are an error)."""
    bm25 = _baseline_values(baselines, column)[baselines["kind"] == "bm25"].dropna()
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
    values = _baseline_values(baselines, column)
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


# --------------------------------------------------------------------------------------------------------------
# Formatting


def dataset_label(dataset: str, n_beir: int | None = None) -> str:
    """A short display name: ``DL19``, ``MS MARCO dev``, ``nfcorpus``, ``BEIR mean (13)``; other ids unchanged."""
    if dataset == BEIR_MEAN:
        return "BEIR mean" if n_beir is None else f"BEIR mean ({n_beir})"
    return _DATASET_LABELS.get(dataset, dataset)


def metric_label(metric: str) -> str:
    """A display name of a ranx metric: ``ndcg@10`` → ``nDCG@10``, ``mrr@10-l2`` → ``MRR@10 (rel≥2)``."""
    match = _METRIC_RE.match(metric)
    if not match:
        return metric
    label = _METRIC_NAMES.get(match["name"], match["name"])
    if match["k"]:
        label += f"@{match['k']}"
    if match["level"]:
        label += f" (rel≥{match['level']})"
    return label


def format_count(value: float | None) -> str:
    """A parameter count with 3 significant digits: ``1.24B``, ``8.03B``, ``260K``, ``512``."""
    if value is None or pd.isna(value):
        return _MISSING
    value = float(value)
    units = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))
    for i, (unit, suffix) in enumerate(units):
        if value >= unit:
            # 999.6M rounds to "1e+03M" with 3 significant digits: move up one unit instead.
            if float(f"{value / unit:.3g}") >= 1000 and i > 0:
                unit, suffix = units[i - 1]
            return f"{value / unit:.3g}{suffix}"
    return f"{value:.3g}" if value != int(value) else str(int(value))


def format_flops(value: float | None) -> str:
    """A FLOP count with two significant digits in compact scientific notation: ``6.2e19``."""
    if value is None or pd.isna(value):
        return _MISSING
    if value == 0:
        return "0"
    mantissa, exponent = f"{float(value):.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def format_metric(value: float | None, percent: bool = True, decimals: int = 1) -> str:
    """A metric as in the paper (×100, one decimal: ``41.7``) or raw (``percent=False, decimals=4``: ``0.4170``)."""
    if value is None or pd.isna(value):
        return _MISSING
    return f"{float(value) * (100 if percent else 1):.{decimals}f}"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


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

    failed = df["status"] != "ok"
    cells = {c: [format_metric(v, percent, decimals) for v in df[c]] for c in columns}
    if bold_best:
        for c in columns:
            values = [float(s) for s, bad in zip(cells[c], failed) if s != _MISSING and not bad]
            if values:
                best = max(values)
                cells[c] = [f"**{s}**" if s != _MISSING and float(s) == best else s for s in cells[c]]

    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join([":---"] * 3 + ["---:"] * (len(header) - 3)) + "|")
    for i, ((backbone, paradigm, loss), row) in enumerate(df.iterrows()):
        out = [backbone, paradigm, loss.upper(), format_count(row["parameters"]), format_flops(row["flops"])]
        out.append(_MISSING if pd.isna(row["steps"]) else f"{int(row['steps']):,}")
        out += ["failed" if failed.iloc[i] else cells[c][i] for c in columns]
        if not columns:
            out.append(str(row["status"]))
        if comparison is not None:
            beats = comparison["beats_step0"].iloc[i]
            out += [
                _percent_of(comparison["vs_bm25"].iloc[i]),
                _MISSING if pd.isna(beats) else "yes" if beats else "no",
            ]
        lines.append("| " + " | ".join(_md_cell(str(s)) for s in out) + " |")
    if baselines is not None:
        if compare is not None:
            vs_bm25 = _baseline_values(baselines, compare) / bm25_reference(baselines, compare)
        for name, row in baselines.iterrows():
            is_bm25 = row["kind"] == "bm25"
            out = [
                "BM25" if is_bm25 else (row["backbone"] or name),
                row["paradigm"] or _MISSING,
                "baseline" if is_bm25 else "baseline (step 0)",
                format_count(row["parameters"]),
                format_flops(row["flops"]),
                _MISSING if pd.isna(row["steps"]) else f"{int(row['steps']):,}",
            ]
            ok = row["status"] == "ok"
            out += [format_metric(row[c], percent, decimals) if ok else "failed" for c in columns]
            if not columns:
                out.append(str(row["status"]))
            if comparison is not None:
                out += [_percent_of(vs_bm25[name]), _MISSING]
            lines.append("| " + " | ".join(_md_cell(str(s)) for s in out) + " |")
    return "\n".join(lines) + "\n"


def _percent_of(ratio: float | None) -> str:
    return _MISSING if ratio is None or not math.isfinite(float(ratio)) else f"{100 * float(ratio):.0f}%"


# --------------------------------------------------------------------------------------------------------------
# Power laws


@dataclass(frozen=True)
class PowerLaw:
    """y = a·x^b, fitted in log-log space; ``r2`` is that regression's R², ``n_points`` the points used."""

    a: float
    b: float
    r2: float
    n_points: int = 0

    def __call__(self, x: float | Sequence[float] | np.ndarray) -> np.ndarray:
        return self.a * np.power(np.asarray(x, dtype=float), self.b)

    def to_dict(self) -> dict[str, float | int]:
        return {"a": self.a, "b": self.b, "r2": self.r2, "n_points": self.n_points}


def fit_power_law(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> PowerLaw | None:
    """Least-squares fit of ln y = ln a + b·ln x over the points with finite x > 0 and y > 0.

    None when fewer than two such points remain or all their x are equal (the slope is undefined). R² is computed
    on ln y; when all ln y are equal the fit (b = 0) is exact and R² is 1.
    """
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.ndim != 1 or xs.shape != ys.shape:
        raise ValueError(f"x and y must be 1-D sequences of the same length, got shapes {xs.shape} and {ys.shape}")
    keep = np.isfinite(xs) & np.isfinite(ys) & (xs > 0) & (ys > 0)
    lx, ly = np.log(xs[keep]), np.log(ys[keep])
    if lx.size < 2 or np.all(lx == lx[0]):
        return None
    design = np.column_stack([lx, np.ones_like(lx)])
    (slope, intercept), *_ = np.linalg.lstsq(design, ly, rcond=None)
    residual = float(np.sum((ly - (slope * lx + intercept)) ** 2))
    total = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 if total == 0.0 else 1.0 - residual / total
    return PowerLaw(a=float(np.exp(intercept)), b=float(slope), r2=r2, n_points=int(lx.size))


@dataclass(frozen=True)
class ScalingFit:
    """The power law of one (dataset, metric) column for one paradigm × loss line against one x axis.

    ``points`` are (backbone, x, metric) of the cells used; ``law`` is None when no fit was made (``reason``).
    """

    dataset: str
    metric: str
    paradigm: str
    loss: str
    x_axis: XAxis
    target: FitTarget
    points: tuple[tuple[str, float, float], ...]
    law: PowerLaw | None
    reason: str | None = None

    def predict(self, x: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """The fitted metric at x (1 − a·x^b for the error form)."""
        if self.law is None:
            raise ValueError(f"no fit for {self.dataset} {self.metric} {self.paradigm}/{self.loss}: {self.reason}")
        y = self.law(x)
        return 1.0 - y if self.target == "error" else y

    def to_dict(self) -> dict[str, Any]:
        law = self.law.to_dict() if self.law else {"a": None, "b": None, "r2": None, "n_points": 0}
        return {
            "dataset": self.dataset,
            "metric": self.metric,
            "paradigm": self.paradigm,
            "loss": self.loss,
            "x": self.x_axis,
            "target": self.target,
            **law,
            "reason": self.reason,
            "points": [{"backbone": b, "x": x, "metric": m} for b, x, m in self.points],
        }


def _fit_target(metric: np.ndarray, target: FitTarget) -> np.ndarray:
    if target == "error":
        return 1.0 - metric
    if target == "metric":
        return metric
    raise ValueError(f"unknown fit target {target!r}; expected 'error' (1 - metric) or 'metric'")


def scaling_fits(
    df: pd.DataFrame,
    target: FitTarget = "error",
    min_span: float = 2.0,
    x_axes: Sequence[XAxis] = X_AXES,
    columns: Sequence[str] | None = None,
) -> list[ScalingFit]:
    """Power-law fits of every metric column (or ``columns``) per paradigm × loss line and x axis.

    Only cells with status ok, a finite metric and x > 0 are used. A line is not fitted when fewer than two cells
    are usable, or when its x values span less than a factor ``min_span`` (cells of one sweep share a FLOP budget).
    """
    _fit_target(np.zeros(1), target)  # validate early
    if min_span < 1.0:
        raise ValueError(f"min_span is a ratio max(x)/min(x) and must be >= 1, got {min_span}")
    for axis in x_axes:
        if axis not in X_AXES:
            raise ValueError(f"unknown x axis {axis!r}; expected one of {', '.join(X_AXES)}")
    columns = metric_columns(df) if columns is None else list(columns)
    ok = df[df["status"] == "ok"]
    lines = sorted(
        {(p, lo) for _, p, lo in df.index}, key=lambda pl: (_order(pl[0], PARADIGMS), _order(pl[1], LOSSES))
    )
    fits = []
    for column in columns:
        dataset, metric = split_metric_column(column)
        for axis in x_axes:
            for paradigm, loss in lines:
                sel = ok[
                    (ok.index.get_level_values("paradigm") == paradigm) & (ok.index.get_level_values("loss") == loss)
                ]
                xs = sel[axis].astype(float).to_numpy()
                ms = sel[column].to_numpy(dtype=float)
                use = np.isfinite(xs) & (xs > 0) & np.isfinite(ms)
                backbones = sel.index.get_level_values("backbone")[use]
                points = tuple((str(b), float(x), float(m)) for b, x, m in zip(backbones, xs[use], ms[use]))
                law, reason = None, None
                if len(points) < 2:
                    reason = f"needs at least 2 finished cells with {axis} > 0 and a {metric} value, has {len(points)}"
                elif xs[use].max() / xs[use].min() < min_span:
                    reason = f"{axis} spans x{xs[use].max() / xs[use].min():.3g} only (< x{min_span:g})"
                else:
                    law = fit_power_law(xs[use], _fit_target(ms[use], target))
                    if law is None:
                        reason = f"fewer than 2 points with {'1 - metric' if target == 'error' else 'metric'} > 0"
                fits.append(ScalingFit(dataset, metric, paradigm, loss, axis, target, points, law, reason))
    return fits


# --------------------------------------------------------------------------------------------------------------
# Plots


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", text.replace("@", "_at_")).strip("_")


def _label_log_axis(ax: Any, xs: Sequence[float], fmt: Any) -> None:
    """Ticks at the cells' x values (those closer than ×1.15 to the previous tick are skipped) with compact labels:
    sweeps span less than a decade, where matplotlib's default log ticks are unlabelled or overlap."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks: list[float] = []
    for x in sorted(set(xs)):
        if not ticks or x / ticks[-1] >= 1.15:
            ticks.append(x)
    if not ticks:
        return
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt(x)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(min(xs) / 1.2, max(xs) * 1.2)


def plot_scaling(
    fits: Sequence[ScalingFit],
    path: str | Path,
    title: str = "",
    percent: bool = True,
    figsize: tuple[float, float] = (5.0, 3.5),
    dpi: int = 100,
) -> Path:
    """One PNG of a metric against one x axis (log scale): the cells of each paradigm × loss line as markers and
    the fitted curve through them, labelled with its exponent. ``fits`` must share dataset, metric and x axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not fits:
        raise ValueError("plot_scaling needs at least one fit (one line)")
    keys = {(f.dataset, f.metric, f.x_axis, f.target) for f in fits}
    if len(keys) != 1:
        raise ValueError(f"plot_scaling draws one metric against one axis; got {sorted(keys)}")
    dataset, metric, x_axis, target = keys.pop()
    scale = 100.0 if percent else 1.0
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    handles, extra = [], 0
    for fit in fits:
        if not fit.points:
            continue
        if fit.loss in _LOSS_COLOURS:
            colour = _LOSS_COLOURS[fit.loss]
        else:
            colour, extra = f"C{3 + extra}", extra + 1
        marker, linestyle = _PARADIGM_STYLES.get(fit.paradigm, ("^", ":"))
        xs = np.array([p[1] for p in fit.points])
        ax.plot(xs, np.array([p[2] for p in fit.points]) * scale, marker=marker, linestyle="none", color=colour)
        label = f"{fit.paradigm} {fit.loss.upper()}"
        if fit.law is not None:
            grid = np.geomspace(xs.min(), xs.max(), 64)
            ax.plot(grid, fit.predict(grid) * scale, linestyle=linestyle, color=colour, linewidth=1.2)
            label += f": b={fit.law.b:+.3f}"
        else:
            linestyle = "none"
        handles.append(Line2D([], [], color=colour, marker=marker, linestyle=linestyle, label=label))
    ax.set_xscale("log")
    _label_log_axis(
        ax, [p[1] for f in fits for p in f.points], format_count if x_axis == "parameters" else format_flops
    )
    ax.set_xlabel("parameters" if x_axis == "parameters" else "training FLOPs")
    ax.set_ylabel(metric_label(metric) + (" ×100" if percent else ""))
    ax.set_title(title or f"{dataset_label(dataset)} {metric_label(metric)}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if handles:
        form = "1 − metric = a·x^b" if target == "error" else "metric = a·x^b"
        ax.legend(handles=handles, fontsize=7, title=f"fit: {form}", title_fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------------------------------------------
# Report


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


def _fits_markdown(fits: Sequence[ScalingFit], n_beir: int) -> list[str]:
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
        rows["vs_bm25"] = _baseline_values(baselines, compare).to_numpy() / bm25_reference(baselines, compare)
    return pd.concat([table, rows[[c for c in table.columns if c in rows.columns]]])


def _baselines_note(compare: str | None) -> list[str]:
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

    form = "1 - metric = a * x**b" if target == "error" else "metric = a * x**b"
    fits_path = out / "fits.json"
    payload = {
        "form": form,
        "target": target,
        "method": "ordinary least squares on (ln x, ln y); r2 of that log-log regression",
        "min_span": min_span,
        "fits": [f.to_dict() for f in fits],
    }
    fits_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")

    plotted = _plotted_columns(df, plot_beir_datasets)
    plots: list[Path] = []
    for column in plotted:
        dataset, metric = split_metric_column(column)
        for axis in X_AXES:
            group = [f for f in fits if (f.dataset, f.metric, f.x_axis) == (dataset, metric, axis) and f.points]
            if group:
                name = f"{_slug(dataset)}__{_slug(metric)}__vs_{axis}.png"
                label = f"{dataset_label(dataset, n_beir)} {metric_label(metric)}"
                plots.append(plot_scaling(group, out / "plots" / name, title=label, percent=percent))

    failed = int((df["status"] != "ok").sum())
    unit = "×100" if percent else "raw scores"
    md = [
        f"# {title}",
        "",
        f"{len(df)} cells ({failed} failed). Metrics: {unit}, {decimals} decimal(s), best per column in bold. "
        "FLOPs: training FLOPs used. Params: total parameters.",
        *(["", *_baselines_note(compare)] if base is not None else []),
        "",
        to_markdown(df, percent=percent, decimals=decimals, baselines=base, compare=compare).rstrip("\n"),
        "",
        *([*sections, ""] if sections else []),
        "## Power-law fits",
        "",
        f"Fitted per paradigm × loss by least squares in log-log space: `{form}`, x = parameters or training FLOPs "
        f"(lines whose x spans less than ×{min_span:g} are not fitted).",
        "",
        *_fits_markdown([f for f in fits if metric_column(f.dataset, f.metric) in plotted], n_beir),
    ]
    if len(plotted) < len(metric_columns(df)):
        md += ["", "The single BEIR sets are summarised by their mean here; fits.json holds their fits too."]
    if plots:
        md += ["", "## Plots", ""]
        md += [f"![{p.stem}](plots/{p.name})" for p in plots]
    md_path = out / "results.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return ReportPaths(markdown=md_path, csv=csv_path, fits=fits_path, plots=plots)


__all__ = [
    "BASELINE_KINDS",
    "BEIR_MEAN",
    "PowerLaw",
    "RecordError",
    "ReportPaths",
    "ScalingFit",
    "baseline_comparison",
    "baseline_table",
    "bm25_reference",
    "dataset_label",
    "fit_power_law",
    "format_count",
    "format_flops",
    "format_metric",
    "metric_column",
    "metric_columns",
    "metric_label",
    "plot_scaling",
    "read_records",
    "results_csv_table",
    "results_table",
    "scaling_fits",
    "split_metric_column",
    "to_markdown",
    "write_report",
]
