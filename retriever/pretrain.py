"""The pre-training stage of a sweep (`mntp.enabled`): MNTP once per backbone, before the grid, shared by all of
that backbone's cells, as the paper adapts each Llama with MNTP before the budgeted fine-tuning.

Each backbone's stage is its own training run (`<output_dir>/<sweep>-mntp-<backbone>/`, an MLflow child run of the
sweep); its FLOPs are reported per backbone, outside every cell's budget. A finished stage is reused. The cells
continue its product: the LoRA adapter (`backbone.init_adapter`) or, with full fine-tuning, the whole model
(`backbone.init_weights`), through one `sweep.overrides` entry per backbone.
"""

from __future__ import annotations

import logging
from typing import Any

from retriever.config import CellOverride, ExperimentConfig
from retriever.records import read_record, safe_name, write_record

log = logging.getLogger(__name__)


def stage_config(cfg: ExperimentConfig, backbone: str) -> ExperimentConfig:
    """The MNTP run of one backbone, named after the sweep and the backbone."""
    stage = cfg.model_copy(deep=True)
    stage.backbone.name = backbone
    stage.name = f"{cfg.name}-mntp-{safe_name(backbone)}"
    return stage


def pretrain_backbone(cfg: ExperimentConfig, backbone: str, parent_run_id: str | None) -> dict[str, Any]:
    """Run (or reuse) the MNTP stage of `backbone`; returns its record (steps, FLOPs, product directory)."""
    from retriever.train.trainer import run_dir_for, run_training

    stage = stage_config(cfg, backbone)
    run_dir = run_dir_for(stage)
    done = read_record(run_dir)  # written last: a stage without it is unfinished and runs again
    if done is not None:
        return done
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
    write_record(run_dir, record)
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
