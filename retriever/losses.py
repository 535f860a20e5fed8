"""Training losses for dense and sparse retrievers: InfoNCE, MarginMSE, listwise KL, FLOPS regularization.

All losses take a `RetrievalBatch` of representations (dense: hidden size; sparse: vocabulary size; scoring is a
dot product either way) and return a `LossOutput` with named parts, so they compose (`WeightedSum`,
`SparseRegularized`) and log uniformly. In distributed training, call `retriever.distributed.gather_batch` first so
the loss covers the global batch (and sum parameter gradients across ranks; see that module).

Formulas (the paper's official code; s = dot(q, d) · score_scale, t = teacher score):
- InfoNCE ("cl"): −mean_q log softmax_{d ∈ all B·(1+n) passages}(s(q, d))[d_q⁺]
- MarginMSE ("kd"): mean_{q, k} ((s(q,d⁺) − s(q,d_k⁻)) − (t(q,d⁺) − t(q,d_k⁻)))²
- KL ("kd"): KL(softmax(t(q,·)) ‖ softmax(s(q,·))) over the query's own 1+n candidates, averaged over queries
- FLOPS(W) = Σ_j (mean_i |w_ij|)², weight λ·min(1, (step/T)²)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from retriever.registry import Registry

PassageFlops = Literal["all", "per_slot"]


def _at_least_fp32(x: Tensor) -> Tensor:
    """Loss math runs in fp32 (or fp64 when given fp64) even when representations are bf16/fp16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass(frozen=True)
class RetrievalBatch:
    """Representations for one training step.

    queries: [B, D]; passages: [B, 1+n, D] (the query's positive at index 0, then its n hard negatives);
    teacher: [B, 1+n] teacher scores aligned with `passages`, or None; score_scale: multiplies dot products to
    give training logits (dense: 1/T = 100, sparse: 1.0).
    """

    queries: Tensor
    passages: Tensor
    teacher: Tensor | None = None
    score_scale: float = 1.0

    def __post_init__(self) -> None:
        q, p, t = self.queries, self.passages, self.teacher
        if q.dim() != 2:
            raise ValueError(f"RetrievalBatch.queries must be [B, D], got shape {tuple(q.shape)}")
        if p.dim() != 3:
            raise ValueError(
                f"RetrievalBatch.passages must be [B, 1+n, D] (positive first, then n negatives per query), "
                f"got shape {tuple(p.shape)}"
            )
        if p.shape[0] != q.shape[0] or p.shape[2] != q.shape[1]:
            raise ValueError(
                f"RetrievalBatch shape mismatch: queries {tuple(q.shape)} [B, D] vs passages {tuple(p.shape)} "
                "[B, 1+n, D]; B and D must agree"
            )
        if p.shape[1] < 1:
            raise ValueError("RetrievalBatch.passages needs at least the positive passage per query (1+n ≥ 1)")
        if t is not None and tuple(t.shape) != tuple(p.shape[:2]):
            raise ValueError(
                f"RetrievalBatch.teacher must be [B, 1+n] = {tuple(p.shape[:2])} aligned with passages, "
                f"got shape {tuple(t.shape)}"
            )
        if not (math.isfinite(self.score_scale) and self.score_scale > 0):
            raise ValueError(f"RetrievalBatch.score_scale must be a positive finite number, got {self.score_scale}")

    @property
    def group_size(self) -> int:
        """Candidates per query, 1+n."""
        return self.passages.shape[1]

    def own_scores(self) -> Tensor:
        """[B, 1+n] scaled (≥ fp32) scores of each query against its own candidates."""
        dots = torch.einsum("bd,bkd->bk", self.queries, self.passages)
        return _at_least_fp32(dots) * self.score_scale

    def all_scores(self) -> Tensor:
        """[B, B·(1+n)] scaled (≥ fp32) scores of each query against every passage of the batch (row-major order)."""
        flat = self.passages.reshape(-1, self.passages.shape[-1])
        return _at_least_fp32(self.queries @ flat.T) * self.score_scale

    def require_teacher(self, who: str) -> Tensor:
        if self.teacher is None:
            raise ValueError(
                f"{who} needs teacher scores but batch.teacher is None; train on data with teacher scores "
                "(e.g. a mined/teacher-scored source) or use the 'cl' loss"
            )
        return _at_least_fp32(self.teacher)


