"""Write the Grafana dashboards of this folder from code: `python dashboards/generate.py` (check: `--check`).

The queries use the metric names of `retriever.telemetry` (what the code records) and the Serve metrics Ray
exports itself, so a renamed metric changes the JSON here and the test that compares the two fails until it is
regenerated.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

from retriever import telemetry as t

HERE = Path(__file__).resolve().parent
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
WIDTH, HEIGHT = 12, 8


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # or "stat"


def quantiles(metric: t.Metric, by: str, selector: str = "") -> tuple[Query, ...]:
    """p50, p95 and p99 of a histogram, per `by` label."""
    rate = f"sum by ({by}, le) (rate({metric.series}{selector}[{RATE}]))"
    legend = f"{{{{{by}}}}}"
    return tuple(Query(f"histogram_quantile({q}, {rate})", f"p{round(q * 100)} {legend}") for q in (0.5, 0.95, 0.99))


def mean(metric: t.Metric, by: str, selector: str = "") -> Query:
    """The mean of a histogram's observations over the rate window, per `by` label."""
    total = f"sum by ({by}) (rate({metric.sample('sum')}{selector}[{RATE}]))"
    count = f"sum by ({by}) (rate({metric.sample('count')}{selector}[{RATE}]))"
    return Query(f"{total} / {count}", f"mean {{{{{by}}}}}")


# Ray Serve's own histogram of the time a replica spends on a request (not recorded by this project).
SERVE_PROCESSING = t.Metric(
    "serve_deployment_processing_latency_ms", "histogram", "Ray Serve: request time in a replica", ("deployment",)
)
RUN = '{run=~"$run"}'
SWEEP_PANELS: dict[str, list[Panel]] = {
    "Cells": [
        Panel(
            "Cells by state",
            "Cells of the selected sweeps that are pending, running, done or failed (the sweep driver's counts).",
            "none",
            (Query(f'sum by (state) ({t.SWEEP_CELLS.series}{{sweep=~"$sweep"}})', "{{state}}"),),
            kind="stat",
        ),
        Panel(
            "Budget spent per cell",
            "Fraction of each run's budget spent (FLOPs, or steps when the budget is a step count).",
            "percentunit",
            (Query(f"max by (run) ({t.TRAIN_BUDGET_FRACTION.series}{RUN})", "{{run}}"),),
        ),
        Panel(
            "FLOPs vs budget per cell",
            "FLOPs spent by each run, next to its FLOP budget (budget.flops).",
            "short",
            (
                Query(f"max by (run) ({t.TRAIN_FLOPS.series}{RUN})", "{{run}}"),
                Query(f"max by (run) ({t.TRAIN_FLOP_BUDGET.series}{RUN})", "budget {{run}}"),
            ),
        ),
    ],
    "Training": [
        Panel(
            "Loss",
            "The last step's loss of each run, total and by part (cl, kd, regularisers).",
            "none",
            (Query(f"max by (run, part) ({t.TRAIN_LOSS.series}{RUN})", "{{run}} {{part}}"),),
        ),
        Panel(
            "Tokens per second",
            "Tokens trained on per second by each run, summed over its workers.",
            "short",
            (Query(f"max by (run) ({t.TRAIN_TOKENS_PER_SECOND.series}{RUN})", "{{run}}"),),
        ),
        Panel(
            "Step time",
            "Wall time of one training step per run (collate, forward, backward, optimizer).",
            "s",
            (*quantiles(t.TRAIN_STEP_SECONDS, "run", RUN)[:2], mean(t.TRAIN_STEP_SECONDS, "run", RUN)),
        ),
        Panel(
            "Steps per second",
            "Optimizer steps per second per run.",
            "short",
            (Query(f"sum by (run) (rate({t.TRAIN_STEPS.series}{RUN}[{RATE}]))", "{{run}}"),),
        ),
    ],
    "Encoding and indexing": [
        Panel(
            "Texts encoded per second",
            "Queries and passages encoded per second, over every encoder process of the cluster.",
            "short",
            (Query(f"sum by (kind) (rate({t.ENCODE_TEXTS.series}[{RATE}]))", "{{kind}}"),),
        ),
        Panel(
            "Encode call time",
            "Time of one encode call (a batch of texts).",
            "s",
            (mean(t.ENCODE_SECONDS, "kind"),),
        ),
        Panel(
            "Passages indexed",
            "Passages written into index shards, by index backend.",
            "short",
            (Query(f"sum by (backend) ({t.INDEX_PASSAGES.series})", "{{backend}}"),),
        ),
        Panel(
            "Shard build time",
            "Time to build one index shard, by backend.",
            "s",
            (mean(t.INDEX_SHARD_SECONDS, "backend"),),
        ),
    ],
}

