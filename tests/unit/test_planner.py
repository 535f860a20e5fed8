"""The budget planner: the paper grid's exact sizes, floor-division steps, errors, output formats, and a tiny cell
whose planned FLOPs per step equal FlopCounterMode's count of a real training step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from torch.utils.flop_counter import FlopCounterMode

from retriever.config import config_from_dict
from retriever.flops.planner import (
    BudgetTooSmall,
    PlanCell,
    format_plan,
    plan_cell,
    plan_from_json,
    plan_grid,
    plan_to_json,
    planned_steps,
)
from retriever.losses import RetrievalBatch, build_loss
from retriever.models.backbone import count_parameters
from retriever.models.encoders import build_encoder

PAPER_PARAMETERS = {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824, "llama-3-8b": 8_030_261_248}
# LoRA r=16 on q/k/v/o/gate/up/down: layers x 16 x sum(d_in + d_out) (peft reports the same numbers).
PAPER_LORA = {"llama-3.2-1b": 11_272_192, "llama-3.2-3b": 24_313_856, "llama-3-8b": 41_943_040}
BUDGET = 6e19


def paper_config(**sections):
    data = {
        "budget": {"flops": BUDGET},
        "train": {"batch_size": 128},
        "sweep": {
            "backbones": list(PAPER_PARAMETERS),
            "paradigms": ["sparse", "dense"],
            "losses": ["cl", "kd", "cl+kd"],
        },
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return config_from_dict(data)


@pytest.fixture(scope="module")
def paper_grid() -> list[PlanCell]:
    return plan_grid(paper_config())


def by_key(cells: list[PlanCell]) -> dict[tuple[str, str, str], PlanCell]:
    return {(c.backbone, c.paradigm, c.loss): c for c in cells}


def test_paper_grid_has_18_cells_with_exact_sizes(paper_grid):
    assert len(paper_grid) == 18
    assert [(c.backbone, c.paradigm, c.loss) for c in paper_grid[:6]] == [
        ("llama-3.2-1b", p, loss) for p in ("sparse", "dense") for loss in ("cl", "kd", "cl+kd")
    ]
    for cell in paper_grid:
        assert cell.total_parameters == PAPER_PARAMETERS[cell.backbone]
        assert cell.trainable_parameters == PAPER_LORA[cell.backbone]
        assert cell.exact and cell.budget_flops == BUDGET
    assert PAPER_LORA["llama-3.2-3b"] == 28 * 16 * (6144 + 4096 + 4096 + 6144 + 3 * (3072 + 8192))


def test_steps_are_the_floor_of_budget_over_step_cost(paper_grid):
    for cell in paper_grid:
        assert cell.steps >= 1
        assert cell.steps * cell.flops_per_step <= BUDGET < (cell.steps + 1) * cell.flops_per_step
        assert cell.total_flops == cell.steps * cell.flops_per_step
        assert cell.flops_per_step == cell.forward_flops + cell.backward_flops + cell.recompute_flops


def test_step_shapes_and_relative_costs(paper_grid):
    cells = by_key(paper_grid)
    for name in PAPER_PARAMETERS:
        cl, kd, clkd = (cells[(name, "sparse", loss)] for loss in ("cl", "kd", "cl+kd"))
        assert (cl.passages_per_query, kd.passages_per_query, clkd.passages_per_query) == (17, 2, 17)
        assert cl.tokens_per_step == 128 * 64 + 128 * 17 * 128
        assert kd.tokens_per_step == 128 * 64 + 128 * 2 * 128
        assert kd.flops_per_step < cl.flops_per_step < clkd.flops_per_step  # cl+kd also scores own candidates
        assert kd.steps > cl.steps
        for loss in ("cl", "kd", "cl+kd"):
            sparse, dense = cells[(name, "sparse", loss)], cells[(name, "dense", loss)]
            assert sparse.flops_per_step > dense.flops_per_step  # the LM head over every position
            assert sparse.tokens_per_step == dense.tokens_per_step
    # Larger models cost more per step.
    per_step = [cells[(name, "dense", "cl")].flops_per_step for name in PAPER_PARAMETERS]
    assert per_step == sorted(per_step)


def test_margin_mse_and_kl_shapes():
    kl = plan_cell(paper_config(loss={"kd": "kl", "num_negatives": 7}), "llama-3.2-1b", "dense", "kd")
    mse = plan_cell(paper_config(loss={"kd": "margin_mse", "num_negatives": 7}), "llama-3.2-1b", "dense", "kd")
    assert (kl.passages_per_query, mse.passages_per_query) == (8, 2)
    assert mse.flops_per_step < kl.flops_per_step


def test_max_steps_budget():
    cell = plan_cell(paper_config(budget={"flops": None, "max_steps": 250}), "llama-3.2-1b", "sparse", "cl")
    assert cell.steps == 250 and cell.total_flops == 250 * cell.flops_per_step and cell.budget_flops is None


def test_budget_too_small_names_the_cell_and_minimum():
    cfg = paper_config(budget={"flops": 1e12})
    with pytest.raises(
        BudgetTooSmall, match=r"budget.flops = 1e\+12 is too small for cell \(llama-3.2-1b, sparse, cl\)"
    ):
        plan_grid(cfg)
    per_step = plan_cell(paper_config(), "llama-3.2-1b", "sparse", "cl").flops_per_step
    with pytest.raises(BudgetTooSmall, match=re.escape(f"set budget.flops >= {per_step} (or lower")):
        plan_cell(cfg, "llama-3.2-1b", "sparse", "cl")
    assert planned_steps(float(per_step), per_step) == 1
    assert planned_steps(2 * per_step - 1, per_step) == 1


def test_planned_steps_is_exact_for_large_budgets():
    # 3 * (2**60 // 3 + 1) = 2**60 + 2 > 2**60: two steps fit, though float division rounds the ratio up to 3.0.
    per_step = 2**60 // 3 + 1
    assert float(2**60) // per_step == 3.0
    assert planned_steps(float(2**60), per_step) == 2
    with pytest.raises(BudgetTooSmall):
        planned_steps(float(2**60), 2**60 + 2**8)


def test_json_round_trip(paper_grid):
    rows = plan_to_json(paper_grid)
    text = json.dumps(rows)
    again = json.loads(text)
    assert again == rows
    assert plan_from_json(again) == paper_grid
    assert again[0]["total_parameters"] == 1_235_814_400 and isinstance(again[0]["flops_per_step"], int)
    with pytest.raises(ValueError, match=r"plan row 0: missing keys \['steps'\]"):
        plan_from_json([{k: v for k, v in rows[0].items() if k != "steps"}])


def test_format_plan_is_an_aligned_table(paper_grid):
    text = format_plan(paper_grid)
    lines = text.splitlines()
    assert lines[0] == "budget: 6.00e+19 FLOPs per cell"
    assert lines[1].split()[:3] == ["backbone", "paradigm", "loss"]
    assert len(lines) == 3 + 18
    assert "1,235,814,400" in text and "8,030,261,248" in text and "41,943,040" in text
    first = paper_grid[0]
    assert f"{first.flops_per_step:.2e}" in lines[3] and f"{first.steps:,}" in lines[3]
    # Right-aligned numeric columns end at the same offsets on every row.
    header_end = lines[1].index("FLOPs/step") + len("FLOPs/step")
    for line in lines[3:]:
        assert re.fullmatch(r"\d\.\d\de\+\d\d", line[header_end - 8 : header_end])
    assert format_plan([]) == "(empty plan)"


def test_full_finetune_trains_every_parameter():
    cfg = paper_config(backbone={"lora": {"enabled": False}})
    full = plan_cell(cfg, "llama-3-8b", "sparse", "cl")
    lora = plan_cell(paper_config(), "llama-3-8b", "sparse", "cl")
    assert full.trainable_parameters == full.total_parameters == PAPER_PARAMETERS["llama-3-8b"]
    assert full.flops_per_step > lora.flops_per_step


def test_more_workers_only_repeat_the_global_loss():
    one = plan_cell(paper_config(), "llama-3.2-1b", "dense", "cl")
    four = plan_cell(paper_config(train={"num_workers": 4}), "llama-3.2-1b", "dense", "cl")
    # the B x B(1+n) score matrix of dimension 2048, forward + both gradients, on 3 extra ranks
    assert four.flops_per_step - one.flops_per_step == 3 * 3 * (2 * 128 * 128 * 17 * 2048)


def test_sdpa_counts_fused_attention_backward():
    eager = plan_cell(paper_config(backbone={"attn_implementation": "eager"}), "llama-3.2-1b", "dense", "cl")
    sdpa = plan_cell(paper_config(backbone={"attn_implementation": "sdpa"}), "llama-3.2-1b", "dense", "cl")
    attention_forward = 16 * 4 * 32 * 64 * (128 * 64 * 64 + 128 * 17 * 128 * 128)
    assert sdpa.flops_per_step - eager.flops_per_step == attention_forward // 2


def tiny_config(tokenizer_dir, **backbone):
    return config_from_dict(
        {
            "backbone": {
                "name": "tiny-s",
                "tokenizer": str(tokenizer_dir),
                "attn_implementation": "eager",
                **backbone,
            },
            "encoder": {"paradigm": "sparse", "query_max_length": 8, "passage_max_length": 16},
            "loss": {"name": "cl", "num_negatives": 2},
            "train": {"batch_size": 2},
            "budget": {"flops": 1e9},
            "sweep": {"backbones": ["tiny-s", "tiny-m"], "paradigms": ["sparse"], "losses": ["cl", "kd"]},
        }
    )


def test_tiny_cell_plan_equals_a_measured_training_step(tiny_tokenizer_dir):
    cfg = tiny_config(tiny_tokenizer_dir)
    cell = plan_cell(cfg)
    encoder = build_encoder(cfg.backbone, cfg.encoder).train()
    assert encoder.lm.config.vocab_size == 400  # the tokenizer's vocabulary, not the preset's 4,096
    lora = count_parameters(encoder, trainable_only=True)
    assert cell.total_parameters == count_parameters(encoder) - lora and cell.trainable_parameters == lora
    queries = encoder.tokenize(["a query"] * 2, "query", pad_to_max_length=True)
    passages = encoder.tokenize(["a passage text"] * 6, "passage", pad_to_max_length=True)
    loss = build_loss("cl", "sparse", ramp_steps=10)
    with FlopCounterMode(display=False) as counter:
        q, p = encoder(**queries), encoder(**passages).view(2, 3, -1)
        loss(RetrievalBatch(q, p, score_scale=encoder.score_scale), step=1).total.backward()
    assert cell.flops_per_step == counter.get_total_flops()
    assert cell.tokens_per_step == 2 * 8 + 6 * 16
    assert cell.steps == int(1e9 // cell.flops_per_step)


def test_tiny_grid_vocabulary_sources(tiny_tokenizer_dir):
    cells = plan_grid(tiny_config(tiny_tokenizer_dir))
    assert [(c.backbone, c.loss) for c in cells] == [
        ("tiny-s", "cl"),
        ("tiny-s", "kd"),
        ("tiny-m", "cl"),
        ("tiny-m", "kd"),
    ]
    # tiny-s: 400 x 32 tied embedding + 2 layers of (32*32*2 + 32*16*2 + 3*32*96 + 2*32) + final norm 32
    assert cells[0].total_parameters == 400 * 32 + 2 * (2048 + 1024 + 9216 + 64) + 32
    overridden = plan_grid(tiny_config(tiny_tokenizer_dir), vocab_sizes={"tiny-s": 1000})
    assert overridden[0].total_parameters - cells[0].total_parameters == 600 * 32
    assert overridden[2] == cells[2]
    no_tokenizer = plan_grid(tiny_config(tiny_tokenizer_dir, tokenizer=None))
    assert no_tokenizer[0].total_parameters - cells[0].total_parameters == (4096 - 400) * 32


def test_continued_adapter_sets_rank_and_targets(tiny_tokenizer_dir, tmp_path):
    cfg = tiny_config(tiny_tokenizer_dir, lora={"r": 4, "target_modules": ["q_proj", "down_proj"]})
    encoder = build_encoder(cfg.backbone, cfg.encoder)
    encoder.model.save_pretrained(tmp_path / "adapter")
    continued = plan_cell(tiny_config(tiny_tokenizer_dir, init_adapter=str(tmp_path / "adapter")))
    assert continued.trainable_parameters == count_parameters(encoder, trainable_only=True) == 2 * 4 * (64 + 128)
    assert continued == plan_cell(cfg)
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter directory"):
        plan_cell(tiny_config(tiny_tokenizer_dir, init_adapter=str(tmp_path)))


def test_unknown_cell_names_fail_before_building(tiny_tokenizer_dir):
    cfg = tiny_config(tiny_tokenizer_dir)
    with pytest.raises(KeyError, match="unknown paradigm 'hybrid'"):
        plan_cell(cfg, paradigm="hybrid")
    with pytest.raises(KeyError, match="unknown loss 'triplet'"):
        plan_cell(cfg, loss="triplet")


def test_grid_plans_each_cell_as_the_sweep_runs_it(tiny_tokenizer_dir, tmp_path):
    """`sweep.overrides` change a cell's plan exactly as they change the config the sweep trains it with."""
    from retriever.config import CellOverride
    from retriever.sweep.grid import cell_config

    cfg = tiny_config(tiny_tokenizer_dir)
    cfg.sweep.overrides = [
        CellOverride(losses=["kd"], set={"train.batch_size": 6}),
        CellOverride(backbones=["tiny-m"], losses=["kd"], set={"train.batch_size": 4, "backbone.lora.r": 2}),
    ]
    cells = plan_grid(cfg)
    assert [(c.backbone, c.loss, c.queries_per_step) for c in cells] == [
        ("tiny-s", "cl", 2),
        ("tiny-s", "kd", 6),
        ("tiny-m", "cl", 2),
        ("tiny-m", "kd", 4),
    ]
    for cell in cells:
        assert cell == plan_cell(cell_config(cfg, cell.backbone, cell.paradigm, cell.loss))
    assert cells[3].trainable_parameters < cells[2].trainable_parameters  # LoRA rank 2 instead of 16


