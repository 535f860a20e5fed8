"""The training loop in a single process (no Ray): budget stop, checkpoints, resume, export, learning, non-finite
losses, and the MLflow run's status and metric points across a crash and a resume."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from conftest import make_config
from mlflow.tracking import MlflowClient

from retriever.config import ExperimentConfig
from retriever.data.examples import read_training_examples
from retriever.errors import UserError
from retriever.flops import plan_cell
from retriever.models.encoders import load_encoder
from retriever.train.checkpoint import Progress
from retriever.train.context import LocalContext
from retriever.train.errors import NonFiniteLossError
from retriever.train.loop import FAIL_ONCE_ENV, check_finite_files, lr_factor, run_loop
from retriever.train.trainer import (
    TASKS,
    _tracker_factory,
    prepare_training_data,
    run_dir_for,
    run_training,
    tracker_settings,
)


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("train-runs")


def local_run(cfg: ExperimentConfig, planned: int | None = None, probe=None, wrap_task=None):
    """Train `cfg` in this process (tracked when `cfg.tracking.enabled`); `wrap_task` may wrap the task."""
    table = read_training_examples(prepare_training_data(cfg))
    planned = planned or plan_cell(cfg).steps if cfg.budget.flops else cfg.budget.max_steps
    task = TASKS.get("retrieval").make(cfg, planned)
    if wrap_task is not None:
        task = wrap_task(task)
    ctx = LocalContext(table, run_dir_for(cfg))
    make_tracker = _tracker_factory(tracker_settings(cfg))
    result = run_loop(
        cfg, task, ctx, run_dir_for(cfg), planned_steps=planned, probe_texts=probe, make_tracker=make_tracker
    )
    return result, ctx


def tracked(output_dir, name: str, **sections) -> ExperimentConfig:
    return make_config(output_dir, name, tracking={"enabled": True}, **sections)


def mlflow_run(cfg: ExperimentConfig):
    """The one MLflow run of `cfg` (by name) and a client of its store."""
    settings = tracker_settings(cfg)
    client = MlflowClient(tracking_uri=settings["uri"])
    runs = client.search_runs([settings["experiment_id"]], f"attributes.run_name = '{cfg.name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0], client


class LossAt:
    """The retrieval task, with `at(out)` applied to the loss of the given (1-based) steps."""

    def __init__(self, task, steps: set[int], at) -> None:
        self.task, self.steps, self.at = task, steps, at

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def loss(self, module, batch, step):
        out = self.task.loss(module, batch, step)
        if step + 1 in self.steps:
            self.at(out)
        return out


def nan_loss(out) -> None:
    out.total = out.total * float("nan")


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0.0, 0.04) == 0.0
    assert lr_factor(0.02, 0.04) == pytest.approx(0.5)
    assert lr_factor(0.04, 0.04) == pytest.approx(1.0)
    assert lr_factor(0.52, 0.04) == pytest.approx(0.5)
    assert lr_factor(1.0, 0.04) == 0.0
    assert lr_factor(0.5, 0.0) == pytest.approx(0.5)


def test_flop_budget_stops_before_the_step_that_would_exceed_it(output_dir):
    probe = make_config(output_dir, "budget", budget={"max_steps": 1})
    per_step = plan_cell(probe).flops_per_step
    budget = per_step * 5.5
    cfg = make_config(output_dir, "budget", budget={"flops": budget, "max_steps": None})
    assert plan_cell(cfg).steps == 5
    result, ctx = local_run(cfg)
    assert result.steps == 5 and result.stopped_by == "budget"
    # Fixed shapes: every step costs exactly what the planner said.
    assert result.flops == 5 * per_step <= budget < result.flops + per_step
    assert [m["step"] for m in ctx.history if "loss/total" in m] == [1, 2, 3, 4, 5]
    assert result.tokens == 5 * plan_cell(cfg).tokens_per_step
    # The lr follows the fraction of the budget spent before each step; the last checkpoint holds the progress.
    lrs = [m["lr"] for m in ctx.history if "lr" in m]
    assert lrs == pytest.approx([cfg.train.lr * lr_factor(k / 5.5, cfg.train.warmup_ratio) for k in range(5)])
    with ctx.latest_checkpoint() as last:
        assert Progress.read(last).step == 5 and Progress.read(last).flops == result.flops


def test_checkpoints_export_and_reload(output_dir):
    cfg = make_config(output_dir, "export", encoder={"paradigm": "dense"})
    texts = ["kotibo suka butefi fufa", "guvasar ragarer mile"]
    result, ctx = local_run(cfg, probe=texts)
    assert result.steps == 6 and result.stopped_by == "max_steps"
    checkpoints = sorted((run_dir_for(cfg) / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-00000003", "step-00000006"]
    encoder = load_encoder(result.export_dir)
    again = encoder.encode_passages(texts)
    assert torch.allclose(again, torch.tensor(result.probe_encodings), atol=1e-5)


def test_fault_injection_resumes_from_the_last_checkpoint_without_double_counting(output_dir, monkeypatch, capfd):
    cfg = tracked(output_dir, "resume", budget={"max_steps": 7})
    per_step = plan_cell(cfg).flops_per_step
    monkeypatch.setenv(FAIL_ONCE_ENV, f"5:{output_dir}/resume-fault")
    with pytest.raises(RuntimeError, match="injected failure at step 5"):
        local_run(cfg)
    run, client = mlflow_run(cfg)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: injected failure at step 5 (rank 0)"
    with LocalContext(None, run_dir_for(cfg)).latest_checkpoint() as last:
        assert Progress.read(last).step == 3
    capfd.readouterr()
    result, ctx = local_run(cfg)  # the same run name resumes
    assert f"resumed from step 3 (checkpoint {last})" in capfd.readouterr().err
    assert result.steps == 7
    assert result.flops == 7 * per_step
    steps_after_resume = [m["step"] for m in ctx.history if "loss/total" in m]
    assert steps_after_resume == [4, 5, 6, 7]
    # One MLflow run, FINISHED, and one point per step: steps 4 and 5 ran twice but were logged once.
    run, client = mlflow_run(cfg)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from"] == str(last)
    assert "error" not in run.data.tags and "injected failure at step 5" in run.data.tags["previous_error"]
    for metric in ("step", "loss/total"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, metric)) == list(range(1, 8))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "final/steps")] == [7]


def test_a_nan_loss_stops_the_run_naming_the_step_and_fails_its_mlflow_run(output_dir):
    cfg = tracked(output_dir, "nan-stop", budget={"max_steps": 4})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 \(loss nan\)") as raised:
        local_run(cfg, wrap_task=lambda task: LossAt(task, {3}, nan_loss))
    assert isinstance(raised.value, UserError) and "train.on_nonfinite: skip" in str(raised.value)
    run, _ = mlflow_run(cfg)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("NonFiniteLossError: nan-stop:")
    assert not (run_dir_for(cfg) / "encoder").exists()


def test_skip_drops_the_optimizer_step_of_a_nan_loss_and_exports_a_finite_encoder(output_dir):
    cfg = tracked(output_dir, "nan-skip", budget={"max_steps": 4}, train={"on_nonfinite": "skip"})
    result, ctx = local_run(cfg, wrap_task=lambda task: LossAt(task, {2}, nan_loss))
    # The skipped step spent its FLOPs: it counts toward the budget.
    assert result.steps == 4 and result.skipped_steps == 1
    assert [m["skipped_steps"] for m in ctx.history if "loss/total" in m] == [0, 1, 1, 1]
    check_finite_files(run_dir_for(cfg) / "encoder")
    run, client = mlflow_run(cfg)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["skipped_steps"] == 1 and run.data.metrics["final/skipped_steps"] == 1


def test_a_sigterm_mid_training_ends_the_mlflow_run_killed(output_dir):
    cfg = tracked(output_dir, "terminated", budget={"max_steps": 4})
    handler = signal.getsignal(signal.SIGTERM)  # Ray, once started in this process, installs its own
    with pytest.raises(SystemExit):
        local_run(cfg, wrap_task=lambda task: LossAt(task, {2}, lambda out: os.kill(os.getpid(), signal.SIGTERM)))
    run, _ = mlflow_run(cfg)
    code = 128 + signal.SIGTERM if handler == signal.SIG_DFL else signal.SIGTERM
    assert run.info.status == "KILLED" and run.data.tags["error"] == f"SystemExit: {code}"
    assert signal.getsignal(signal.SIGTERM) == handler  # ours was only there while training


def test_run_training_entry_point_in_process(output_dir):
    cfg = make_config(output_dir, "entry", loss={"name": "kd"})
    result = run_training(cfg)
    assert result["steps"] == 6 and math.isfinite(result["flops"])
    assert (run_dir_for(cfg) / "encoder" / "encoder.json").is_file()


def ranking_loss(metrics: dict[str, float]) -> float:
    return metrics.get("loss/cl", 0.0) + metrics.get("loss/kd", 0.0)


# Tiny presets have random weights: they learn by full fine-tuning (LoRA adapts pretrained backbones).
@pytest.mark.parametrize("paradigm", ["dense", "sparse"])
@pytest.mark.parametrize("loss", ["cl", "kd", "cl+kd"])
def test_loss_falls_on_the_synthetic_benchmark(output_dir, paradigm, loss):
    cfg = make_config(
        output_dir,
        f"learn-{paradigm}-{loss}",
        backbone={"lora": {"enabled": False}},
        encoder={"paradigm": paradigm},
        loss={"name": loss},
        budget={"max_steps": 40},
        train={"batch_size": 16, "checkpoint_every": 1000, "lr": 1e-3, "warmup_ratio": 0.0},
    )
    _, ctx = local_run(cfg)
    losses = [ranking_loss(m) for m in ctx.history if "loss/total" in m]
    assert len(losses) == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)


def test_loss_falls_with_lora(output_dir):
    cfg = make_config(
        output_dir,
        "learn-lora",
        encoder={"paradigm": "dense"},
        budget={"max_steps": 40},
        train={"batch_size": 16, "checkpoint_every": 1000, "lr": 1e-2, "warmup_ratio": 0.0},
    )
    _, ctx = local_run(cfg)
    losses = [ranking_loss(m) for m in ctx.history if "loss/total" in m]
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8


def test_a_training_run_records_its_flops_budget_loss_and_steps(output_dir, recorded_metrics):
    probe = make_config(output_dir, "metrics", budget={"max_steps": 1})
    per_step = plan_cell(probe).flops_per_step
    cfg = make_config(output_dir, "metrics", budget={"flops": per_step * 3.5, "max_steps": None})
    result, _ = local_run(cfg)
    assert result.steps == 3
    run = (("run", "metrics"),)
    values = recorded_metrics.values
    assert values["retriever_train_flops"][run] == [per_step, 2 * per_step, 3 * per_step]
    assert values["retriever_train_flop_budget"][run] == [per_step * 3.5] * 3
    assert values["retriever_train_budget_fraction"][run] == pytest.approx([1 / 3.5, 2 / 3.5, 3 / 3.5])
    assert values["retriever_train_steps"][run] == [1, 1, 1]
    assert len(values["retriever_train_step_seconds"][run]) == 3
    assert all(seconds > 0 for seconds in values["retriever_train_step_seconds"][run])
    assert len(values["retriever_train_tokens_per_second"][run]) == 3  # log_every is 1
    parts = {dict(tags)["part"] for tags in values["retriever_train_loss"]}
    assert "total" in parts and len(parts) >= 2
