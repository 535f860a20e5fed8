"""Names and number formats of the report: metric columns (``"<dataset>:<metric>"``), display labels of datasets
and metrics (``DL19``, ``nDCG@10``), and parameter, FLOP and metric formats (``1.24B``, ``6.2e19``, ``41.7``)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import get_args

import pandas as pd

from retriever.config import LossName, Paradigm
from retriever.data.sources import BEIR_13, MSMARCO

BEIR_PREFIX = "beir/"
BEIR_MEAN = "beir-mean"
PARADIGMS: tuple[str, ...] = get_args(Paradigm)
LOSSES: tuple[str, ...] = get_args(LossName)
MISSING = "–"

_DATASET_LABELS = {MSMARCO["dev"]: "MS MARCO dev", MSMARCO["dl19"]: "DL19", MSMARCO["dl20"]: "DL20"}
_DATASET_LABELS.update({dataset_id: name for name, dataset_id in BEIR_13.items()})
_METRIC_NAMES = {"mrr": "MRR", "ndcg": "nDCG", "recall": "R", "precision": "P", "map": "MAP", "hits": "Hits"}
_METRIC_RE = re.compile(r"^(?P<name>[a-z_]+)(?:@(?P<k>\d+))?(?:-l(?P<level>\d+))?$")


def metric_column(dataset: str, metric: str) -> str:
    """The results-table column of one metric on one dataset: ``"<dataset>:<metric>"``."""
    return f"{dataset}:{metric}"


def split_metric_column(column: str) -> tuple[str, str]:
    """(dataset, metric) of a metric column; raises ValueError for the other columns."""
    dataset, sep, metric = column.rpartition(":")
    if not sep or not dataset or not metric:
        raise ValueError(f"{column!r} is not a metric column (expected '<dataset>:<metric>')")
    return dataset, metric


def order_key(value: str, known: Sequence[str]) -> tuple[int, str]:
    """Sort key: the known values in their order, then the others alphabetically."""
    return (known.index(value), "") if value in known else (len(known), value)


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
        return MISSING
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
        return MISSING
    if value == 0:
        return "0"
    mantissa, exponent = f"{float(value):.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def format_metric(value: float | None, percent: bool = True, decimals: int = 1) -> str:
    """A metric as in the paper (×100, one decimal: ``41.7``) or raw (``percent=False, decimals=4``: ``0.4170``)."""
    if value is None or pd.isna(value):
        return MISSING
    return f"{float(value) * (100 if percent else 1):.{decimals}f}"


def percent_of(ratio: float | None) -> str:
    """A ratio as a whole percentage (``91%``), ``–`` when missing or not finite."""
    return MISSING if ratio is None or not math.isfinite(float(ratio)) else f"{100 * float(ratio):.0f}%"


def md_cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|")
