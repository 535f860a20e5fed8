"""DeepSpeed ZeRO on Ray Train (CPU/gloo): the `deepspeed` extra; skipped when it is not installed."""

from __future__ import annotations

import pytest
import torch
from test_train_ray import PROBES, ray_config

from retriever.flops import plan_cell
from retriever.models.encoders import load_encoder
from retriever.train.trainer import run_training

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_worker_zero_training_exports_the_trained_encoder(ray_cluster, tmp_path, stage):
    cfg = ray_config(tmp_path, f"zero{stage}", strategy="deepspeed", zero_stage=stage)
    result = run_training(cfg, probe_texts=PROBES)
    assert result["steps"] == 6 and result["flops"] == 6 * plan_cell(cfg).flops_per_step
    encoder = load_encoder(result["export_dir"])
    assert torch.allclose(encoder.encode_passages(PROBES), torch.tensor(result["probe_encodings"]), atol=1e-5)
