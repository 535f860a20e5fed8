"""Prometheus metrics of every stage, recorded through `ray.util.metrics`.

This module owns the metric names: the code that records them and the dashboards (`dashboards/generate.py`) both
read them from here, so the two cannot drift. Ray exports a metric `NAME` as `ray_NAME` (gauges), `ray_NAME_total`
(counters) and `ray_NAME_bucket|_sum|_count` (histograms). Outside a process connected to Ray nothing is created and
recording costs a dictionary lookup.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

MetricKind = Literal["counter", "gauge", "histogram"]

LATENCY_BOUNDARIES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
STEP_BOUNDARIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
BATCH_BOUNDARIES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: MetricKind
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()

    @property
    def series(self) -> str:
        """The name Prometheus stores (the `_bucket` series for a histogram)."""
        suffix = {"counter": "_total", "gauge": "", "histogram": "_bucket"}[self.kind]
        return f"ray_{self.name}{suffix}"

    def sample(self, part: Literal["sum", "count"]) -> str:
        """A histogram's `_sum` or `_count` series."""
        assert self.kind == "histogram", f"{self.name} is a {self.kind}"
        return f"ray_{self.name}_{part}"


# Training (rank 0 of each run; `run` is the run's name, a sweep cell's is `<sweep>-<cell>`).
TRAIN_FLOPS = Metric("retriever_train_flops", "gauge", "FLOPs spent by the run so far", ("run",))
TRAIN_FLOP_BUDGET = Metric("retriever_train_flop_budget", "gauge", "the run's FLOP budget (budget.flops)", ("run",))
TRAIN_BUDGET_FRACTION = Metric(
    "retriever_train_budget_fraction", "gauge", "fraction of the budget (FLOPs, else steps) spent", ("run",)
)
TRAIN_TOKENS_PER_SECOND = Metric(
    "retriever_train_tokens_per_second", "gauge", "tokens trained on per second, over all workers", ("run",)
)
TRAIN_LOSS = Metric(
    "retriever_train_loss", "gauge", "the last step's loss by part (total, cl, kd, ...)", ("run", "part")
)
TRAIN_STEPS = Metric("retriever_train_steps", "counter", "optimizer steps taken (skipped ones included)", ("run",))
TRAIN_STEP_SECONDS = Metric(
    "retriever_train_step_seconds", "histogram", "wall time of one training step", ("run",), STEP_BOUNDARIES
)
# The sweep driver: its cells by state (pending, running, done, failed).
SWEEP_CELLS = Metric("retriever_sweep_cells", "gauge", "cells of the sweep in each state", ("sweep", "state"))
# Encoding (each encoder process) and index building.
ENCODE_TEXTS = Metric("retriever_encode_texts", "counter", "texts encoded", ("kind",))
ENCODE_SECONDS = Metric(
    "retriever_encode_seconds", "histogram", "time of one encode call (a batch of texts)", ("kind",), STEP_BOUNDARIES
)
INDEX_PASSAGES = Metric("retriever_index_passages", "counter", "passages written into index shards", ("backend",))
INDEX_SHARD_SECONDS = Metric(
    "retriever_index_shard_seconds", "histogram", "time to build one index shard", ("backend",), STEP_BOUNDARIES
)
# Serving (per replica): batches gathered by `@serve.batch`, stage latencies and the router's requests.
SERVE_BATCH_SIZE = Metric(
    "retriever_serve_batch_size", "histogram", "requests per dynamic batch", ("deployment",), BATCH_BOUNDARIES
)
SERVE_STAGE_SECONDS = Metric(
    "retriever_serve_stage_seconds",
    "histogram",
    "time of one search stage: encode, shards (fan-out and wait), merge",
    ("stage", "model"),
    LATENCY_BOUNDARIES,
)
SERVE_REQUESTS = Metric("retriever_serve_requests", "counter", "requests answered by the router", ("route", "status"))

METRICS: tuple[Metric, ...] = (
    TRAIN_FLOPS,
    TRAIN_FLOP_BUDGET,
    TRAIN_BUDGET_FRACTION,
    TRAIN_TOKENS_PER_SECOND,
    TRAIN_LOSS,
    TRAIN_STEPS,
    TRAIN_STEP_SECONDS,
    SWEEP_CELLS,
    ENCODE_TEXTS,
    ENCODE_SECONDS,
    INDEX_PASSAGES,
    INDEX_SHARD_SECONDS,
    SERVE_BATCH_SIZE,
    SERVE_STAGE_SECONDS,
    SERVE_REQUESTS,
)

_created: dict[str, Any] = {}


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # never import Ray just to find out that it is not running
    return ray is not None and ray.is_initialized()


def _instrument(metric: Metric) -> Any | None:
    """This process's Ray metric object (made on first use), or None when the process is not connected to Ray."""
    found = _created.get(metric.name)
    if found is not None or not _ray_connected():
        return found
    from ray.util import metrics

    if metric.kind == "counter":
        made = metrics.Counter(metric.name, description=metric.description, tag_keys=metric.tags)
    elif metric.kind == "gauge":
        made = metrics.Gauge(metric.name, description=metric.description, tag_keys=metric.tags)
    else:
        made = metrics.Histogram(
            metric.name, description=metric.description, boundaries=list(metric.boundaries), tag_keys=metric.tags
        )
    _created[metric.name] = made
    return made


def record(metric: Metric, value: float, **tags: str) -> None:
    """Add `value` to a counter, set a gauge to it, or observe it in a histogram (tags: exactly the metric's)."""
    if sorted(tags) != sorted(metric.tags):
        raise ValueError(f"{metric.name} takes the tags {metric.tags}, not {tuple(tags)}")
    if metric.kind == "counter" and value == 0:
        return  # nothing to add (Ray's counters refuse 0)
    instrument = _instrument(metric)
    if instrument is None:
        return
    if metric.kind == "counter":
        instrument.inc(value, tags=tags)
    elif metric.kind == "gauge":
        instrument.set(value, tags=tags)
    else:
        instrument.observe(value, tags=tags)
