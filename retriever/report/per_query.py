"""Per-query values of a sweep's cells: each finished cell's TREC run scored query by query against a dataset's judged
queries (queries missing from a run score 0, as in the mean metrics), the input of the findings and of the
significance tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retriever.records import cell_dir, run_file


@dataclass(frozen=True)
class CellValues:
    """One sweep cell for the findings: its grid position, size, status and per-query metric values.

    ``values`` are aligned with the query list the cells share (None when the cell failed or has no run; ``note``
    then says why).
    """

    backbone: str
    paradigm: str
    loss: str
    parameters: float | None
    status: str
    values: np.ndarray | None = None
    note: str | None = None

    @property
    def usable(self) -> bool:
        return self.status == "ok" and self.values is not None

    @property
    def label(self) -> str:
        return f"{self.backbone} {self.paradigm} {self.loss.upper()}"


def per_query_values(
    run_file: str | Path, qrels: Mapping[str, Mapping[str, int]], dataset: str, metric: str
) -> dict[str, float]:
    """Per-query values of ``metric`` for the TREC run in ``run_file`` under ``dataset``'s protocol.

    Keys are the judged queries of ``qrels`` (queries missing from the run score 0), as in the mean metrics.
    """
    from retriever.evaluation import evaluate_detailed, protocol_for_dataset
    from retriever.trec import read_run

    result = evaluate_detailed(read_run(run_file), qrels, protocol_for_dataset(dataset), [metric], str(run_file))
    return result.per_query[metric]


def cell_run_file(root: str | Path, record: Mapping[str, Any], dataset: str) -> Path:
    """Where a cell's run on ``dataset`` lives: ``cells/<cell>/eval/<safe dataset>/run.trec``."""
    return run_file(cell_dir(root, dict(record)), dataset)


def load_cell_values(
    root: str | Path,
    records: Sequence[Mapping[str, Any]],
    dataset: str,
    metric: str,
    qrels: Mapping[str, Mapping[str, int]],
) -> tuple[list[str], list[CellValues]]:
    """(judged query ids, cells) of a sweep directory: each finished cell's per-query values from its run file."""
    queries = sorted(qrels)
    cells = []
    for record in records:
        values, note = None, None
        if record.get("status") == "ok":
            run_file = cell_run_file(root, record, dataset)
            if run_file.is_file():
                by_query = per_query_values(run_file, qrels, dataset, metric)
                values = np.asarray([by_query[q] for q in queries], dtype=float)
            else:
                note = f"no run file {run_file}"
        else:
            note = "cell failed"
        parameters = record.get("parameters")
        cells.append(
            CellValues(
                backbone=str(record["backbone"]),
                paradigm=str(record["paradigm"]),
                loss=str(record["loss"]),
                parameters=None if parameters is None else float(parameters),
                status=str(record.get("status")),
                values=values,
                note=note,
            )
        )
    return queries, cells
