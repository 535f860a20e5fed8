"""A sweep's record files: file-safe names for cells, datasets and stages, and `result.json` records that are
written atomically (a record is complete or absent, never half written)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"
BASELINES_DIR = "baselines"


def safe_name(text: str) -> str:
    """`text` with every character but letters, digits, `-` and `.` replaced by `_` (a folder or file name)."""
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text)


def write_record(directory: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write `record` as `directory/result.json` through a temporary file and a rename; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f"{RESULT_FILE}.partial"
    partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    partial.replace(directory / RESULT_FILE)
    return record


def read_record(directory: Path) -> dict[str, Any] | None:
    """The record in `directory`, or None when it has none."""
    path = Path(directory) / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


__all__ = ["BASELINES_DIR", "RESULT_FILE", "read_record", "safe_name", "write_record"]
