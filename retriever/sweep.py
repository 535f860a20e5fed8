"""The experiment service: a Ray Tune grid of backbone x paradigm x loss, every cell at the same FLOP budget.

Each cell is a Tune function trainable that trains its configuration (a Ray `TorchTrainer` with
`TuneReportCallback` when `train.num_workers > 0`, else in the trial's own process), evaluates the exported encoder
and reports the metrics. One MLflow parent run per sweep, one child run per cell. `resume=True` restores the Tune
experiment: finished cells are never re-run, unfinished ones continue from their checkpoints.

Layout of a sweep directory (`<train.output_dir>/sweeps/<name>/`):
    sweep.json          config, parent MLflow run id, cell ids
    tune/               the Tune experiment (restorable)
    cells/<cell>/       result.json (metrics, FLOPs, status), attempts.log, eval/ (runs, metrics.json)
    report/             results.md, results.csv, fits.json, plots (retriever report)
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retriever.config import ExperimentConfig, dump_config, flatten
from retriever.records import RESULT_FILE, safe_name, write_record
from retriever.tracking import RunTracker, artifact_location, ensure_experiment, tracking_uri

log = logging.getLogger(__name__)

STATE_FILE = "sweep.json"


def cell_id(backbone: str, paradigm: str, loss: str) -> str:
    """A file-system safe, stable cell name: `tiny-s__sparse__cl_kd`."""
    return f"{safe_name(backbone)}__{paradigm}__{safe_name(loss)}"


def cell_config(cfg: ExperimentConfig, backbone: str, paradigm: str, loss: str) -> ExperimentConfig:
    """The sweep's config specialised to one cell: its axes, the matching `sweep.overrides` (in order, later wins;
    `retriever.config.cell_settings`, which the planner shares) and its run name."""
    from retriever.config import cell_settings

    cell = cell_settings(cfg, backbone, paradigm, loss)
    cell.name = f"{cfg.name}-{cell_id(backbone, paradigm, loss)}"
    return cell


def _backbone_paradigms(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    return [(backbone, paradigm) for backbone in cfg.sweep.backbones for paradigm in cfg.sweep.paradigms]


def sweep_dir(cfg: ExperimentConfig) -> Path:
    return (Path(cfg.train.output_dir) / "sweeps" / cfg.name).resolve()


@dataclass
class SweepResult:
    directory: Path
    parent_run_id: str | None
    cells: list[dict[str, Any]]
    report: dict[str, str] | None


class FlopStopper:
    """Tune-side safety net: stop a cell whose reported FLOPs exceed the budget (the workers stop themselves)."""

    def __init__(self, budget: float | None, tolerance: float = 0.01) -> None:
        self.limit = None if budget is None else budget * (1 + tolerance)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.limit is not None and float(result.get("flops", 0.0)) > self.limit

    def stop_all(self) -> bool:
        return False


def _as_tune_stopper(stopper: FlopStopper):
    from ray.tune import Stopper

    class _Stopper(Stopper):
        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return stopper(trial_id, result)

        def stop_all(self) -> bool:
            return stopper.stop_all()

    return _Stopper()


def _tune_report(metrics: dict[str, Any]) -> None:
    from ray import tune

    tune.report({k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)})


def run_cell(config: dict[str, Any]) -> None:
    """The Tune trainable of one cell: train to the budget, evaluate, record the result."""
    from ray import tune

    state = json.loads((Path(config["sweep_dir"]) / STATE_FILE).read_text())
    cfg = ExperimentConfig.model_validate(state["config"])
    cell = cell_config(cfg, config["backbone"], config["paradigm"], config["loss"])
    directory = Path(config["sweep_dir"]) / "cells" / cell_id(config["backbone"], config["paradigm"], config["loss"])
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "attempts.log").open("a") as attempts:
        attempts.write(f"{datetime.datetime.now().isoformat()} trial {tune.get_context().get_trial_id()}\n")
    record: dict[str, Any] = {
        "cell": directory.name,
        "backbone": config["backbone"],
        "paradigm": config["paradigm"],
        "loss": config["loss"],
        "status": "failed",
    }
    try:
        record.update(_train_and_evaluate(cell, config, directory))
        record["status"] = "ok"
    except Exception as exc:  # the record says why; Tune marks the trial errored and the sweep goes on
        record["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        write_record(directory, record)
    _tune_report({"done": 1, "flops": record["flops"], **_flat_metrics(record["metrics"])})


def _flat_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    from retriever.tracking import safe_metric_name

    return {
        f"eval/{dataset}/{safe_metric_name(name)}": value
        for dataset, values in metrics.items()
        for name, value in values.items()
    }


def _train_and_evaluate(cell: ExperimentConfig, config: dict[str, Any], directory: Path) -> dict[str, Any]:
    from retriever.flops import plan_cell
    from retriever.pipeline import evaluate_encoder
    from retriever.train.trainer import run_training

    plan = plan_cell(cell)
    if cell.train.num_workers > 0:
        from ray.tune.integration.ray_train import TuneReportCallback

        result = run_training(cell, parent_run_id=config.get("parent_run_id"), callbacks=[TuneReportCallback()])
    else:
        result = run_training(cell, parent_run_id=config.get("parent_run_id"), on_report=_tune_report)
    metrics = evaluate_encoder(result["export_dir"], cell.eval.datasets, cell, directory / "eval")
    tracker = _cell_tracker(config, result.get("tracking_run_id"))
    if tracker.enabled:
        tracker.set_tags({"scale": cell.backbone.name, "paradigm": cell.encoder.paradigm, "loss": cell.loss.name})
        tracker.log_params({"scale": cell.backbone.name, "paradigm": cell.encoder.paradigm, "loss": cell.loss.name})
        tracker.log_metrics(
            {k.removeprefix("eval/"): v for k, v in _flat_metrics(metrics).items()}, step=result["steps"]
        )
        config_file = directory / "config.yaml"
        config_file.write_text(dump_config(cell))
        tracker.log_artifact(config_file)
        tracker.log_artifact(directory / "eval", "eval")
        tracker.log_artifact(result["export_dir"], "encoder")
        tracker.end()
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


def _cell_tracker(config: dict[str, Any], run_id: str | None) -> RunTracker:
    tracking = config.get("tracking")
    if not tracking or not run_id:
        return RunTracker.disabled()
    return RunTracker(tracking["uri"], tracking["experiment_id"], run_id)


def _resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What one cell's trial holds: its own CPUs when it trains in-process, else just the driver's share (the
    TorchTrainer reserves its workers separately)."""
    return {"CPU": cfg.sweep.cpus_per_trial}