APP = '{application=~"$application"}'
SERVING_PANELS: dict[str, list[Panel]] = {
    "Traffic": [
        Panel(
            "Requests per second",
            "Requests the router answered, by route and HTTP status.",
            "reqps",
            (Query(f"sum by (route, status) (rate({t.SERVE_REQUESTS.series}[{RATE}]))", "{{route}} {{status}}"),),
        ),
        Panel(
            "Errors per second",
            "Requests answered with a 4xx or 5xx status, by route and status.",
            "reqps",
            (
                Query(
                    f'sum by (route, status) (rate({t.SERVE_REQUESTS.series}{{status=~"[45].."}}[{RATE}]))',
                    "{{route}} {{status}}",
                ),
            ),
        ),
        Panel(
            "Replica processing latency",
            "Time a replica of each deployment spends on a request (Ray Serve's own histogram).",
            "ms",
            quantiles(SERVE_PROCESSING, "deployment", APP),
        ),
    ],
    "Search stages": [
        Panel(
            "Stage latency",
            "Per search stage: encode (the query encoder), shards (fan-out and wait for every shard), merge.",
            "s",
            quantiles(t.SERVE_STAGE_SECONDS, "stage"),
        ),
        Panel(
            "Batch size",
            "Requests gathered into one dynamic batch, per deployment (router, query encoder, index shards).",
            "short",
            (*quantiles(t.SERVE_BATCH_SIZE, "deployment")[:2], mean(t.SERVE_BATCH_SIZE, "deployment")),
        ),
    ],
    "Capacity": [
        Panel(
            "Healthy replicas",
            "Healthy replicas of each deployment.",
            "none",
            (Query(f"sum by (deployment) (ray_serve_deployment_replica_healthy{APP})", "{{deployment}}"),),
        ),
        Panel(
            "Requests in flight per replica",
            "Requests each deployment's replicas are processing.",
            "short",
            (Query(f"sum by (deployment) (ray_serve_replica_processing_queries{APP})", "{{deployment}}"),),
        ),
    ],
}


def _variable(name: str, label: str, query: str) -> dashboard.QueryVariable:
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


def _panel(panel: Panel, panel_id: int) -> Any:
    builder = (stat.Panel() if panel.kind == "stat" else timeseries.Panel()).id(panel_id).title(panel.title)
    builder = builder.description(panel.description).unit(panel.unit).datasource(DATASOURCE)
    builder = builder.height(HEIGHT).span(WIDTH)
    for ref, query in zip("ABCDEFGH", panel.queries, strict=False):
        builder = builder.with_target(prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(ref))
    return builder


def _dashboard(
    uid: str, title: str, tags: list[str], rows: dict[str, list[Panel]], variables: list[Any]
) -> dict[str, Any]:
    builder = (
        dashboard.Dashboard(title)
        .uid(uid)
        .tags(tags)
        .refresh("10s")
        .time("now-1h", "now")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for variable in variables:
        builder = builder.with_variable(variable)
    panel_id = 0
    for row, panels in rows.items():
        panel_id += 1
        builder = builder.with_row(dashboard.Row(row).id(panel_id))
        for panel in panels:
            panel_id += 1
            builder = builder.with_panel(_panel(panel, panel_id))
    return json.loads(JSONEncoder(sort_keys=True, indent=2).encode(builder.build()))


def sweep_dashboard() -> dict[str, Any]:
    return _dashboard(
        "retriever-sweep",
        "retriever: sweep",
        ["retriever", "ray", "train"],
        SWEEP_PANELS,
        [
            _variable("sweep", "Sweep", f"label_values({t.SWEEP_CELLS.series}, sweep)"),
            _variable("run", "Run", f"label_values({t.TRAIN_FLOPS.series}, run)"),
        ],
    )


def serving_dashboard() -> dict[str, Any]:
    return _dashboard(
        "retriever-serving",
        "retriever: serving",
        ["retriever", "ray", "serve"],
        SERVING_PANELS,
        [_variable("application", "Application", "label_values(ray_serve_deployment_replica_healthy, application)")],
    )


DASHBOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    "sweep.json": sweep_dashboard,
    "serving.json": serving_dashboard,
}


def rendered(build: Callable[[], dict[str, Any]]) -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a JSON file differs from the code")
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: this one)")
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path = args.out / name
        text = rendered(build)
        old = path.read_text() if path.is_file() else ""
        if old == text:
            continue
        if args.check:
            stale.append(name)
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), name, "generated"))
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run `python dashboards/generate.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
