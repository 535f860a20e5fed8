"""MNTP: masking statistics, learning, and continuing fine-tuning from its product."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from test_train_loop import make_config

from retriever.models.encoders import build_encoder
from retriever.train.context import LocalContext
from retriever.train.loop import run_loop
from retriever.train.mntp import IGNORE, MntpTask, mask_tokens, mntp_table
from retriever.train.trainer import run_dir_for


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
