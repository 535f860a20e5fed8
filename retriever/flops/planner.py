"""The budget planner: budget.flops → steps per sweep cell and per pre-training stage, and the printed plan."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from fractions import Fraction
from typing import Any

from retriever.config import ExperimentConfig, cell_settings
from retriever.errors import DataFormatError, UserError
from retriever.flops.counter import (
    LOSS_COSTS,
    PARADIGM_COSTS,
    TrainingOptions,
    attention_kernel,
    bow_flops,
    mntp_flops,
    passages_per_query,
    planned_lora,
    step_flops,
)
from retriever.flops.shapes import BatchShape, ModelShape

# ------------------------------------------------------------------------------------------------- planner


class BudgetTooSmall(UserError, ValueError):
    """The FLOP budget does not pay for a single training step of a cell."""


def planned_steps(budget_flops: float, flops_per_step: int, where: str = "this cell") -> int:
    """floor(budget / flops_per_step), exactly (no float rounding); at least one step or `BudgetTooSmall`."""
    if flops_per_step <= 0:
        raise ValueError(f"{where}: flops_per_step must be positive, got {flops_per_step}")
    steps = int(Fraction(budget_flops) // flops_per_step)
    if steps < 1:
        raise BudgetTooSmall(
            f"budget.flops = {budget_flops:.4g} is too small for {where}: one training step costs "
            f"{flops_per_step:.4g} FLOPs; set budget.flops >= {flops_per_step} "
            f"(or lower train.batch_size / lengths / loss.num_negatives)"
        )
    return steps


@dataclass(frozen=True)
class PlanCell:
    """The plan of one sweep cell: model size, step shape and cost, and the steps the budget buys."""

    backbone: str
    paradigm: str
    loss: str
    total_parameters: int
    trainable_parameters: int
    queries_per_step: int
    passages_per_query: int
    query_length: int
    passage_length: int
    tokens_per_step: int
    flops_per_step: int
    forward_flops: int
    backward_flops: int
    recompute_flops: int
    steps: int
    total_flops: int
    budget_flops: float | None
    exact: bool  # fixed (max-length) shapes: the per-step count is exact; otherwise an upper bound
    assumed_adapter: str | None = None  # backbone.init_adapter, not there yet: planned with backbone.lora's rank


@dataclass(frozen=True)
class _Backbone:
    shape: ModelShape
    total_parameters: int


def _resolve_backbone(name: str, vocab_size: int | None) -> _Backbone:
    from retriever.models.backbone import backbone_config, build_meta_model, count_parameters

    shape = ModelShape.from_config(backbone_config(name, vocab_size))
    # Counted on a meta-device model: exact for any architecture, tied weights once, no memory, no download.
    return _Backbone(shape, count_parameters(build_meta_model(name, vocab_size)))


def _vocab_size(
    cfg: ExperimentConfig, name: str, vocab_sizes: Mapping[str, int] | None, cache: dict[str, int]
) -> int | None:
    """The vocabulary the encoder will have: random (tiny) presets take their tokenizer's size, as `build_encoder`."""
    from retriever.models.backbone import is_random_preset

    if vocab_sizes and name in vocab_sizes:
        return int(vocab_sizes[name])
    if is_random_preset(name) and cfg.backbone.tokenizer:
        if cfg.backbone.tokenizer not in cache:
            from retriever.models.tokenizers import load_tokenizer

            cache[cfg.backbone.tokenizer] = len(load_tokenizer(cfg.backbone.tokenizer))
        return cache[cfg.backbone.tokenizer]
    return None


def stage_flops(stage: ExperimentConfig, task: str) -> float:
    """Planned FLOPs of a pre-training stage (`mntp`: the expected share of masked positions; `bow`), from the
    stage's config before `retriever.train` specialises it (its own steps and batch come from `mntp` / `bow`)."""
    name = stage.backbone.name
    shape = ModelShape.from_name(stage.backbone.init_weights or name, _vocab_size(stage, name, None, {}))
    lora_rank, lora_targets, _ = planned_lora(stage)
    options: TrainingOptions = {
        "lora_rank": lora_rank,
        "lora_targets": lora_targets,
        "gradient_checkpointing": stage.backbone.gradient_checkpointing,
        "attention": attention_kernel(stage.backbone.attn_implementation),
    }
    if task == "mntp":
        m = stage.mntp
        predicted = round(m.mask_probability * m.batch_size * m.max_length)
        return float(m.steps * mntp_flops(shape, m.batch_size, m.max_length, predicted, **options).total)
    if task == "bow":
        b = stage.bow
        length = stage.encoder.passage_max_length
        return float(b.steps * bow_flops(shape, stage.encoder.paradigm, b.batch_size, length, **options).total)
    raise ValueError(f"no FLOP plan for a {task!r} stage (known: mntp, bow)")


