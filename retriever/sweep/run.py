"""Run or resume a sweep: a Ray Tune grid of backbone x paradigm x loss, every cell at the same FLOP budget.

One MLflow parent run per sweep, one child run per cell. `resume=True` restores the Tune experiment: finished cells
are never re-run, unfinished ones continue from their checkpoints.

Layout of a sweep directory (`<train.output_dir>/sweeps/<name>/`):
    sweep.json          config, plan of every cell, parent MLflow run id, pre-training stages (read on resume)
    stages.log          output of the pre-training stages and baselines
    tune/               the Tune experiment (restorable)
    cells/<cell>/       result.json (metrics, FLOPs, status), attempts.log, eval/ (runs, metrics.json)
    baselines/<id>/     result.json and eval/ of BM25 and the step-0 encoders
    report/             results.md, results.csv, fits.json, findings, plots (`retriever.report`)
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retriever.config import ExperimentConfig, flatten
from retriever.outputs import write_text_atomic
from retriever.records import collect_cells
from retriever.sweep.grid import STATE_FILE, backbone_paradigms, cell_config, prepare, sweep_dir
from retriever.tracking import RunTracker, TrackingTarget, open_experiment

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    directory: Path
    parent_run_id: str | None
    cells: list[dict[str, Any]]
    report: dict[str, str] | None


def _load_or_start(cfg: ExperimentConfig, root: Path, resume: bool) -> tuple[ExperimentConfig, dict[str, Any]]:
    """The sweep's config and state: read from sweep.json on resume, else prepared (and planned) now."""
    from retriever.flops import plan_to_json

    state_path = root / STATE_FILE
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"{root}: no sweep to resume ({STATE_FILE} missing); run without --resume first")
        state = json.loads(state_path.read_text())
        return ExperimentConfig.model_validate(state["config"]), state
    if state_path.is_file():
        raise FileExistsError(
            f"{root} already holds sweep {cfg.name!r}: resume it with --resume, or choose another name"
        )
    root.mkdir(parents=True, exist_ok=True)
    cfg, plans = prepare(cfg)
    return cfg, {"config": cfg.model_dump(mode="json"), "plan": plan_to_json(plans), "parent_run_id": None}


def _start_parent_run(cfg: ExperimentConfig, state: dict[str, Any]) -> TrackingTarget | None:
    """Open the experiment and start (or resume) the sweep's parent run; its id goes into `state`."""
    tracking = open_experiment(cfg.tracking, cfg.train.output_dir)
    if tracking is None:
        return None
    parent = RunTracker.start(
        tracking.uri,
        tracking.experiment_id,
        run_name=cfg.name,
        run_id=state.get("parent_run_id"),
        tags={"retriever.kind": "sweep"},
    )
    if state.get("parent_run_id") is None:
        parent.log_params({"sweep." + k: v for k, v in flatten(cfg.sweep).items()})
        parent.log_params({"budget.flops": cfg.budget.flops, "budget.max_steps": cfg.budget.max_steps})
    state["parent_run_id"] = parent.run_id
    return tracking


def _pretrain(
    cfg: ExperimentConfig, state: dict[str, Any], tracking: TrackingTarget | None, stages_log: Path, verbose: bool
) -> ExperimentConfig:
    """Run the pre-training stages (once: a resumed sweep has them in `state`); returns the config whose cells
    continue their products."""
    from retriever.flops import plan_grid, plan_to_json
    from retriever.sweep.console import stage_output
    from retriever.sweep.pretrain import planned_stages, pretrain_backbones, ray_stage_runner, stage_label

    print(f"pre-training: {planned_stages(cfg)} stage(s); output: {stages_log}", file=sys.stderr)
    with stage_output(stages_log, verbose):
        cfg, stages = pretrain_backbones(cfg, state["parent_run_id"], ray_stage_runner(cfg, verbose))
    for stage in stages:
        print(
            f"  {stage_label(stage)}: {stage['steps']} {stage['task']} steps, {stage['flops']:.2e} FLOPs",
            file=sys.stderr,
        )
    state["config"], state["pretrain"] = cfg.model_dump(mode="json"), stages
    # The cells now continue the stages' products (their adapters may differ from what was assumed): plan them again.
    state["plan"] = plan_to_json(plan_grid(cfg))
    RunTracker.of(tracking, state["parent_run_id"]).log_metrics(
        {f"pretrain/{stage_label(s)}/{s['task']}/{k}": float(s[k]) for s in stages for k in ("flops", "steps")}
    )
    return cfg