@dataclass
class LossOutput:
    """A loss value with its named parts; `total == Σ weights[k] · parts[k]`."""

    total: Tensor
    parts: dict[str, Tensor]
    weights: dict[str, float] = field(default_factory=dict)

    def floats(self) -> dict[str, float]:
        """Detached python floats for logging: "total" and every part (one device sync)."""
        names = ["total", *self.parts]
        values = torch.stack([self.total.detach(), *(v.detach() for v in self.parts.values())]).double().cpu()
        return dict(zip(names, values.tolist()))


class Loss(ABC):
    """A training objective: `loss(batch, step) -> LossOutput`."""

    # How the sparse regularizer treats passages for this loss: "all" = FLOPS over every passage of the batch,
    # "per_slot" = mean over candidate slots of FLOPS(passages[:, k]) (the paper's MarginMSE: ½(FLOPS(D⁺)+FLOPS(D⁻))).
    passage_flops: ClassVar[PassageFlops] = "all"

    @abstractmethod
    def __call__(self, batch: RetrievalBatch, step: int) -> LossOutput: ...


class RankingLoss(Loss):
    """A loss with a single part named `part`."""

    default_part: ClassVar[str]
    needs_teacher: ClassVar[bool] = False

    def __init__(self, part: str | None = None) -> None:
        self.part = part or self.default_part

    @abstractmethod
    def value(self, batch: RetrievalBatch) -> Tensor: ...

    def __call__(self, batch: RetrievalBatch, step: int) -> LossOutput:
        v = self.value(batch)
        return LossOutput(total=v, parts={self.part: v}, weights={self.part: 1.0})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(part={self.part!r})"


RANKING_LOSSES: Registry[type[RankingLoss]] = Registry("ranking loss")


@RANKING_LOSSES.register("cl")
class InfoNCE(RankingLoss):
    """Cross-entropy of each query over all B·(1+n) passages of the batch (in-batch + everyone's negatives)."""

    default_part = "cl"

    def value(self, batch: RetrievalBatch) -> Tensor:
        logits = batch.all_scores()
        target = torch.arange(logits.shape[0], device=logits.device) * batch.group_size
        return F.cross_entropy(logits, target)


@RANKING_LOSSES.register("margin_mse")
class MarginMSE(RankingLoss):
    """Mean over queries and negatives of ((s⁺ − s⁻) − (t⁺ − t⁻))²; with one negative it is the paper's MarginMSE."""

    default_part = "kd"
    needs_teacher = True
    passage_flops = "per_slot"

    def value(self, batch: RetrievalBatch) -> Tensor:
        teacher = batch.require_teacher("MarginMSE")
        if batch.group_size < 2:
            raise ValueError("MarginMSE needs at least one negative per query (passages [B, 1+n, D] with n ≥ 1)")
        s = batch.own_scores()
        student_margin = s[:, :1] - s[:, 1:]
        teacher_margin = teacher[:, :1] - teacher[:, 1:]
        return F.mse_loss(student_margin, teacher_margin)


@RANKING_LOSSES.register("kl")
class KLDistill(RankingLoss):
    """KL(softmax(teacher) ‖ softmax(student)) over each query's own 1+n candidates, averaged over queries.

    Teacher scores are used raw (no temperature); student logits are the scaled scores.
    """

    default_part = "kd"
    needs_teacher = True

    def value(self, batch: RetrievalBatch) -> Tensor:
        teacher = batch.require_teacher("KLDistill")
        if batch.group_size < 2:
            raise ValueError("KLDistill needs at least one negative per query (passages [B, 1+n, D] with n ≥ 1)")
        student_log_p = F.log_softmax(batch.own_scores(), dim=-1)
        teacher_log_p = F.log_softmax(teacher, dim=-1)
        return F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True)


