"""The training loop in a single process (no Ray): budget stop, checkpoints, resume, export, learning."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config

from retriever.config import ExperimentConfig
from retriever.data.examples import read_training_examples
from retriever.flops import plan_cell
from retriever.models.encoders import load_encoder
from retriever.train.checkpoint import Progress
from retriever.train.context import LocalContext
from retriever.train.loop import FAIL_ONCE_ENV, lr_factor, run_loop
from retriever.train.trainer import TASKS, prepare_training_data, run_dir_for, run_training


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("train-runs")


def local_run(cfg: ExperimentConfig, planned: int | None = None, probe=None):
    table = read_training_examples(prepare_training_data(cfg))
    planned = planned or plan_cell(cfg).steps if cfg.budget.flops else cfg.budget.max_steps
    task = TASKS.get("retrieval").make(cfg, planned)
    ctx = LocalContext(table, run_dir_for(cfg))
    result = run_loop(cfg, task, ctx, run_dir_for(cfg), planned_steps=planned, probe_texts=probe)
    return result, ctx


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


def test_fault_injection_resumes_from_the_last_checkpoint_without_double_counting(output_dir, monkeypatch):
    cfg = make_config(output_dir, "resume", budget={"max_steps": 7})
    per_step = plan_cell(cfg).flops_per_step
    monkeypatch.setenv(FAIL_ONCE_ENV, f"5:{output_dir}/resume-fault")
    with pytest.raises(RuntimeError, match="injected failure at step 5"):
        local_run(cfg)
    with LocalContext(None, run_dir_for(cfg)).latest_checkpoint() as last:
        assert Progress.read(last).step == 3
    result, ctx = local_run(cfg)  # the same run name resumes
    assert result.steps == 7
    assert result.flops == 7 * per_step
    steps_after_resume = [m["step"] for m in ctx.history if "loss/total" in m]
    assert steps_after_resume == [4, 5, 6, 7]


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
