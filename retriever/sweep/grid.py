"""The grid of a sweep: its cells (backbone x paradigm x loss) and their configs, the sweep's folder, what one
trial holds and how many run at once, and everything the cells share, built once before any trial starts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from retriever.config import ExperimentConfig
from retriever.records import SWEEP_STATE_FILE, cell_id

if TYPE_CHECKING:
    from retriever.flops import PlanCell

STATE_FILE = SWEEP_STATE_FILE


def cell_config(cfg: ExperimentConfig, backbone: str, paradigm: str, loss: str) -> ExperimentConfig:
    """The sweep's config specialised to one cell: its axes, the matching `sweep.overrides` (in order, later wins;
    `retriever.config.cell_settings`, which the planner shares) and its run name."""
    from retriever.config import cell_settings

    cell = cell_settings(cfg, backbone, paradigm, loss)
    cell.name = f"{cfg.name}-{cell_id(backbone, paradigm, loss)}"
    return cell


def backbone_paradigms(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    return [(backbone, paradigm) for backbone in cfg.sweep.backbones for paradigm in cfg.sweep.paradigms]


def grid(cfg: ExperimentConfig) -> list[tuple[str, str, str]]:
    """Every (backbone, paradigm, loss) of the sweep, in the planner's and Tune's nesting order."""
    return [(b, p, loss) for b, p in backbone_paradigms(cfg) for loss in cfg.sweep.losses]


def sweep_dir(cfg: ExperimentConfig) -> Path:
    return (Path(cfg.train.output_dir) / "sweeps" / cfg.name).resolve()


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What one cell's trial holds: its own CPUs when it trains in-process, else just the driver's share (the
    TorchTrainer reserves its workers separately)."""
    return {"CPU": cfg.sweep.cpus_per_trial}


def max_concurrent(cfg: ExperimentConfig, available: Mapping[str, float]) -> int:
    """How many cells run at once: `sweep.max_concurrent`, else as many as the cluster's `available` resources
    hold (a trial's CPUs plus its workers' CPUs; one GPU per worker when training on GPUs; the workers'
    `train.worker_resources`), at least one."""
    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    per_trial_cpu = cfg.sweep.cpus_per_trial + cfg.train.num_workers * cfg.train.cpus_per_worker
    fits = [int(available.get("CPU", 1) // per_trial_cpu) if per_trial_cpu else 1]
    workers = cfg.train.num_workers
    if workers:
        per_trial = {name: workers * amount for name, amount in cfg.train.worker_resources.items()}
        if cfg.train.use_gpu:
            per_trial["GPU"] = workers
        fits += [int(available.get(name, 0) // amount) for name, amount in per_trial.items()]
    return max(1, min(fits))


def prepare(cfg: ExperimentConfig) -> tuple[ExperimentConfig, list[PlanCell]]:
    """Everything shared by the cells, built once before any trial starts (no two trials race on it): the resolved
    config, the plan of every cell (in `grid` order), each distinct training set and the evaluation datasets."""
    from retriever.data.catalog import resolve_dataset, resolve_references
    from retriever.flops import plan_grid
    from retriever.train.trainer import prepare_training_data

    cfg = resolve_references(cfg)
    plans = plan_grid(cfg)  # fails now, with the cell and the minimum budget, if a cell cannot afford one step
    # Overrides may give cells their own data or negatives: build each distinct training set once, here.
    prepared: set[str] = set()
    for backbone, paradigm, loss in grid(cfg):
        cell = cell_config(cfg, backbone, paradigm, loss)
        key = cell.data.model_dump_json() + f"/{cell.loss.num_negatives}"
        if key not in prepared:
            prepared.add(key)
            prepare_training_data(cell)
    for dataset in cfg.eval.datasets:
        resolve_dataset(dataset, cfg)
    return cfg, plans


__all__ = [
    "STATE_FILE",
    "backbone_paradigms",
    "cell_config",
    "grid",
    "max_concurrent",
    "prepare",
    "sweep_dir",
    "trial_resources",
]