def _baselines(cfg: ExperimentConfig, root: Path, stages_log: Path, verbose: bool) -> None:
    """BM25 and the step-0 encoders, shown on the console with their primary dataset's metrics."""
    from retriever.report.baselines import run_baselines
    from retriever.sweep.console import stage_output

    cells = [cell_config(cfg, b, p, cfg.sweep.losses[0]) for b, p in backbone_paradigms(cfg)]
    print(f"baselines: BM25 and {len(cells)} step-0 encoder(s); output: {stages_log}", file=sys.stderr)
    with stage_output(stages_log, verbose):
        baselines = run_baselines(cfg, root, cells)
    dataset = cfg.eval.datasets[0]
    for record in baselines:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in record["metrics"].get(dataset, {}).items())
        print(f"  {record['name']}: {shown}", file=sys.stderr)


def _run_grid(
    cfg: ExperimentConfig,
    root: Path,
    state: dict[str, Any],
    tracking: TrackingTarget | None,
    resume: bool,
    verbose: bool,
) -> None:
    """The grid on Ray Tune, behind the sweep's console."""
    import ray
    from ray import tune

    from retriever.flops import plan_from_json
    from retriever.sweep.cell import SweepCells, cell_specs
    from retriever.sweep.console import SweepConsole
    from retriever.sweep.grid import max_concurrent, trial_resources
    from retriever.sweep.tune import grid_tuner, run_cell

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=verbose)  # else trial output: cells/<cell>/trial.log
    concurrency = max_concurrent(cfg, ray.cluster_resources())
    console = SweepConsole.for_sweep(cfg, root, concurrency, verbose=verbose)
    tune_verbosity = int(os.environ.get("RETRIEVER_TUNE_VERBOSE", "1"))  # Tune's tables: tune.log unless verbose
    sweep = SweepCells(cell_specs(cfg, plan_from_json(state["plan"])), state.get("parent_run_id"), tracking)
    trainable = tune.with_resources(
        tune.with_parameters(console.trainable(run_cell), sweep=sweep), trial_resources(cfg)
    )
    tuner, restored = grid_tuner(
        cfg,
        root,
        trainable,
        resume=resume,
        concurrency=concurrency,
        verbosity=tune_verbosity,
        callbacks=[console.callback()],
    )
    if restored:
        console.attach(tuner, tune_verbosity)
    with console.session():
        tuner.fit()


def run_sweep(cfg: ExperimentConfig, *, resume: bool = False, verbose: bool = False) -> SweepResult:
    """Run (or resume) the grid; returns the per-cell records and the report paths. The console shows one progress
    line and the finished cells; `verbose` shows Tune's tables and every trial's output there too."""
    root = sweep_dir(cfg)
    cfg, state = _load_or_start(cfg, root, resume)
    if "plan" not in state:  # a sweep started before plans were kept in sweep.json
        from retriever.flops import plan_grid, plan_to_json

        state["plan"] = plan_to_json(plan_grid(cfg))
    tracking = _start_parent_run(cfg, state)
    parent = RunTracker.of(tracking, state.get("parent_run_id"))
    try:
        stages_log = root / "stages.log"
        if (cfg.mntp.enabled or cfg.bow.enabled) and "pretrain" not in state:
            cfg = _pretrain(cfg, state, tracking, stages_log, verbose)
        write_text_atomic(root / STATE_FILE, json.dumps(state, indent=2) + "\n")
        if cfg.sweep.baselines:
            _baselines(cfg, root, stages_log, verbose)
        _run_grid(cfg, root, state, tracking, resume, verbose)
        cells = collect_cells(root)
        report = None
        if cells:
            from retriever.report.sweep_report import write_sweep_report

            report = write_sweep_report(root, cfg, state.get("parent_run_id"), tracking)
    except BaseException as exc:
        # FAILED (KILLED on an interrupt) with the error as a tag, not RUNNING forever; --resume reopens it.
        try:
            parent.fail(exc)
        except Exception:
            log.exception("could not mark the sweep's MLflow run %s as failed", parent.run_id)
        raise
    parent.end()
    return SweepResult(root, state.get("parent_run_id"), cells, report)


__all__ = ["SweepResult", "run_sweep"]
