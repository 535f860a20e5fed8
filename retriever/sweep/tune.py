"""The sweep on Ray Tune: one function trainable per cell (`run_cell`), the FLOP safety net (`FlopStopper`) and the
Tuner of a grid, new or restored.

Each trial trains its cell (a Ray `TorchTrainer` with `TuneReportCallback` when `train.num_workers > 0`, else in
the trial's own process), evaluates the exported encoder and reports the metrics. The trials receive the cells'
configs and plans through `tune.with_parameters` (made once by the driver); their Tune config holds only the sweep
folder and the cell's axes.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.records import CELLS_DIR, cell_id, write_record
from retriever.sweep.cell import SweepCells, flat_metrics, train_and_evaluate

if TYPE_CHECKING:
    from ray.tune import Stopper, Tuner

    from retriever.config import ExperimentConfig

TUNE_DIR = "tune"


class FlopStopper:
    """Tune-side safety net: stop a cell whose reported FLOPs exceed the budget (the workers stop themselves)."""

    def __init__(self, budget: float | None, tolerance: float = 0.01) -> None:
        self.limit = None if budget is None else budget * (1 + tolerance)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.limit is not None and float(result.get("flops", 0.0)) > self.limit

    def stop_all(self) -> bool:
        return False


def tune_stopper(stopper: FlopStopper) -> Stopper:
    """`stopper` as a `ray.tune.Stopper`."""
    from ray.tune import Stopper

    class _Stopper(Stopper):
        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return stopper(trial_id, result)

        def stop_all(self) -> bool:
            return stopper.stop_all()

    return _Stopper()


def report_to_tune(metrics: dict[str, Any]) -> None:
    """Report the finite numbers of `metrics` to Tune."""
    from ray import tune

    tune.report({k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)})


def run_cell(config: dict[str, Any], sweep: SweepCells) -> None:
    """The Tune trainable of one cell: train to the budget, evaluate, record the result (`cells/<cell>/`)."""
    from ray import tune

    name = cell_id(config["backbone"], config["paradigm"], config["loss"])
    directory = Path(config["sweep_dir"]) / CELLS_DIR / name
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "attempts.log").open("a") as attempts:
        attempts.write(f"{datetime.datetime.now().isoformat()} trial {tune.get_context().get_trial_id()}\n")
    record: dict[str, Any] = {"cell": name, "status": "failed"}
    record |= {key: config[key] for key in ("backbone", "paradigm", "loss")}
    spec = sweep.cells[name]
    if spec.config.train.num_workers > 0:
        from ray.tune.integration.ray_train import TuneReportCallback

        reporting: dict[str, Any] = {"callbacks": [TuneReportCallback()]}
    else:
        reporting = {"on_report": report_to_tune}
    try:
        record.update(train_and_evaluate(spec, directory, sweep, **reporting))
        record["status"] = "ok"
    except Exception as exc:  # the record says why; Tune marks the trial errored and the sweep goes on
        record["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        write_record(directory, record)
    report_to_tune({"done": 1, "flops": record["flops"], **flat_metrics(record["metrics"])})


def grid_tuner(
    cfg: ExperimentConfig,
    root: Path,
    trainable: Callable[..., None],
    *,
    resume: bool,
    concurrency: int,
    verbosity: int,
    callbacks: list[Any],
) -> tuple[Tuner, bool]:
    """The Tuner of `cfg`'s grid under `root/tune`, restored when `resume` finds it; returns it and whether it
    was restored. `trainable` is `run_cell` with its parameters and resources attached."""
    from ray import tune

    path = str(root / TUNE_DIR)
    if resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True), True
    param_space = {
        "sweep_dir": str(root),
        "backbone": tune.grid_search(cfg.sweep.backbones),
        "paradigm": tune.grid_search(cfg.sweep.paradigms),
        "loss": tune.grid_search(cfg.sweep.losses),
    }
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(root),
            stop=tune_stopper(FlopStopper(cfg.budget.flops)),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=verbosity,
            callbacks=callbacks,
        ),
    )
    return tuner, False


__all__ = ["FlopStopper", "grid_tuner", "report_to_tune", "run_cell", "tune_stopper"]