def _merge(parts: dict[str, Tensor], weights: dict[str, float], out: LossOutput, scale: float, where: str) -> None:
    for name, value in out.parts.items():
        if name in parts:
            raise ValueError(f"{where}: two components produce a part named {name!r}; give them distinct part names")
        parts[name] = value
        weights[name] = scale * out.weights.get(name, 1.0)


class WeightedSum(Loss):
    """Σ w·loss over components; parts keep each component's names (weights recorded in `LossOutput.weights`)."""

    def __init__(self, components: Sequence[tuple[float, Loss]]) -> None:
        if not components:
            raise ValueError("WeightedSum needs at least one (weight, loss) component")
        for w, _ in components:
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"WeightedSum weights must be finite and ≥ 0, got {w}")
        self.components = list(components)

    def __call__(self, batch: RetrievalBatch, step: int) -> LossOutput:
        parts: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        total: Tensor | None = None
        for w, loss in self.components:
            out = loss(batch, step)
            _merge(parts, weights, out, w, "WeightedSum")
            total = w * out.total if total is None else total + w * out.total
        assert total is not None
        return LossOutput(total=total, parts=parts, weights=weights)

    def __repr__(self) -> str:
        return f"WeightedSum({self.components!r})"


class FLOPSRegularizer:
    """FLOPS(W) = Σ_j (mean_i |w_ij|)² with weight λ·min(1, (step/T)²), T = `ramp_steps` (0: no ramp)."""

    def __init__(self, weight: float, ramp_steps: int) -> None:
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"FLOPS regularizer weight must be finite and ≥ 0, got {weight}")
        if ramp_steps < 0:
            raise ValueError(f"FLOPS regularizer ramp_steps must be ≥ 0, got {ramp_steps}")
        self.weight = weight
        self.ramp_steps = ramp_steps

    def weight_at(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be ≥ 0, got {step}")
        if self.ramp_steps == 0:
            return self.weight
        return self.weight * min(1.0, (step / self.ramp_steps) ** 2)

    @staticmethod
    def flops(reps: Tensor) -> Tensor:
        """FLOPS of a [N, V] matrix (leading dims are flattened into N), accumulated in ≥ fp32."""
        dtype = torch.promote_types(reps.dtype, torch.float32)
        mean_abs = reps.reshape(-1, reps.shape[-1]).abs().mean(dim=0, dtype=dtype)
        return (mean_abs * mean_abs).sum()

    def __repr__(self) -> str:
        return f"FLOPSRegularizer(weight={self.weight}, ramp_steps={self.ramp_steps})"


class SparseRegularized(Loss):
    """A ranking loss plus FLOPS regularization of queries ("flops_q") and passages ("flops_d").

    Parts hold the unweighted FLOPS values; their ramped weights are in `LossOutput.weights`. `passage_flops`
    ("all" or "per_slot") defaults to the wrapped loss's convention (see `Loss.passage_flops`).
    """

    def __init__(
        self,
        loss: Loss,
        query_reg: FLOPSRegularizer,
        passage_reg: FLOPSRegularizer,
        *,
        passage_flops: PassageFlops | None = None,
    ) -> None:
        self.loss = loss
        self.query_reg = query_reg
        self.passage_reg = passage_reg
        self.passage_mode: PassageFlops = passage_flops or loss.passage_flops
        if self.passage_mode not in ("all", "per_slot"):
            raise ValueError(f"passage_flops must be 'all' or 'per_slot', got {self.passage_mode!r}")

    def passage_flops_value(self, passages: Tensor) -> Tensor:
        if self.passage_mode == "all":
            return FLOPSRegularizer.flops(passages)
        per_slot = [FLOPSRegularizer.flops(passages[:, k]) for k in range(passages.shape[1])]
        return torch.stack(per_slot).mean()

    def __call__(self, batch: RetrievalBatch, step: int) -> LossOutput:
        out = self.loss(batch, step)
        fq = FLOPSRegularizer.flops(batch.queries)
        fd = self.passage_flops_value(batch.passages)
        wq, wd = self.query_reg.weight_at(step), self.passage_reg.weight_at(step)
        parts: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        _merge(parts, weights, out, 1.0, "SparseRegularized")
        _merge(parts, weights, LossOutput(fq, {"flops_q": fq}, {"flops_q": wq}), 1.0, "SparseRegularized")
        _merge(parts, weights, LossOutput(fd, {"flops_d": fd}, {"flops_d": wd}), 1.0, "SparseRegularized")
        return LossOutput(total=out.total + wq * fq + wd * fd, parts=parts, weights=weights)

    def __repr__(self) -> str:
        return (
            f"SparseRegularized({self.loss!r}, q={self.query_reg!r}, d={self.passage_reg!r}, "
            f"passage_flops={self.passage_mode!r})"
        )


@dataclass(frozen=True)
class LossSettings:
    """Keyword settings of `build_loss`, passed to the recipe and paradigm registries."""

    kd: str
    cl_weight: float
    kd_weight: float
    flops_query: float
    flops_passage: float
    ramp_steps: int | None

    def __post_init__(self) -> None:
        if self.kd not in RANKING_LOSSES or not RANKING_LOSSES.get(self.kd).needs_teacher:
            known = [n for n, cls in RANKING_LOSSES.items() if cls.needs_teacher]
            raise ValueError(f"unknown distillation loss kd={self.kd!r}; known: {', '.join(known)}")


# Objective name → builder of the ranking loss.
LOSSES: Registry[Callable[[LossSettings], Loss]] = Registry("loss")
LOSSES.add("cl", lambda s: InfoNCE())
LOSSES.add("kd", lambda s: RANKING_LOSSES.get(s.kd)(part="kd"))
# CL+KD is the paper's ½·InfoNCE + ½·KL over each query's own candidates (always listwise KL).
LOSSES.add("cl+kd", lambda s: WeightedSum([(s.cl_weight, InfoNCE()), (s.kd_weight, KLDistill(part="kd"))]))


def _sparse(loss: Loss, s: LossSettings) -> Loss:
    if s.ramp_steps is None:
        raise ValueError("sparse losses need ramp_steps (the FLOPS weight ramp length, planned max_steps / 3)")
    query_reg = FLOPSRegularizer(s.flops_query, s.ramp_steps)
    passage_reg = FLOPSRegularizer(s.flops_passage, s.ramp_steps)
    return SparseRegularized(loss, query_reg, passage_reg)


# Paradigm → what it adds to the ranking loss.
PARADIGM_LOSSES: Registry[Callable[[Loss, LossSettings], Loss]] = Registry("paradigm")
PARADIGM_LOSSES.add("dense", lambda loss, s: loss)
PARADIGM_LOSSES.add("sparse", _sparse)


def build_loss(
    name: str,
    paradigm: str,
    *,
    kd: str = "margin_mse",
    cl_weight: float = 0.5,
    kd_weight: float = 0.5,
    flops_query: float = 0.05,
    flops_passage: float = 0.04,
    ramp_steps: int | None = None,
) -> Loss:
    """The training loss for objective `name` ("cl" | "kd" | "cl+kd") and `paradigm` ("dense" | "sparse").

    `kd` picks the distillation loss of the "kd" objective ("margin_mse", the paper's, or "kl"); "cl+kd" is
    cl_weight·InfoNCE + kd_weight·KL. Sparse losses add FLOPS regularization with weights `flops_query` /
    `flops_passage`, ramped quadratically over `ramp_steps` (required for sparse). Dense temperature is not a loss
    setting: it is the batch's `score_scale`.
    """
    settings = LossSettings(kd, cl_weight, kd_weight, flops_query, flops_passage, ramp_steps)
    ranking = LOSSES.get(name)(settings)
    return PARADIGM_LOSSES.get(paradigm)(ranking, settings)
