"""The sweep's pre-training stage (retriever.sweep.pretrain, `mntp.enabled`): MNTP once per backbone into
<output_dir>/<sweep>-mntp-<backbone>/, a record per stage, reuse of finished stages, and cells that start from the
product (`backbone.init_weights` with full fine-tuning, `backbone.init_adapter` with LoRA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_mntp import mntp_stage_config

from retriever.config import CellOverride
from retriever.models.encoders import build_encoder
from retriever.sweep.grid import cell_config
from retriever.sweep.pretrain import pretrain_backbones, stage_config

STEPS, BATCH, LENGTH = 3, 4, 32
SMALL_DATA = {"synthetic_docs": 200, "synthetic_train_queries": 20, "synthetic_test_queries": 12}
USER_OVERRIDE = CellOverride(losses=["kd"], set={"train.batch_size": 4})


def sweep_config(root, lora: bool, backbones: list[str]):
    cfg = mntp_stage_config(
        root,
        "pre",
        backbone={"lora": {"enabled": lora}},
        mntp={"enabled": True, "steps": STEPS, "batch_size": BATCH, "max_length": LENGTH},
        data=SMALL_DATA,
        sweep={"backbones": backbones, "paradigms": ["sparse"], "losses": ["cl", "kd"]},
    )
    cfg.sweep.overrides = [USER_OVERRIDE]
    return cfg


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """MNTP with full fine-tuning for two backbones, run once for the module."""
    root = tmp_path_factory.mktemp("pretrain-full")
    cfg = sweep_config(root, lora=False, backbones=["tiny-s", "tiny-m"])
    continued, records = pretrain_backbones(cfg, None)
    return Path(cfg.train.output_dir), cfg, continued, records


def test_stage_config_names_the_run_after_the_backbone(tmp_path):
    cfg = sweep_config(tmp_path, lora=False, backbones=["tiny-s"])
    stage = stage_config(cfg, "org/model-1.5")
    assert stage.name == "pre-mntp-org_model-1.5" and stage.backbone.name == "org/model-1.5"
    assert stage.train.output_dir == cfg.train.output_dir  # the sweep's data folder is shared
    assert cfg.name == "pre" and cfg.backbone.name == "tiny-s"  # the sweep's config is not changed


def test_mntp_runs_once_per_backbone_and_writes_its_record(full):
    root, _, _, records = full
    stages = sorted(p.name for p in root.iterdir() if p.name.startswith("pre-mntp-"))
    assert stages == ["pre-mntp-tiny-m", "pre-mntp-tiny-s"]
    assert [r["backbone"] for r in records] == ["tiny-s", "tiny-m"]
    for record in records:
        run_dir = (root / f"pre-mntp-{record['backbone']}").resolve()
        assert json.loads((run_dir / "result.json").read_text()) == record
        assert not (run_dir / "result.partial").exists()
        assert record["task"] == "mntp" and record["kind"] == "weights"
        assert record["steps"] == STEPS and record["tokens"] == STEPS * BATCH * LENGTH
        assert record["flops"] > 0 and record["tracking_run_id"] is None
        assert record["product"] == str(run_dir / "mntp")
        assert (run_dir / "mntp" / "model.safetensors").is_file()
        assert sorted(p.name for p in (run_dir / "mntp-checkpoints").iterdir()) == [f"step-{STEPS:08d}"]
    # Same tokens, four times the parameters or so: tiny-m's stage costs more.
    assert records[1]["flops"] > 2 * records[0]["flops"]


def test_cells_continue_the_full_weights_before_user_overrides(full):
    root, cfg, continued, records = full
    overrides = continued.sweep.overrides
    assert len(overrides) == 3
    for override, record in zip(overrides[:2], records):
        assert override.backbones == [record["backbone"]] and override.paradigms is None and override.losses is None
        assert override.set == {"backbone.init_weights": record["product"]}
    assert overrides[2] == USER_OVERRIDE
    assert cfg.sweep.overrides == [USER_OVERRIDE]  # the input config is left as it was
    kd_cell = cell_config(continued, "tiny-m", "sparse", "kd")
    assert kd_cell.backbone.init_weights == records[1]["product"] and kd_cell.train.batch_size == 4
    assert cell_config(continued, "tiny-s", "sparse", "cl").backbone.init_weights == records[0]["product"]


def test_a_cell_starts_from_the_mntp_product(full):
    _, cfg, continued, records = full
    cell = cell_config(continued, "tiny-s", "sparse", "cl")
    encoder = build_encoder(cell.backbone, cell.encoder)
    product = load_file(f"{records[0]['product']}/model.safetensors")
    embedding = encoder.lm.get_input_embeddings().weight.detach()
    assert torch.equal(embedding, product["model.embed_tokens.weight"])
    for name, value in encoder.lm.state_dict().items():
        if name in product:
            assert torch.equal(value, product[name]), name
    fresh = build_encoder(cell_config(cfg, "tiny-s", "sparse", "cl").backbone, cell.encoder)
    assert fresh.lm.get_input_embeddings().weight.shape == embedding.shape
    assert not torch.equal(fresh.lm.get_input_embeddings().weight.detach(), embedding)


def test_a_second_call_reuses_the_finished_stages(full, monkeypatch):
    root, cfg, continued, records = full
    results = [root / f"pre-mntp-{b}" / "result.json" for b in ("tiny-s", "tiny-m")]
    before = [path.stat().st_mtime_ns for path in results]

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished MNTP stage was trained again")

    monkeypatch.setattr("retriever.train.trainer.run_training", must_not_run)
    again, records_again = pretrain_backbones(cfg, None)
    assert records_again == records
    assert again.sweep.overrides == continued.sweep.overrides
    assert [path.stat().st_mtime_ns for path in results] == before


def test_an_unfinished_stage_runs_again(tmp_path, monkeypatch):
    """A stage without result.json (e.g. interrupted) is trained (run_training resumes it); the record follows."""
    cfg = sweep_config(tmp_path, lora=False, backbones=["tiny-s"])
    calls = []

    def fake_training(stage, task, parent_run_id):
        calls.append((stage.name, stage.backbone.name, task, parent_run_id))
        return {"steps": STEPS, "flops": 7.0, "tokens": 11, "export_dir": "/somewhere/mntp"}

    monkeypatch.setattr("retriever.train.trainer.run_training", fake_training)
    (Path(cfg.train.output_dir) / "pre-mntp-tiny-s").mkdir(parents=True)
    continued, records = pretrain_backbones(cfg, "parent-123")
    assert calls == [("pre-mntp-tiny-s", "tiny-s", "mntp", "parent-123")]
    assert records == [
        {
            "backbone": "tiny-s",
            "task": "mntp",
            "steps": STEPS,
            "flops": 7.0,
            "tokens": 11,
            "product": "/somewhere/mntp",
            "kind": "weights",
            "tracking_run_id": None,
        }
    ]
    assert continued.sweep.overrides[0].set == {"backbone.init_weights": "/somewhere/mntp"}


def test_with_lora_the_cells_continue_the_adapter(tmp_path):
    cfg = sweep_config(tmp_path, lora=True, backbones=["tiny-s"])
    continued, records = pretrain_backbones(cfg, None)
    (record,) = records
    assert record["kind"] == "adapter" and record["steps"] == STEPS and record["flops"] > 0
    saved = load_file(f"{record['product']}/adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)
    assert [o.set for o in continued.sweep.overrides] == [
        {"backbone.init_adapter": record["product"]},
        USER_OVERRIDE.set,
    ]
    cell = cell_config(continued, "tiny-s", "sparse", "cl")
    assert cell.backbone.init_adapter == record["product"] and cell.backbone.init_weights is None
    encoder = build_encoder(cell.backbone, cell.encoder)
    live = {k.replace(".default", ""): v for k, v in encoder.model.state_dict().items() if "lora_" in k}
    assert set(live) == set(saved)
    for key, value in saved.items():
        assert torch.equal(live[key], value), key
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in saved.items() if "lora_B" in k)  # it trained


def test_bow_stages_run_per_backbone_and_paradigm_after_mntp_with_paradigm_overrides(tmp_path):
    """MNTP once per backbone, then bag-of-words once per backbone x paradigm continuing MNTP's product; overrides
    without a loss selector reach the stage (here the sparse stage's steps), loss-specific ones do not; each cell
    continues its own pair's product, and the user's overrides still come last."""
    cfg = sweep_config(tmp_path, lora=False, backbones=["tiny-s"])
    cfg.sweep.paradigms = ["sparse", "dense"]
    cfg.bow.enabled, cfg.bow.steps, cfg.bow.batch_size = True, 2, 4
    cfg.encoder.passage_max_length = 32
    sparse_steps = CellOverride(paradigms=["sparse"], set={"bow.steps": 3})
    cfg.sweep.overrides = [sparse_steps, USER_OVERRIDE]
    continued, records = pretrain_backbones(cfg, None)
    assert [(r["task"], r["backbone"], r.get("paradigm"), r["steps"]) for r in records] == [
        ("mntp", "tiny-s", None, STEPS),
        ("bow", "tiny-s", "sparse", 3),
        ("bow", "tiny-s", "dense", 2),
    ]
    root = Path(cfg.train.output_dir)
    assert {p.name for p in root.iterdir() if p.name.startswith("pre-")} == {
        "pre-mntp-tiny-s",
        "pre-bow-tiny-s-sparse",
        "pre-bow-tiny-s-dense",
    }
    bow_sparse = records[1]
    assert bow_sparse["tokens"] == 3 * 4 * 32 and bow_sparse["product"].endswith("pre-bow-tiny-s-sparse/bow")
    sparse_kd = cell_config(continued, "tiny-s", "sparse", "kd")
    dense_cl = cell_config(continued, "tiny-s", "dense", "cl")
    assert sparse_kd.backbone.init_weights == bow_sparse["product"] and sparse_kd.train.batch_size == 4
    assert dense_cl.backbone.init_weights == records[2]["product"]
    assert continued.sweep.overrides[-2:] == [sparse_steps, USER_OVERRIDE]
    loss_specific = stage_config(cfg, "tiny-s", "bow", "sparse")
    assert loss_specific.train.batch_size == cfg.train.batch_size  # USER_OVERRIDE selects kd: not a stage setting
    assert loss_specific.name == "pre-bow-tiny-s-sparse" and loss_specific.bow.steps == 3


def test_the_bow_stage_continues_the_mntp_product(tmp_path, monkeypatch):
    cfg = sweep_config(tmp_path, lora=False, backbones=["tiny-s"])
    cfg.bow.enabled, cfg.sweep.paradigms = True, ["dense"]
    started = []

    def fake_training(stage, task, parent_run_id):
        started.append((task, stage.backbone.init_weights))
        return {"steps": 1, "flops": 1.0, "tokens": 1, "export_dir": f"/products/{task}"}

    monkeypatch.setattr("retriever.train.trainer.run_training", fake_training)
    continued, _ = pretrain_backbones(cfg, None)
    assert started == [("mntp", None), ("bow", "/products/mntp")]
    assert cell_config(continued, "tiny-s", "dense", "cl").backbone.init_weights == "/products/bow"