def test_missing_adapter_is_planned_with_the_configured_lora(tiny_tokenizer_dir, tmp_path):
    missing = str(tmp_path / "not-yet" / "mntp")
    planned = plan_cell(tiny_config(tiny_tokenizer_dir, init_adapter=missing))
    fresh = plan_cell(tiny_config(tiny_tokenizer_dir))
    assert planned.assumed_adapter == missing and fresh.assumed_adapter is None
    assert planned.trainable_parameters == fresh.trainable_parameters
    assert planned.flops_per_step == fresh.flops_per_step and planned.steps == fresh.steps
    text = format_plan([planned])
    assert f"note: backbone.init_adapter {missing} does not exist yet" in text
    assert plan_from_json(json.loads(json.dumps(plan_to_json([planned])))) == [planned]
    # Plans written before the field existed still load.
    old = {k: v for k, v in plan_to_json([fresh])[0].items() if k != "assumed_adapter"}
    assert plan_from_json([old]) == [fresh]


PAPER_BATCHES = {  # queries per step (paper section 2.3): CL and CL+KD 112/128/128, KD 1024/512/512
    ("llama-3.2-1b", "cl"): 112,
    ("llama-3.2-1b", "cl+kd"): 112,
    ("llama-3.2-1b", "kd"): 1024,
    ("llama-3.2-3b", "cl"): 128,
    ("llama-3.2-3b", "cl+kd"): 128,
    ("llama-3.2-3b", "kd"): 512,
    ("llama-3-8b", "cl"): 128,
    ("llama-3-8b", "cl+kd"): 128,
    ("llama-3-8b", "kd"): 512,
}


