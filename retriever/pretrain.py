"""The pre-training stage of a sweep (`mntp.enabled`): MNTP once per backbone, before the grid, shared by all of
that backbone's cells, as the paper adapts each Llama with MNTP before the budgeted fine-tuning.

Each backbone's stage is its own training run (`<output_dir>/<sweep>-mntp-<backbone>/`, an MLflow child run of the
sweep); its FLOPs are reported per backbone, outside every cell's budget. A finished stage is reused. The cells
continue its product: the LoRA adapter (`backbone.init_adapter`) or, with full fine-tuning, the whole model
(`backbone.init_weights`), through one `sweep.overrides` entry per backbone.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from retriever.config import CellOverride, ExperimentConfig

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text)


def stage_config(cfg: ExperimentConfig, backbone: str) -> ExperimentConfig:
    """The MNTP run of one backbone, named after the sweep and the backbone."""
    stage = cfg.model_copy(deep=True)
    stage.backbone.name = backbone
    stage.name = f"{cfg.name}-mntp-{_safe(backbone)}"
    return stage


def pretrain_backbone(cfg: ExperimentConfig, backbone: str, parent_run_id: str | None) -> dict[str, Any]:
    """Run (or reuse) the MNTP stage of `backbone`; returns its record (steps, FLOPs, product directory)."""
    from retriever.train.trainer import run_dir_for, run_training

    stage = stage_config(cfg, backbone)
    record_path = run_dir_for(stage) / RESULT_FILE
    if record_path.is_file():
        return json.loads(record_path.read_text())
    result = run_training(stage, task="mntp", parent_run_id=parent_run_id)
    record = {
        "backbone": backbone,
        "task": "mntp",
        "steps": result["steps"],
        "flops": result["flops"],
        "tokens": result["tokens"],
        "product": result["export_dir"],
        "kind": "adapter" if stage.backbone.lora.enabled else "weights",
        "tracking_run_id": result.get("tracking_run_id"),
    }
    partial = record_path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    partial.replace(record_path)  # written last: a stage without it is unfinished and runs again
    log.info(
        "pre-trained %s: %d MNTP steps, %.3g FLOPs -> %s",
        backbone,
        record["steps"],
        record["flops"],
        record["product"],
    )
    return record


def pretrain_backbones(
    cfg: ExperimentConfig, parent_run_id: str | None
) -> tuple[ExperimentConfig, list[dict[str, Any]]]:
    """Pre-train every backbone of the sweep; returns the config whose cells continue the products (one override
    per backbone, applied before the user's overrides so those still win) and the stage records."""
    records = [pretrain_backbone(cfg, backbone, parent_run_id) for backbone in cfg.sweep.backbones]
    continued = cfg.model_copy(deep=True)
    key = {"adapter": "backbone.init_adapter", "weights": "backbone.init_weights"}
    starts = [CellOverride(backbones=[r["backbone"]], set={key[r["kind"]]: r["product"]}) for r in records]
    continued.sweep.overrides = starts + list(cfg.sweep.overrides)
    return continued, records


__all__ = ["pretrain_backbone", "pretrain_backbones", "stage_config"]
