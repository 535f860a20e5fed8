"""A sweep's record files: file-safe names for cells, datasets and stages, where a cell's or a baseline's records and
runs live, and `result.json` records that are written atomically (a record is complete or absent, never half
written).

Layout under a sweep directory: ``cells/<cell>/result.json`` and ``baselines/<id>/result.json``, each with its runs
at ``<record dir>/eval/<safe dataset>/run.trec`` (as `retriever.pipeline.evaluate_encoder` writes them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retriever.errors import UserError
from retriever.outputs import write_text_atomic

RESULT_FILE = "result.json"
CELLS_DIR = "cells"
BASELINES_DIR = "baselines"
EVAL_DIR = "eval"
RUN_FILE = "run.trec"
SWEEP_STATE_FILE = "sweep.json"


class RecordError(UserError, ValueError):
    """A sweep result record is malformed (the message names the record and the field)."""


def safe_name(text: str) -> str:
    """`text` with every character but letters, digits, `-` and `.` replaced by `_` (a folder or file name)."""
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text)


def cell_id(backbone: str, paradigm: str, loss: str) -> str:
    """A file-system safe, stable cell name: `tiny-s__sparse__cl_kd`."""
    return f"{safe_name(backbone)}__{paradigm}__{safe_name(loss)}"


def cell_dir(root: str | Path, record: dict[str, Any]) -> Path:
    """The folder of a cell record (its ``cell`` name, else the one its axes give)."""
    cell = record.get("cell") or cell_id(record["backbone"], record["paradigm"], record["loss"])
    return Path(root) / CELLS_DIR / str(cell)


def run_file(record_dir: str | Path, dataset: str) -> Path:
    """Where the run of a cell or baseline on ``dataset`` lives: ``<record dir>/eval/<safe dataset>/run.trec``."""
    return Path(record_dir) / EVAL_DIR / safe_name(dataset) / RUN_FILE


def write_record(directory: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write `record` as `directory/result.json` through a temporary file and a rename; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / RESULT_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def read_record(directory: Path) -> dict[str, Any] | None:
    """The record in `directory`, or None when it has none."""
    path = Path(directory) / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _read_all(folder: Path, what: str) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(folder.glob(f"*/{RESULT_FILE}")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise RecordError(f"{path}: expected a JSON object (a {what} record), got {type(record).__name__}")
        found.append((path, record))
    return found


def collect_cells(root: str | Path) -> list[dict[str, Any]]:
    """The result records of a sweep's cells (finished or failed), in grid order of their names."""
    return [record for _, record in _read_all(Path(root) / CELLS_DIR, "cell")]


def collect_baselines(root: str | Path) -> list[dict[str, Any]]:
    """The baseline records of a sweep, ``<sweep>/baselines/<id>/result.json`` (BM25, step-0 encoders), in id order;
    each gets its folder name as ``id`` unless it has one."""
    return [{"id": path.parent.name, **record} for path, record in _read_all(Path(root) / BASELINES_DIR, "baseline")]


__all__ = [
    "BASELINES_DIR",
    "CELLS_DIR",
    "RESULT_FILE",
    "RecordError",
    "cell_dir",
    "cell_id",
    "collect_baselines",
    "collect_cells",
    "read_record",
    "run_file",
    "safe_name",
    "write_record",
]


def read_sweep_state(sweep_dir: str | Path) -> dict[str, Any]:
    """A sweep folder's state (`sweep.json`), which holds the sweep's experiment config under ``config``."""
    path = Path(sweep_dir) / SWEEP_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{sweep_dir}: not a sweep directory ({SWEEP_STATE_FILE} missing)")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"{path}:{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else str(path)
        raise RecordError(f"{where}: not valid JSON ({exc}); the sweep's state file is damaged") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise RecordError(f"{path}: no 'config' object; not the state file of a sweep (`retriever sweep` writes it)")
    return state
