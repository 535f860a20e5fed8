"""A real pretrained tiny Llama (stories260K, imported from llama2.c) trained on Ray with 2 FSDP2 workers to a
FLOP budget of 200 steps; the exported encoder, reloaded in a fresh process, reproduces the trained model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import make_config, shared_path

from retriever.cli import main
from retriever.config import BudgetConfig
from retriever.flops import plan_cell
from retriever.train.trainer import run_training

pytestmark = [pytest.mark.real, pytest.mark.ray, pytest.mark.timeout(600)]

PROBES = ["once upon a time there was a little girl", "the big red ball", "kotibo suka butefi fufa"]


def test_stories260k_two_workers_stop_at_the_budget_and_export_exactly(ray_cluster, tmp_path):
    model_dir = shared_path("models", "stories260K")
    out = tmp_path / "stories260K-hf"
    assert (
        main(["convert", "llama2c", str(model_dir / "stories260K.bin"), str(model_dir / "tok512.bin"), str(out)]) == 0
    )

    cfg = make_config(
        tmp_path / "runs",
        "stories",
        backbone={"name": str(out), "tokenizer": None},
        encoder={"paradigm": "dense", "query_max_length": 8, "passage_max_length": 24},
        loss={"num_negatives": 1},
        budget={"max_steps": 1},
        train={"batch_size": 4, "lr": 1e-4, "num_workers": 2, "strategy": "fsdp"}
        | {"checkpoint_every": 100, "log_every": 50},
    )
    per_step = plan_cell(cfg).flops_per_step
    budget = per_step * 200.5
    cfg.budget = BudgetConfig(flops=budget)
    result = run_training(cfg, probe_texts=PROBES)

    assert result["stopped_by"] == "budget" and result["steps"] == 200
    assert result["flops"] <= budget < result["flops"] + per_step  # within one step of the budget

    expected = tmp_path / "expected.json"
    expected.write_text(json.dumps(result["probe_encodings"]))
    script = (
        "import json, sys, torch\n"
        "from retriever.models.encoders import load_encoder\n"
        "encoder = load_encoder(sys.argv[1])\n"
        f"got = encoder.encode_passages({PROBES!r})\n"
        "want = torch.tensor(json.load(open(sys.argv[2])))\n"
        "print(float((got - want).abs().max()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, result["export_dir"], str(expected)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= 1e-5
