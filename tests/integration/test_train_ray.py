"""Ray Train: 2 workers, FSDP2 + LoRA on CPU/gloo, budget stop, fault tolerance and job-level resume."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from retriever.flops import plan_cell
from retriever.models.encoders import load_encoder
from retriever.train.trainer import run_training

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

PROBES = ["kotibo suka butefi fufa", "guvasar ragarer mile nala"]


def ray_config(output_dir, name: str, **train):
    """Two FSDP workers with half a CPU each, sparse CL+KD (the default learning rate)."""
    return make_config(
        output_dir,
        name,
        encoder={"passage_max_length": 48},
        loss={"name": "cl+kd"},
        train={"lr": 1e-4, "num_workers": 2, "cpus_per_worker": 0.5, "strategy": "fsdp", "log_every": 3, **train},
    )


def test_two_worker_fsdp2_lora_run_exports_the_trained_encoder(ray_cluster, tmp_path):
    cfg = ray_config(tmp_path, "fsdp")
    result = run_training(cfg, probe_texts=PROBES)
    per_step = plan_cell(cfg).flops_per_step
    assert result["steps"] == 6 and result["stopped_by"] == "max_steps"
    assert result["flops"] == 6 * per_step
    encoder = load_encoder(result["export_dir"])
    assert encoder.paradigm == "sparse" and encoder.model.peft_config["default"].r == 16
    assert torch.allclose(encoder.encode_passages(PROBES), torch.tensor(result["probe_encodings"]), atol=1e-5)


def test_worker_failure_resumes_from_the_last_checkpoint(ray_cluster, tmp_path):
    cfg = ray_config(tmp_path, "faulty", max_failures=1)
    cfg.budget.max_steps = 7
    per_step = plan_cell(cfg).flops_per_step
    result = run_training(cfg, fail_once_at=f"5:{tmp_path}/fault")
    assert sorted(p.name for p in tmp_path.glob("fault.rank*")) == ["fault.rank0", "fault.rank1"]
    assert result["steps"] == 7
    # Steps 4 and 5 ran twice (before and after the failure) but count once: the FLOPs restart from step 3's.
    assert result["flops"] == 7 * per_step


def test_rerunning_the_same_name_continues_the_run(ray_cluster, tmp_path):
    cfg = ray_config(tmp_path, "again", strategy="ddp")
    first = run_training(cfg)
    assert first["steps"] == 6
    cfg.budget.max_steps = 9
    second = run_training(cfg)
    assert second["steps"] == 9
    assert second["flops"] == 9 * plan_cell(cfg).flops_per_step
