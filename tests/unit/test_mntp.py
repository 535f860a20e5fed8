"""MNTP: masking statistics, learning, continuing fine-tuning from its product, the stage's own settings
(mntp.steps / batch_size / lr), its exact FLOPs, and its own checkpoint folder."""

from __future__ import annotations

import pytest
import torch
from conftest import check_stage_run, make_config, merged
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from retriever.models.encoders import build_encoder
from retriever.train.context import LocalContext
from retriever.train.loop import run_loop
from retriever.train.mntp import IGNORE, MntpTask, mask_tokens, mntp_table
from retriever.train.trainer import run_dir_for, run_training


def test_masking_selects_twenty_percent_and_splits_80_10_10():
    ids = torch.randint(10, 1000, (64, 256))
    protected = torch.zeros_like(ids, dtype=torch.bool)
    protected[:, 1] = True
    corrupted, labels = mask_tokens(
        ids,
        probability=0.2,
        mask_id=3,
        vocab_size=1000,
        generator=torch.Generator().manual_seed(0),
        protected=protected,
    )
    chosen = labels != IGNORE
    assert not chosen[:, :2].any()  # position 0 (no previous state) and protected tokens are never targets
    assert abs(chosen.float().mean().item() - 0.2) < 0.01
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(corrupted[~chosen], ids[~chosen])
    masked = (corrupted == 3) & chosen
    kept = (corrupted == ids) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.02
    assert abs(kept.sum().item() / chosen.sum().item() - 0.1) < 0.02


def run_mntp(output_dir, name: str, lora: bool):
    cfg = make_config(
        output_dir,
        name,
        backbone={"lora": {"enabled": lora}},
        encoder={"add_bos": False},
        mntp={"enabled": True, "max_length": 64},
        budget={"max_steps": 40},
        train={"batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.0, "checkpoint_every": 1000},
    )
    task = MntpTask(cfg)
    ctx = LocalContext(mntp_table(cfg), run_dir_for(cfg))
    result = run_loop(cfg, task, ctx, run_dir_for(cfg), planned_steps=40)
    return cfg, result, [m["loss/mntp"] for m in ctx.history if "loss/mntp" in m]


def test_mntp_learns_and_fine_tuning_starts_from_its_model(tmp_path):
    cfg, result, losses = run_mntp(tmp_path, "mntp-full", lora=False)
    assert len(losses) == 40 and sum(losses[-8:]) / 8 < 0.9 * sum(losses[:8]) / 8
    adapted = build_encoder(
        cfg.backbone.model_copy(update={"name": result.export_dir, "tokenizer": None}), cfg.encoder
    )
    weights = load_file(f"{result.export_dir}/model.safetensors")
    assert torch.equal(adapted.lm.model.embed_tokens.weight.detach(), weights["model.embed_tokens.weight"])


def test_mntp_adapter_is_continued_by_fine_tuning(tmp_path):
    cfg, result, _ = run_mntp(tmp_path, "mntp-lora", lora=True)
    saved = load_file(f"{result.export_dir}/adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)
    encoder = build_encoder(cfg.backbone.model_copy(update={"init_adapter": result.export_dir}), cfg.encoder)
    live = {k: v for k, v in encoder.model.state_dict().items() if "lora_" in k}
    for key, value in saved.items():
        match = [v for k, v in live.items() if k.replace(".default", "") == key]
        assert len(match) == 1 and torch.equal(match[0], value)
    assert any(p.requires_grad for n, p in encoder.named_parameters() if "lora_" in n)


def mntp_stage_config(output_dir, name: str, **sections):
    """Retrieval settings the MNTP stage must ignore (budget, batch, lr) next to its own; `sections` update them."""
    base = {
        "backbone": {"lora": {"enabled": False}, "attn_implementation": "eager"},
        "encoder": {"add_bos": False},
        "mntp": {"steps": 3, "batch_size": 4, "lr": 3e-3, "max_length": 32},
        "budget": {"max_steps": 50},
        "train": {"batch_size": 8, "lr": 1e-4, "warmup_ratio": 0.0, "checkpoint_every": 1000},
    }
    return make_config(output_dir, name, **merged(base, sections))


def test_mntp_stage_uses_its_own_steps_batch_and_lr(tmp_path):
    cfg = mntp_stage_config(tmp_path, "mntp-settings")
    # mntp.steps, mntp.lr; mntp.batch_size blocks of mntp.max_length tokens per step
    check_stage_run(cfg, "mntp", steps=3, lr=3e-3, tokens=3 * 4 * 32)


@pytest.mark.parametrize("lora", [True, False])
def test_mntp_step_flops_match_flop_counter(tmp_path, lora):
    """The loop's FLOPs of a real MNTP step (MntpTask.step_cost) equal FlopCounterMode's count of it, with the LoRA
    adapter and with full fine-tuning."""
    cfg = mntp_stage_config(
        tmp_path, "mntp-flops", backbone={"lora": {"enabled": lora}, "attn_implementation": "eager"}
    )
    task = MntpTask(cfg)
    module = task.build().train()
    table = mntp_table(cfg)
    batch = task.collate({"input_ids": table.column("input_ids").to_pylist()[:3]}, epoch=0)
    assert int((batch["labels"] != IGNORE).sum()) > 0
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    assert (trainable < total) == lora
    with FlopCounterMode(display=False) as counter:
        task.loss(module, batch, step=0).total.backward()
    flops, tokens = task.step_cost(batch)
    assert flops == counter.get_total_flops()
    assert tokens == 3 * 32


def test_mntp_and_retrieval_runs_of_one_name_keep_their_own_checkpoints(tmp_path):
    cfg = mntp_stage_config(tmp_path, "shared-name", mntp={"steps": 2}, budget={"max_steps": 2})
    mntp = run_training(cfg, task="mntp")
    assert mntp["steps"] == 2
    reports: list[dict[str, float]] = []
    retrieval = run_training(cfg, on_report=reports.append)
    # Retrieval starts from step 0 (not from the MNTP stage's step-2 checkpoint) and trains its own 2 steps.
    assert retrieval["steps"] == 2
    assert [m["step"] for m in reports if "loss/total" in m] == [1, 2]
    run_dir = run_dir_for(cfg)
    mntp_checkpoints = sorted(p.name for p in (run_dir / "mntp-checkpoints").iterdir())
    retrieval_checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert mntp_checkpoints == retrieval_checkpoints == ["step-00000002"]
    assert (run_dir / "mntp").is_dir() and (run_dir / "encoder" / "encoder.json").is_file()
