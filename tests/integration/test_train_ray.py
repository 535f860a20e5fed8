"""Ray Train: 2 workers, FSDP2 + LoRA on CPU/gloo, budget stop, fault tolerance and job-level resume."""

from __future__ import annotations

import pytest
import torch

from retriever.config import config_from_dict
from retriever.data.catalog import resolve_references
from retriever.flops import plan_cell
from retriever.models.encoders import load_encoder
from retriever.train.trainer import run_training

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

PROBES = ["kotibo suka butefi fufa", "guvasar ragarer mile nala"]


def ray_config(output_dir, name: str, **train):
    return resolve_references(
        config_from_dict(
            {
                "name": name,
                "backbone": {"name": "tiny-s", "tokenizer": "synthetic"},
                "encoder": {"paradigm": "sparse", "query_max_length": 16, "passage_max_length": 48},
                "loss": {"name": "cl+kd", "num_negatives": 3},
                "budget": {"max_steps": 6},
                "train": {
                    "batch_size": 8,
                    "num_workers": 2,
                    "cpus_per_worker": 0.5,
                    "strategy": "fsdp",
                    "checkpoint_every": 3,
                    "log_every": 3,
                    "output_dir": str(output_dir),
                    **train,
                },
                "data": {"synthetic_docs": 400, "synthetic_train_queries": 200, "synthetic_test_queries": 40},
                "tracking": {"enabled": False},
            }
        )
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
