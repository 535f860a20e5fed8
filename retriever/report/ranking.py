"""Which metric ranks the encoders of a sweep, and the best cell of each paradigm by it."""

from __future__ import annotations

from typing import Any

from retriever.config import ExperimentConfig


def primary_metric(cfg: ExperimentConfig) -> tuple[str, str]:
    """(dataset, metric) that ranks encoders: the first evaluation dataset's protocol's first metric."""
    from retriever.evaluation import protocol_for_dataset

    dataset = cfg.eval.datasets[0]
    return dataset, protocol_for_dataset(dataset).primary_metric


def best_cells(records: list[dict[str, Any]], dataset: str, metric: str) -> dict[str, dict[str, Any]]:
    """The best finished cell of each paradigm by `metric` on `dataset`."""
    best: dict[str, dict[str, Any]] = {}
    for record in records:
        value = record.get("metrics", {}).get(dataset, {}).get(metric)
        if record.get("status") != "ok" or value is None:
            continue
        current = best.get(record["paradigm"])
        if current is None or value > current["metrics"][dataset][metric]:
            best[record["paradigm"]] = record
    return best


__all__ = ["best_cells", "primary_metric"]
