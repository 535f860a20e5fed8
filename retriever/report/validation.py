"""The records the report reads, checked: a cell record or a baseline record becomes a typed row, or a
`retriever.records.RecordError` that names the record and the field.

A cell record is a plain dict as the sweep writes it::

    {"backbone": "llama-3.2-1b", "paradigm": "sparse", "loss": "cl", "parameters": 1_235_814_400,
     "trainable_parameters": 11_272_192, "flops": 6.2e19, "steps": 33250, "status": "ok",
     "metrics": {"msmarco-passage/dev/small": {"mrr@10": 0.417, "recall@1000": 0.98}, ...}}

``metrics`` maps a dataset id to ranx-named scores in [0, 1] (``ndcg@10``, ``mrr@10-l2``, ...). A cell with
``status: "failed"`` needs no metrics (nor numbers). A baseline record is ``{"kind": "bm25" | "step0", "name",
"backbone", "paradigm", "parameters", "flops", "metrics", "status"}`` (backbone and paradigm null for BM25; a step-0
row needs both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from retriever.records import RecordError
from retriever.report.formatting import LOSSES, PARADIGMS

STATUSES = ("ok", "failed")
BASELINE_KINDS = ("bm25", "step0")
NUMBER_COLUMNS = ("parameters", "trainable_parameters", "flops", "steps")
INT_FIELDS = ("parameters", "trainable_parameters", "steps")


@dataclass(frozen=True)
class CellRow:
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


def parse_cell(record: Any, index: int) -> CellRow:
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
    numbers = {name: _number(record.get(name), where, name, name in INT_FIELDS) for name in NUMBER_COLUMNS}
    status = record["status"]
    if status == "ok":
        if numbers["parameters"] is None:
            raise RecordError(f"{where}: a cell with status 'ok' needs 'parameters' (total parameter count)")
        if "metrics" not in record or not record["metrics"]:
            raise RecordError(
                f"{where}: a cell with status 'ok' needs 'metrics'; mark cells that did not finish as status 'failed'"
            )
    metrics = _metrics(record.get("metrics"), where) if status == "ok" else {}
    return CellRow(record["backbone"], record["paradigm"], record["loss"], status, numbers, metrics, where)


@dataclass(frozen=True)
class BaselineRow:
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


def parse_baseline(record: Any, index: int) -> BaselineRow:
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
    numbers = {name: _number(record.get(name), where, name, name in INT_FIELDS) for name in NUMBER_COLUMNS}
    if status == "ok" and not record.get("metrics"):
        raise RecordError(f"{where}: a baseline with status 'ok' needs 'metrics'")
    metrics = _metrics(record.get("metrics"), where) if status == "ok" else {}
    return BaselineRow(kind, record["name"], backbone, paradigm, status, numbers, metrics)
