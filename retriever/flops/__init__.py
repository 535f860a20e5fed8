"""Training FLOPs: analytic counts per step (`counter`, checked against FlopCounterMode) and the budget planner."""

from retriever.flops.counter import (
    FlopBreakdown,
    StepCostModel,
    bow_flops,
    lora_setup,
    mntp_flops,
    passages_per_query,
    step_flops,
)
from retriever.flops.planner import (
    BudgetTooSmall,
    PlanCell,
    format_plan,
    plan_cell,
    plan_from_json,
    plan_grid,
    plan_to_json,
    planned_steps,
    stage_flops,
)
from retriever.flops.shapes import COMPONENTS, BatchShape, ModelShape

__all__ = [
    "COMPONENTS",
    "BatchShape",
    "BudgetTooSmall",
    "FlopBreakdown",
    "ModelShape",
    "PlanCell",
    "StepCostModel",
    "bow_flops",
    "format_plan",
    "lora_setup",
    "mntp_flops",
    "passages_per_query",
    "plan_cell",
    "plan_from_json",
    "plan_grid",
    "plan_to_json",
    "planned_steps",
    "stage_flops",
    "step_flops",
]
