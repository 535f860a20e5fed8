"""Bag-of-words pre-training (retriever.train.bow): term targets, the stage's own settings (bow.steps / batch_size /
lr), exact FLOPs of both paradigms against FlopCounterMode, what the stage teaches each paradigm, and its product."""

from __future__ import annotations

import pytest
import torch
from conftest import check_stage_run, make_config, merged
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from retriever.data.catalog import corpus_texts
from retriever.flops import stage_flops
from retriever.models.encoders import build_encoder
from retriever.train.bow import BowTask, bow_table, term_targets
from retriever.train.trainer import run_dir_for, run_training


def bow_config(output_dir, name: str, paradigm: str = "sparse", **sections):
    """Retrieval settings the stage must ignore (budget, batch, lr) next to its own; `sections` update them."""
    base = {
        "backbone": {"lora": {"enabled": False}, "attn_implementation": "eager"},
        "encoder": {"paradigm": paradigm, "passage_max_length": 32},
        "bow": {"enabled": True, "steps": 3, "batch_size": 4, "lr": 3e-3},
        "budget": {"max_steps": 50},
        "train": {"batch_size": 8, "lr": 1e-4, "warmup_ratio": 0.0, "checkpoint_every": 1000},
    }
    return make_config(output_dir, name, **merged(base, sections))


def test_term_targets_mark_each_text_s_terms_once_without_special_tokens_or_padding():
    ids = torch.tensor([[0, 0, 1, 5, 7, 5], [1, 9, 9, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    targets = term_targets(ids, mask, vocab_size=10, special=[0, 1, 2])
    assert targets[0].nonzero().flatten().tolist() == [5, 7]
    assert targets[1].nonzero().flatten().tolist() == [3, 4, 9]
    assert set(targets.unique().tolist()) == {0.0, 1.0}


def test_bow_stage_uses_its_own_steps_batch_and_lr(tmp_path):
    cfg = bow_config(tmp_path, "bow-settings")
    # bow.steps, bow.lr; bow.batch_size texts of encoder.passage_max_length tokens per step
    result = check_stage_run(cfg, "bow", steps=3, lr=3e-3, tokens=3 * 4 * 32)
    run_dir = run_dir_for(cfg)
    assert sorted(p.name for p in (run_dir / "bow-checkpoints").iterdir()) == ["step-00000003"]
    assert result["export_dir"] == str(run_dir / "bow")
    weights = load_file(f"{result['export_dir']}/model.safetensors")
    continued = build_encoder(cfg.backbone.model_copy(update={"init_weights": result["export_dir"]}), cfg.encoder)
    assert torch.equal(continued.lm.model.embed_tokens.weight.detach(), weights["model.embed_tokens.weight"])


@pytest.mark.parametrize("paradigm", ["sparse", "dense"])
@pytest.mark.parametrize("lora", [True, False])
def test_bow_step_flops_match_flop_counter(tmp_path, paradigm, lora):
    """The loop's FLOPs of a real step (BowTask.step_cost) equal FlopCounterMode's count of it, for both paradigms,
    with the LoRA adapter and with full fine-tuning."""
    cfg = bow_config(tmp_path, "bow-flops", paradigm, backbone={"lora": {"enabled": lora}})
    task = BowTask(cfg)
    module = task.build().train()
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert (trainable < sum(p.numel() for p in module.parameters())) == lora
    batch = task.collate({"text": bow_table(cfg).column("text").to_pylist()[:3]}, epoch=0)
    with FlopCounterMode(display=False) as counter:
        task.loss(module, batch, step=0).total.backward()
    flops, tokens = task.step_cost(batch)
    assert flops == counter.get_total_flops()
    assert tokens == 3 * 32


def own_term_share(encoder, texts: list[str], weights) -> float:
    """Mean over texts of the share of the non-negative vocabulary weights that falls on the text's own terms."""
    batch = encoder.tokenize(texts, "passage")
    special = [encoder.tokenizer.bos_token_id, encoder.tokenizer.pad_token_id]
    targets = term_targets(batch["input_ids"], batch["attention_mask"], int(encoder.lm.config.vocab_size), special)
    with torch.no_grad():
        values = weights(batch)
    return float(((values * targets).sum(dim=1) / values.sum(dim=1)).mean())


@pytest.mark.parametrize("paradigm", ["sparse", "dense"])
def test_bow_pre_training_puts_a_text_s_representation_on_its_own_terms(tmp_path, paradigm):
    """At random init a text's representation spreads over the whole vocabulary; after a short stage several times
    more of it is on the text's own terms (sparse: the term weights; dense: the softmax of the LM head's logits of
    the pooled vector, at bow.temperature)."""
    cfg = bow_config(tmp_path, f"bow-learns-{paradigm}", paradigm, bow={"steps": 60, "batch_size": 16, "lr": 5e-3})
    texts = list(corpus_texts("synthetic", cfg))[:32]

    def share(encoder) -> float:
        encoder.eval()
        if paradigm == "sparse":
            return own_term_share(encoder, texts, lambda b: encoder(**b))
        head = encoder.lm.get_output_embeddings()
        return own_term_share(encoder, texts, lambda b: torch.softmax(head(encoder(**b)) / cfg.bow.temperature, -1))

    before = share(build_encoder(cfg.backbone, cfg.encoder))
    result = run_training(cfg, task="bow")
    after = share(build_encoder(cfg.backbone.model_copy(update={"init_weights": result["export_dir"]}), cfg.encoder))
    assert after > 3 * before and after > 0.1, (before, after)


def test_the_planned_stage_flops_are_what_the_stage_uses(tmp_path):
    """`stage_flops` (how the sweep orders its stages) equals the FLOPs the loop counted, with fixed shapes."""
    cfg = bow_config(tmp_path, "bow-plan", "dense", train={"pad_to_max_length": True})
    result = run_training(cfg, task="bow")
    assert stage_flops(cfg, "bow") == result["flops"]