def _max_concurrent(cfg: ExperimentConfig) -> int:
    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    import ray

    available = ray.cluster_resources()
    per_trial_cpu = cfg.sweep.cpus_per_trial + cfg.train.num_workers * cfg.train.cpus_per_worker
    by_cpu = int(available.get("CPU", 1) // per_trial_cpu) if per_trial_cpu else 1
    if cfg.train.use_gpu and cfg.train.num_workers:
        by_gpu = int(available.get("GPU", 0) // cfg.train.num_workers)
        return max(1, min(by_cpu, by_gpu))
    return max(1, by_cpu)


def _run_stage_task(stage: dict[str, Any], task: str, labels: dict[str, Any], parent: str | None) -> dict[str, Any]:
    from retriever.pretrain import run_stage

    return run_stage(ExperimentConfig.model_validate(stage), task, parent, **labels)


def _ray_stage_runner(cfg: ExperimentConfig, verbose: bool):
    """Run a group of pre-training stages as Ray tasks, each holding a cell's resources, so they share the cluster
    as the cells do."""
    import ray

    def run(jobs: list[tuple[ExperimentConfig, str, dict[str, Any]]], parent: str | None) -> list[dict[str, Any]]:
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=verbose)
        from retriever.flops import stage_flops

        remote = ray.remote(num_cpus=cfg.sweep.cpus_per_trial, max_retries=0)(_run_stage_task)
        # Costliest first, so that the stages running side by side end close together.
        order = sorted(range(len(jobs)), key=lambda i: -stage_flops(jobs[i][0], jobs[i][1]))
        refs = {i: remote.remote(jobs[i][0].model_dump(mode="json"), jobs[i][1], jobs[i][2], parent) for i in order}
        return [ray.get(refs[i]) for i in range(len(jobs))]

    return run


def _prepare(cfg: ExperimentConfig) -> ExperimentConfig:
    """Everything shared by the cells is built once, before any trial starts (no two trials race on it)."""
    from retriever.data.catalog import resolve_dataset, resolve_references
    from retriever.flops import plan_grid
    from retriever.train.trainer import prepare_training_data

    cfg = resolve_references(cfg)
    plan_grid(cfg)  # fails now, with the cell and the minimum budget, if a cell cannot afford one step
    # Overrides may give cells their own data or negatives: build each distinct training set once, here.
    prepared: set[str] = set()
    for backbone, paradigm in _backbone_paradigms(cfg):
        for loss in cfg.sweep.losses:
            cell = cell_config(cfg, backbone, paradigm, loss)
            key = cell.data.model_dump_json() + f"/{cell.loss.num_negatives}"
            if key not in prepared:
                prepared.add(key)
                prepare_training_data(cell)
    for dataset in cfg.eval.datasets:
        resolve_dataset(dataset, cfg)
    return cfg


def run_sweep(cfg: ExperimentConfig, *, resume: bool = False, verbose: bool = False) -> SweepResult:
    """Run (or resume) the grid; returns the per-cell records and the report paths. The console shows one progress
    line and the finished cells; `verbose` shows Tune's tables and every trial's output there too."""
    import ray
    from ray import tune

    root = sweep_dir(cfg)
    state_path = root / STATE_FILE
    tune_name = "tune"
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"{root}: no sweep to resume ({STATE_FILE} missing); run without --resume first")
        state = json.loads(state_path.read_text())
        cfg = ExperimentConfig.model_validate(state["config"])
    else:
        if state_path.is_file():
            raise FileExistsError(
                f"{root} already holds sweep {cfg.name!r}: resume it with --resume, or choose another name"
            )
        root.mkdir(parents=True, exist_ok=True)
        cfg = _prepare(cfg)
        state = {"config": cfg.model_dump(mode="json"), "parent_run_id": None}
    tracking = None
    if cfg.tracking.enabled:
        uri = tracking_uri(cfg.tracking, cfg.train.output_dir)
        experiment = ensure_experiment(
            uri, cfg.tracking.experiment, artifact_location(cfg.tracking, cfg.train.output_dir)
        )
        tracking = {"uri": uri, "experiment_id": experiment}
        parent = RunTracker.start(
            uri, experiment, run_name=cfg.name, run_id=state.get("parent_run_id"), tags={"retriever.kind": "sweep"}
        )
        if state.get("parent_run_id") is None:
            parent.log_params({"sweep." + k: v for k, v in flatten(cfg.sweep).items()})
            parent.log_params({"budget.flops": cfg.budget.flops, "budget.max_steps": cfg.budget.max_steps})
        state["parent_run_id"] = parent.run_id
    from retriever.sweep_console import stage_output

    stages_log = root / "stages.log"
    if (cfg.mntp.enabled or cfg.bow.enabled) and "pretrain" not in state:
        from retriever.pretrain import pretrain_backbones, stage_label

        planned = (len(cfg.sweep.backbones) if cfg.mntp.enabled else 0) + (
            len(cfg.sweep.backbones) * len(cfg.sweep.paradigms) if cfg.bow.enabled else 0
        )
        print(f"pre-training: {planned} stage(s); output: {stages_log}", file=sys.stderr)
        with stage_output(stages_log, verbose):
            cfg, stages = pretrain_backbones(cfg, state["parent_run_id"], _ray_stage_runner(cfg, verbose))
        for stage in stages:
            print(
                f"  {stage_label(stage)}: {stage['steps']} {stage['task']} steps, {stage['flops']:.2e} FLOPs",
                file=sys.stderr,
            )
        state["config"], state["pretrain"] = cfg.model_dump(mode="json"), stages
        if tracking:
            RunTracker(tracking["uri"], tracking["experiment_id"], state["parent_run_id"]).log_metrics(
                {f"pretrain/{stage_label(s)}/{s['task']}/{k}": float(s[k]) for s in stages for k in ("flops", "steps")}
            )
    state_path.write_text(json.dumps(state, indent=2) + "\n")
    if cfg.sweep.baselines:
        from retriever.baselines import run_baselines

        cells = [cell_config(cfg, b, p, cfg.sweep.losses[0]) for b, p in _backbone_paradigms(cfg)]
        print(f"baselines: BM25 and {len(cells)} step-0 encoder(s); output: {stages_log}", file=sys.stderr)
        with stage_output(stages_log, verbose):
            baselines = run_baselines(cfg, root, cells)
        dataset = cfg.eval.datasets[0]
        for record in baselines:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in record["metrics"].get(dataset, {}).items())
            print(f"  {record['name']}: {shown}", file=sys.stderr)

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=verbose)  # else trial output: cells/<cell>/trial.log
    from retriever.sweep_console import SweepConsole

    concurrency = _max_concurrent(cfg)
    console = SweepConsole.for_sweep(cfg, root, concurrency, verbose=verbose)
    tune_verbosity = int(os.environ.get("RETRIEVER_TUNE_VERBOSE", "1"))  # Tune's tables: tune.log unless verbose
    trainable = tune.with_resources(console.trainable(run_cell), _resources(cfg))
    if resume and tune.Tuner.can_restore(str(root / tune_name)):
        tuner = tune.Tuner.restore(str(root / tune_name), trainable, resume_unfinished=True, resume_errored=True)
        console.attach(tuner, tune_verbosity)
    else:
        param_space = {
            "sweep_dir": str(root),  # cells read the (resolved) config from its sweep.json
            "parent_run_id": state["parent_run_id"],
            "tracking": tracking,
            "backbone": tune.grid_search(cfg.sweep.backbones),
            "paradigm": tune.grid_search(cfg.sweep.paradigms),
            "loss": tune.grid_search(cfg.sweep.losses),
        }
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(
                name=tune_name,
                storage_path=str(root),
                stop=_as_tune_stopper(FlopStopper(cfg.budget.flops)),
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=tune_verbosity,
                callbacks=[console.callback()],
            ),
        )
    with console.session():
        tuner.fit()
    cells = collect_cells(root)
    report = None
    if cells:
        from retriever.report import write_sweep_report

        report = write_sweep_report(root, cfg, state.get("parent_run_id"), tracking)
    if tracking:
        RunTracker(tracking["uri"], tracking["experiment_id"], state["parent_run_id"]).end()
    return SweepResult(root, state.get("parent_run_id"), cells, report)


def collect_cells(root: Path) -> list[dict[str, Any]]:
    """The result records of a sweep's cells (finished or failed), in grid order of their names."""
    records = []
    for path in sorted((Path(root) / "cells").glob(f"*/{RESULT_FILE}")):
        records.append(json.loads(path.read_text()))
    return records
