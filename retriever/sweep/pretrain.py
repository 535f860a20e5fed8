"""The pre-training stages of a sweep, run before the grid and shared by the cells that continue them:

- MNTP (`mntp.enabled`): once per backbone (`<output_dir>/<sweep>-mntp-<backbone>/`), as the paper adapts each
  Llama with MNTP before the budgeted fine-tuning;
- bag-of-words (`bow.enabled`, `retriever.train.bow`): once per backbone x paradigm
  (`<output_dir>/<sweep>-bow-<backbone>-<paradigm>/`), after MNTP when both run, shared by that pair's losses.

Each stage is its own training run (an MLflow child run of the sweep); its FLOPs are reported per stage, outside
every cell's budget. A finished stage is reused. The cells continue its product: the LoRA adapter
(`backbone.init_adapter`) or, with full fine-tuning, the whole model (`backbone.init_weights`), through one
`sweep.overrides` entry per stage, placed before the user's entries so those still win.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from retriever.config import CellOverride, ExperimentConfig, stage_settings
from retriever.records import read_record, safe_name, write_record

log = logging.getLogger(__name__)

CONTINUE_KEYS = {"adapter": "backbone.init_adapter", "weights": "backbone.init_weights"}


def stage_config(cfg: ExperimentConfig, backbone: str, task: str = "mntp", paradigm: str | None = None):
    """The run of one stage: MNTP of `backbone`, or bag-of-words pre-training of (`backbone`, `paradigm`) with the
    `sweep.overrides` that select no loss and match both."""
    if task == "mntp":
        stage = cfg.model_copy(deep=True)
        stage.backbone.name = backbone
        stage.name = f"{cfg.name}-mntp-{safe_name(backbone)}"
        return stage
    if paradigm is None:
        raise ValueError(f"the {task} stage is per backbone x paradigm: give the paradigm")
    stage = stage_settings(cfg, backbone, paradigm)
    stage.name = f"{cfg.name}-{task}-{safe_name(backbone)}-{paradigm}"
    return stage


def run_stage(stage: ExperimentConfig, task: str, parent_run_id: str | None, **labels: Any) -> dict[str, Any]:
    """Run (or reuse) one pre-training stage; returns its record (steps, FLOPs, product directory)."""
    from retriever.train.trainer import run_dir_for, run_training

    run_dir = run_dir_for(stage)
    done = read_record(run_dir)  # written last: a stage without it is unfinished and runs again
    if done is not None:
        return done
    result = run_training(stage, task=task, parent_run_id=parent_run_id)
    record = {
        **labels,
        "task": task,
        "steps": result["steps"],
        "flops": result["flops"],
        "tokens": result["tokens"],
        "product": result["export_dir"],
        "kind": "adapter" if stage.backbone.lora.enabled or stage.backbone.init_adapter else "weights",
        "tracking_run_id": result.get("tracking_run_id"),
    }
    write_record(run_dir, record)
    log.info("%s stage %s: %d steps, %.3g FLOPs -> %s", task, labels, record["steps"], record["flops"], run_dir)
    return record


def stage_label(record: dict[str, Any]) -> str:
    """`<backbone>` (MNTP) or `<backbone>/<paradigm>` (bag-of-words): where a stage's metrics go."""
    parts = [safe_name(record["backbone"])] + ([record["paradigm"]] if record.get("paradigm") else [])
    return "/".join(parts)


StageJob = tuple[ExperimentConfig, str, dict[str, Any]]  # (stage config, task, record labels)
StageRunner = Callable[[list[StageJob], str | None], list[dict[str, Any]]]


def run_stages_here(jobs: list[StageJob], parent_run_id: str | None) -> list[dict[str, Any]]:
    """One stage after the other in this process (the sweep runs them as parallel Ray tasks instead)."""
    return [run_stage(stage, task, parent_run_id, **labels) for stage, task, labels in jobs]


def planned_stages(cfg: ExperimentConfig) -> int:
    """How many stages the enabled pre-training runs: MNTP per backbone, bag-of-words per backbone x paradigm."""
    backbones, paradigms = len(cfg.sweep.backbones), len(cfg.sweep.paradigms)
    return (backbones if cfg.mntp.enabled else 0) + (backbones * paradigms if cfg.bow.enabled else 0)


def _run_stage_task(stage: dict[str, Any], task: str, labels: dict[str, Any], parent: str | None) -> dict[str, Any]:
    return run_stage(ExperimentConfig.model_validate(stage), task, parent, **labels)


def ray_stage_runner(cfg: ExperimentConfig, verbose: bool) -> StageRunner:
    """Run a group of pre-training stages as Ray tasks, each holding a cell's resources, so they share the cluster
    as the cells do."""
    import ray

    def run(jobs: list[StageJob], parent: str | None) -> list[dict[str, Any]]:
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=verbose)
        from retriever.flops import stage_flops

        remote = ray.remote(num_cpus=cfg.sweep.cpus_per_trial, max_retries=0)(_run_stage_task)
        # Costliest first, so that the stages running side by side end close together.
        order = sorted(range(len(jobs)), key=lambda i: -stage_flops(jobs[i][0], jobs[i][1]))
        refs = {i: remote.remote(jobs[i][0].model_dump(mode="json"), jobs[i][1], jobs[i][2], parent) for i in order}
        return [ray.get(refs[i]) for i in range(len(jobs))]

    return run


def pretrain_backbones(
    cfg: ExperimentConfig, parent_run_id: str | None, run_stages: StageRunner = run_stages_here
) -> tuple[ExperimentConfig, list[dict[str, Any]]]:
    """Run every enabled stage of the sweep (the MNTP stages, then the bag-of-words stages, each group through
    `run_stages`); returns the config whose cells continue the products and the records."""
    continued = cfg.model_copy(deep=True)
    starts: list[CellOverride] = []
    records: list[dict[str, Any]] = []
    if cfg.mntp.enabled:
        jobs = [(stage_config(cfg, b), "mntp", {"backbone": b}) for b in cfg.sweep.backbones]
        for record in run_stages(jobs, parent_run_id):
            records.append(record)
            key = CONTINUE_KEYS[record["kind"]]
            starts.append(CellOverride(backbones=[record["backbone"]], set={key: record["product"]}))
    if cfg.bow.enabled:
        after_mntp = cfg.model_copy(deep=True)
        after_mntp.sweep.overrides = starts + list(cfg.sweep.overrides)
        jobs = [
            (stage_config(after_mntp, b, "bow", p), "bow", {"backbone": b, "paradigm": p})
            for b in cfg.sweep.backbones
            for p in cfg.sweep.paradigms
        ]
        for record in run_stages(jobs, parent_run_id):
            records.append(record)
            key = CONTINUE_KEYS[record["kind"]]
            selector = {"backbones": [record["backbone"]], "paradigms": [record["paradigm"]]}
            starts.append(CellOverride(**selector, set={key: record["product"]}))
    continued.sweep.overrides = starts + list(cfg.sweep.overrides)
    return continued, records


__all__ = [
    "planned_stages",
    "pretrain_backbones",
    "ray_stage_runner",
    "run_stage",
    "run_stages_here",
    "stage_config",
    "stage_label",
]
