"""One cell of a sweep, without Ray: its config and plan as the trials receive them, and the cell's work (train to
the budget, evaluate the exported encoder, log both to the cell's MLflow run) as a plain function that the Tune
trainable wraps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.config import ExperimentConfig, dump_config
from retriever.records import cell_id
from retriever.sweep.grid import cell_config, grid
from retriever.tracking import RunTracker, TrackingTarget, safe_metric_name

if TYPE_CHECKING:
    from retriever.flops import PlanCell


@dataclass(frozen=True)
class CellSpec:
    """A cell's config (axes and overrides applied) and its plan, made once by the driver."""

    config: ExperimentConfig
    plan: PlanCell


@dataclass(frozen=True)
class SweepCells:
    """What every trial of a sweep is given: each cell's spec by cell id, and where the cells log."""

    cells: dict[str, CellSpec] = field(default_factory=dict)
    parent_run_id: str | None = None
    tracking: TrackingTarget | None = None


def cell_specs(cfg: ExperimentConfig, plans: list[PlanCell]) -> dict[str, CellSpec]:
    """The spec of every cell of `cfg`'s grid; `plans` are the planner's, in grid order (`flops.plan_grid`)."""
    cells = grid(cfg)
    if [(p.backbone, p.paradigm, p.loss) for p in plans] != cells:
        raise ValueError(f"the plan does not match the grid {cells}: plan the sweep's current config")
    return {cell_id(*axes): CellSpec(cell_config(cfg, *axes), plan) for axes, plan in zip(cells, plans)}


def flat_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{"eval/<dataset>/<safe metric>": value}``: how a cell reports its evaluation to Tune and MLflow."""
    return {
        f"eval/{dataset}/{safe_metric_name(name)}": value
        for dataset, values in metrics.items()
        for name, value in values.items()
    }


def train_and_evaluate(
    spec: CellSpec,
    directory: Path,
    sweep: SweepCells,
    *,
    callbacks: list[Any] | None = None,
    on_report: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train the cell to its planned steps, evaluate its encoder into `directory/eval`, log it to the cell's run;
    returns the fields of the cell's record."""
    from retriever.pipeline import evaluate_encoder
    from retriever.train.trainer import run_training

    cell, plan = spec.config, spec.plan
    result = run_training(
        cell,
        parent_run_id=sweep.parent_run_id,
        callbacks=callbacks,
        on_report=on_report,
        planned_steps=plan.steps,
    )
    metrics = evaluate_encoder(result["export_dir"], cell.eval.datasets, cell, directory / "eval")
    _log_cell(RunTracker.of(sweep.tracking, result.get("tracking_run_id")), cell, directory, result, metrics)
    return {
        "parameters": plan.total_parameters,
        "trainable_parameters": plan.trainable_parameters,
        "planned_steps": plan.steps,
        "steps": result["steps"],
        "flops": result["flops"],
        "tokens": result["tokens"],
        "export_dir": result["export_dir"],
        "tracking_run_id": result.get("tracking_run_id"),
        "metrics": metrics,
    }


def _log_cell(
    tracker: RunTracker, cell: ExperimentConfig, directory: Path, result: dict[str, Any], metrics: dict[str, Any]
) -> None:
    """The cell's axes, evaluation, config, runs and encoder on its MLflow run, which this ends."""
    if not tracker.enabled:
        return
    axes = {"scale": cell.backbone.name, "paradigm": cell.encoder.paradigm, "loss": cell.loss.name}
    tracker.set_tags(axes)
    tracker.log_params(axes)
    tracker.log_metrics({k.removeprefix("eval/"): v for k, v in flat_metrics(metrics).items()}, step=result["steps"])
    config_file = directory / "config.yaml"
    config_file.write_text(dump_config(cell))
    tracker.log_artifact(config_file)
    tracker.log_artifact(directory / "eval", "eval")
    tracker.log_artifact(result["export_dir"], "encoder")
    tracker.end()


__all__ = ["CellSpec", "SweepCells", "cell_specs", "flat_metrics", "train_and_evaluate"]