def _plan(cfg: ExperimentConfig, name: str, backbone: _Backbone, paradigm: str, loss: str) -> PlanCell:
    where = f"cell ({name}, {paradigm}, {loss})"
    lora_rank, lora_targets, assumed_adapter = planned_lora(cfg)
    batch = BatchShape(
        queries=cfg.train.batch_size,
        passages_per_query=passages_per_query(loss, cfg.loss.kd, cfg.loss.num_negatives),
        query_length=cfg.encoder.query_max_length,
        passage_length=cfg.encoder.passage_max_length,
    )
    flops = step_flops(
        backbone.shape,
        paradigm,
        batch,
        scoring=LOSS_COSTS.get(loss).scoring,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        gradient_checkpointing=cfg.backbone.gradient_checkpointing,
        attention=attention_kernel(cfg.backbone.attn_implementation),
        world_size=max(1, cfg.train.num_workers),
    )
    per_step = flops.total
    if cfg.budget.flops is not None:
        steps = planned_steps(cfg.budget.flops, per_step, where)
    else:
        assert cfg.budget.max_steps is not None  # the config schema requires exactly one of the two
        steps = cfg.budget.max_steps
    trainable = (
        backbone.total_parameters if lora_rank is None else backbone.shape.lora_parameters(lora_rank, lora_targets)
    )
    return PlanCell(
        backbone=name,
        paradigm=paradigm,
        loss=loss,
        total_parameters=backbone.total_parameters,
        trainable_parameters=trainable,
        queries_per_step=batch.queries,
        passages_per_query=batch.passages_per_query,
        query_length=batch.query_length,
        passage_length=batch.passage_length,
        tokens_per_step=batch.tokens,
        flops_per_step=per_step,
        forward_flops=flops.forward_total,
        backward_flops=flops.backward_total,
        recompute_flops=flops.recompute_total,
        steps=steps,
        total_flops=steps * per_step,
        budget_flops=cfg.budget.flops,
        exact=cfg.train.pad_to_max_length,
        assumed_adapter=assumed_adapter,
    )


def plan_cell(
    cfg: ExperimentConfig,
    backbone: str | None = None,
    paradigm: str | None = None,
    loss: str | None = None,
    *,
    vocab_size: int | None = None,
) -> PlanCell:
    """The plan of `cfg` as given, with backbone / paradigm / loss defaulting to cfg.backbone.name,
    cfg.encoder.paradigm, cfg.loss.name (`sweep.overrides` are not applied: plan a sweep cell with `plan_grid`, or
    pass `retriever.config.cell_settings(...)`). Raises `BudgetTooSmall` when budget.flops does not pay for one
    step. A `backbone.init_adapter` that does not exist yet is planned with backbone.lora (`assumed_adapter`)."""
    name = backbone or cfg.backbone.name
    paradigm = paradigm or cfg.encoder.paradigm
    loss = loss or cfg.loss.name
    # Unknown names fail before any model is built.
    PARADIGM_COSTS.get(paradigm)
    LOSS_COSTS.get(loss)
    vocab = vocab_size if vocab_size is not None else _vocab_size(cfg, name, None, {})
    return _plan(cfg, name, _resolve_backbone(name, vocab), paradigm, loss)


