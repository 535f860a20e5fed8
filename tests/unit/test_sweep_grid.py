"""The sweep's grid without Ray (`retriever.sweep.grid`, `retriever.sweep.cell`, `retriever.sweep.tune.FlopStopper`):
cell ids and configs, the plan handed to each trial, a trial's resources, how many cells run at once, and when the
Tune-side FLOP stopper stops a cell."""

from __future__ import annotations

import pickle

import pytest
from conftest import make_config

from retriever.flops import plan_grid
from retriever.records import cell_id
from retriever.sweep.cell import SweepCells, cell_specs
from retriever.sweep.grid import cell_config, grid, max_concurrent, trial_resources
from retriever.sweep.tune import FlopStopper

SWEEP = {
    "backbones": ["tiny-s", "tiny-m"],
    "paradigms": ["sparse", "dense"],
    "losses": ["cl", "cl+kd"],
    "overrides": [
        {"backbones": ["tiny-m"], "losses": ["cl+kd"], "set": {"train.batch_size": 4}},
        {"paradigms": ["dense"], "set": {"train.lr": 5e-4}},
    ],
}


@pytest.fixture
def cfg(tmp_path):
    return make_config(tmp_path, "grid", sweep=SWEEP)


def test_cell_ids_are_file_system_safe_and_stable():
    assert cell_id("tiny-s", "sparse", "cl+kd") == "tiny-s__sparse__cl_kd"
    assert cell_id("meta-llama/Llama-3.2-1B", "dense", "kd") == "meta-llama_Llama-3.2-1B__dense__kd"


def test_a_cell_config_has_its_axes_its_overrides_and_its_run_name(cfg):
    cell = cell_config(cfg, "tiny-m", "dense", "cl+kd")
    assert (cell.backbone.name, cell.encoder.paradigm, cell.loss.name) == ("tiny-m", "dense", "cl+kd")
    assert (cell.train.batch_size, cell.train.lr) == (4, 5e-4)
    assert cell.name == "grid-tiny-m__dense__cl_kd"
    other = cell_config(cfg, "tiny-s", "sparse", "cl")
    assert (other.train.batch_size, other.train.lr) == (cfg.train.batch_size, cfg.train.lr)
    assert cfg.backbone.name == "tiny-s" and cfg.name == "grid"  # the sweep's config is left as it was


def test_every_trial_gets_its_cell_config_and_the_plan_made_once(cfg):
    plans = plan_grid(cfg)
    specs = cell_specs(cfg, plans)
    assert list(specs) == [cell_id(*axes) for axes in grid(cfg)]
    assert list(specs)[:3] == ["tiny-s__sparse__cl", "tiny-s__sparse__cl_kd", "tiny-s__dense__cl"]
    spec = specs["tiny-m__dense__cl_kd"]
    assert spec.config == cell_config(cfg, "tiny-m", "dense", "cl+kd")
    assert (spec.plan.backbone, spec.plan.paradigm, spec.plan.loss, spec.plan.queries_per_step) == (
        "tiny-m",
        "dense",
        "cl+kd",
        4,
    )
    # What crosses to the trials (Tune's object store) comes back equal.
    sweep = SweepCells(specs, "parent-run", None)
    assert pickle.loads(pickle.dumps(sweep)) == sweep
    with pytest.raises(ValueError, match="does not match the grid"):
        cell_specs(cfg, plans[::-1])


def test_a_trial_holds_the_driver_share_and_the_cluster_bounds_concurrency(cfg):
    cfg.sweep.cpus_per_trial = 0.5
    assert trial_resources(cfg) == {"CPU": 0.5}
    # In-process training: each trial holds its own CPUs.
    assert max_concurrent(cfg, {"CPU": 4}) == 8
    assert max_concurrent(cfg, {"CPU": 0.25}) == 1  # never fewer than one
    # Ray Train workers: a trial needs its driver's share plus its workers' CPUs (and one GPU per worker).
    cfg.train.num_workers, cfg.train.cpus_per_worker = 2, 1.0
    assert max_concurrent(cfg, {"CPU": 10}) == 4
    cfg.train.use_gpu = True
    assert max_concurrent(cfg, {"CPU": 10, "GPU": 4}) == 2
    assert max_concurrent(cfg, {"CPU": 10}) == 1
    # Custom worker resources bound it too: 2 workers x 1 A100_80G per trial.
    cfg.train.worker_resources = {"A100_80G": 1.0}
    assert max_concurrent(cfg, {"CPU": 10, "GPU": 8, "A100_80G": 4}) == 2
    assert max_concurrent(cfg, {"CPU": 100, "GPU": 100, "A100_80G": 6}) == 3
    cfg.sweep.max_concurrent = 3  # the config wins
    assert max_concurrent(cfg, {"CPU": 100, "GPU": 0}) == 3


def test_the_flop_stopper_fires_only_above_the_budget_and_its_tolerance():
    stopper = FlopStopper(1e12)
    assert not stopper("t", {"flops": 1e12}) and not stopper("t", {"flops": 1.01e12})
    assert stopper("t", {"flops": 1.0101e12})
    assert not stopper("t", {"training_iteration": 3})  # results without a FLOP count never stop a cell
    assert FlopStopper(1e12, tolerance=0.0)("t", {"flops": 1e12 + 1})
    assert not FlopStopper(None)("t", {"flops": 1e30})  # a step budget (budget.max_steps) has no FLOP limit
    assert not stopper.stop_all()
