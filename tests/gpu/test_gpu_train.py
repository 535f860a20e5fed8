"""GPU-only: NCCL process group, FSDP2 with bf16 mixed precision, on Ray Train (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from retriever.flops import plan_cell
from retriever.models.encoders import load_encoder
from retriever.train.trainer import run_training

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.ray,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_nccl_bf16_fsdp2_training(ray_cluster, tmp_path):
    workers = min(2, torch.cuda.device_count())
    cfg = make_config(
        tmp_path,
        "gpu-fsdp",
        backbone={"name": "tiny-m"},
        loss={"name": "cl+kd", "num_negatives": 7},
        budget={"max_steps": 20},
        train={
            **{"batch_size": 16, "num_workers": workers, "use_gpu": True, "cpus_per_worker": 1, "lr": 1e-4},
            **{"strategy": "fsdp", "mixed_precision": "bf16", "checkpoint_every": 10},
        },
    )
    probes = ["kotibo suka butefi fufa", "guvasar ragarer mile"]
    result = run_training(cfg, probe_texts=probes)
    assert result["steps"] == 20 and result["flops"] == 20 * plan_cell(cfg).flops_per_step
    encoder = load_encoder(result["export_dir"]).to("cuda")
    reps = encoder.encode_passages(probes)
    assert torch.isfinite(reps).all()
    # bf16 compute in training vs fp32 reload: close, not equal.
    assert torch.allclose(reps, torch.tensor(result["probe_encodings"]), atol=5e-2, rtol=5e-2)