def plan_grid(cfg: ExperimentConfig, vocab_sizes: dict[str, int] | None = None) -> list[PlanCell]:
    """One cell per backbone x paradigm x loss of cfg.sweep, in that nesting order, each planned on the config the
    sweep runs it with (`cell_settings`: its axes and the matching `sweep.overrides`).

    `vocab_sizes` (backbone name → vocabulary) overrides the vocabulary otherwise taken from the backbone's config,
    or for random (tiny) presets from backbone.tokenizer. Raises `BudgetTooSmall` naming the first cell the budget
    cannot pay one step of, with the minimum budget it needs.
    """
    tokenizers: dict[str, int] = {}
    backbones: dict[tuple[str, int | None], _Backbone] = {}
    cells = []
    for name in cfg.sweep.backbones:
        for paradigm in cfg.sweep.paradigms:
            for loss in cfg.sweep.losses:
                cell = cell_settings(cfg, name, paradigm, loss)
                key = (name, _vocab_size(cell, name, vocab_sizes, tokenizers))
                if key not in backbones:
                    backbones[key] = _resolve_backbone(*key)
                cells.append(_plan(cell, name, backbones[key], paradigm, loss))
    return cells


def plan_to_json(cells: Iterable[PlanCell]) -> list[dict[str, Any]]:
    """JSON-ready rows (exact integers; `plan_from_json` reverses it)."""
    return [asdict(cell) for cell in cells]


def plan_from_json(rows: Iterable[Mapping[str, Any]]) -> list[PlanCell]:
    names = {f.name for f in fields(PlanCell)}
    optional = {f.name for f in fields(PlanCell) if f.default is not MISSING}
    cells = []
    for index, row in enumerate(rows):
        missing, extra = names - optional - set(row), set(row) - names
        if missing or extra:
            raise DataFormatError(f"plan row {index}: missing keys {sorted(missing)}, unknown keys {sorted(extra)}")
        cells.append(PlanCell(**row))
    return cells


_COLUMNS: list[tuple[str, Callable[[PlanCell], str], str]] = [
    ("backbone", lambda c: c.backbone, "<"),
    ("paradigm", lambda c: c.paradigm, "<"),
    ("loss", lambda c: c.loss, "<"),
    ("params", lambda c: f"{c.total_parameters:,}", ">"),
    ("trainable", lambda c: f"{c.trainable_parameters:,}", ">"),
    ("batch", lambda c: f"{c.queries_per_step}x(1+{c.passages_per_query - 1})", ">"),
    ("len q/p", lambda c: f"{c.query_length}/{c.passage_length}", ">"),
    ("tokens/step", lambda c: f"{c.tokens_per_step:,}", ">"),
    ("FLOPs/step", lambda c: f"{c.flops_per_step:.2e}", ">"),
    ("steps", lambda c: f"{c.steps:,}", ">"),
    ("total FLOPs", lambda c: f"{c.total_flops:.2e}", ">"),
]


def format_plan(cells: Sequence[PlanCell]) -> str:
    """An aligned text table of the plan, with the budget on the first line."""
    if not cells:
        return "(empty plan)"
    budgets = {c.budget_flops for c in cells}
    if budgets == {None}:
        head = f"budget: {cells[0].steps:,} steps per cell" if len({c.steps for c in cells}) == 1 else "budget: steps"
    else:
        head = "budget: " + ", ".join(f"{b:.2e} FLOPs" for b in sorted(b for b in budgets if b is not None))
        head += " per cell"
    if not all(c.exact for c in cells):
        head += " (texts padded to the batch's longest: FLOPs/step are upper bounds)"
    rows = [[render(c) for _, render, _ in _COLUMNS] for c in cells]
    widths = [max(len(title), *(len(r[i]) for r in rows)) for i, (title, _, _) in enumerate(_COLUMNS)]

    def line(values: Sequence[str]) -> str:
        parts = [f"{v:{align}{w}}" for v, w, (_, _, align) in zip(values, widths, _COLUMNS)]
        return "  ".join(parts).rstrip()

    out = [head, line([title for title, _, _ in _COLUMNS]), line(["-" * w for w in widths])]
    out.extend(line(r) for r in rows)
    for adapter in dict.fromkeys(c.assumed_adapter for c in cells if c.assumed_adapter):
        out.append(
            f"note: backbone.init_adapter {adapter} does not exist yet: its cells are planned with backbone.lora's "
            "rank and targets; produce it before training (`retriever train CONFIG --stage mntp`)"
        )
    return "\n".join(out)
