"""Ray Train: 2 workers, FSDP2 + LoRA on CPU/gloo, budget stop, fault tolerance, job-level resume (also past a
corrupt latest checkpoint)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_config

from retriever.flops import plan_cell
from retriever.models.encoders import load_encoder
from retriever.train.checkpoint import MANIFEST_FILE, verify_checkpoint
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


def flip(path, count: int) -> None:
    """Invert `count` bytes in the middle of the file."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 - count // 2
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


def checkpoints(experiment):
    """Ray 2.60's layout: `<storage_path>/<name>/checkpoint_<timestamp>/`, the rank folders merged into each."""
    return sorted(p for p in experiment.glob("checkpoint_*") if p.is_dir())


@pytest.fixture(scope="module")
def six_steps(ray_cluster, tmp_path_factory):
    """The Ray folder of a 6-step DDP run (checkpoints at steps 3 and 6, both kept: num_to_keep=2), run once."""
    root = tmp_path_factory.mktemp("six-steps")
    assert run_training(ray_config(root, "again", strategy="ddp"))["steps"] == 6
    return root / "ray" / "again-retrieval"


def continued(six_steps, tmp_path):
    """The config of the 6-step run, with a copy of its Ray folder under `tmp_path`: a re-run continues it."""
    cfg = ray_config(tmp_path, "again", strategy="ddp")
    shutil.copytree(six_steps, tmp_path / "ray" / "again-retrieval")
    return cfg


def test_rerunning_the_same_name_continues_the_run(six_steps, tmp_path):
    cfg = continued(six_steps, tmp_path)
    cfg.budget.max_steps = 9
    second = run_training(cfg)
    assert second["steps"] == 9 and second["resumed_from_step"] == 6 and not second["skipped_checkpoints"]
    assert second["flops"] == 9 * plan_cell(cfg).flops_per_step


@pytest.mark.slow  # a Ray run (~30 s on 2 cores) on top of the module's 6-step one
def test_a_corrupt_latest_checkpoint_resumes_from_the_previous_one(six_steps, tmp_path):
    cfg = continued(six_steps, tmp_path)
    older, latest = checkpoints(tmp_path / "ray" / "again-retrieval")
    # One manifest covers both ranks' files, merged by Ray into one folder.
    files = json.loads((latest / MANIFEST_FILE).read_text())["files"]
    assert files["rng-rank0.pt"]["rank"] == 0 and files["rng-rank1.pt"]["rank"] == 1
    assert verify_checkpoint(latest) is None
    shard = max(latest.glob("__*.distcp"), key=lambda p: p.stat().st_size)
    flip(shard, 24)
    cfg.budget.max_steps = 9
    result = run_training(cfg)
    assert result["resumed_from"] == str(older) and result["resumed_from_step"] == 3
    assert result["skipped_checkpoints"] == [
        f"{latest}: {shard.name} does not match its checksum in {MANIFEST_FILE} (corrupt or changed)"
    ]
    # Steps 4-6 trained again from step 3 count once.
    assert result["steps"] == 9 and result["flops"] == 9 * plan_cell(cfg).flops_per_step