def test_plan_command_prints_the_paper_per_cell_batches(capsys, monkeypatch, tmp_path):
    from retriever.cli import main

    config = Path(__file__).resolve().parents[2] / "configs" / "paper.yaml"
    monkeypatch.chdir(tmp_path)
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("llama")]
    assert len(rows) == 18
    header = out.splitlines()[1].split()
    batch_column = header.index("batch")
    for row in rows:
        backbone, paradigm, loss = row[:3]
        negatives = 1 if loss == "kd" else 16  # MarginMSE: the positive and one sampled negative
        assert row[batch_column] == f"{PAPER_BATCHES[backbone, loss]}x(1+{negatives})", row
    assert "pre-training: MNTP once per backbone before the grid (10,000 steps of 32 x 512 tokens" in out
    assert main(["plan", str(config), "--json"]) == 0
    cells = plan_from_json(json.loads(capsys.readouterr().out))
    for cell in cells:
        assert cell.queries_per_step == PAPER_BATCHES[cell.backbone, cell.loss]
        assert cell.steps * cell.flops_per_step <= cell.budget_flops < (cell.steps + 1) * cell.flops_per_step
        assert cell.trainable_parameters == PAPER_LORA[cell.backbone]
        assert cell.assumed_adapter is None  # the sweep's MNTP stage makes the adapters (rank of backbone.lora)
