"""Losses checked against hand arithmetic and plain-python references (no torch in the references)."""

from __future__ import annotations

import math

import pytest
import torch

from retriever.distributed import all_gather_with_grad, gather_batch
from retriever.losses import (
    RANKING_LOSSES,
    FLOPSRegularizer,
    InfoNCE,
    KLDistill,
    LossOutput,
    MarginMSE,
    RetrievalBatch,
    SparseRegularized,
    WeightedSum,
    build_loss,
)

D = torch.float64


def t(x: object) -> torch.Tensor:
    return torch.tensor(x, dtype=D)


# ---- plain-python references -------------------------------------------------------------------------------------


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def ref_infonce(q: list[list[float]], p: list[list[list[float]]], scale: float) -> float:
    flat = [d for group in p for d in group]
    losses = []
    for i, qi in enumerate(q):
        logits = [scale * dot(qi, d) for d in flat]
        losses.append(logsumexp(logits) - logits[i * len(p[0])])
    return sum(losses) / len(q)


def ref_margin_mse(
    q: list[list[float]], p: list[list[list[float]]], teacher: list[list[float]], scale: float
) -> float:
    terms = []
    for qi, group, ti in zip(q, p, teacher, strict=True):
        s = [scale * dot(qi, d) for d in group]
        for k in range(1, len(group)):
            terms.append(((s[0] - s[k]) - (ti[0] - ti[k])) ** 2)
    return sum(terms) / len(terms)


def ref_kl(q: list[list[float]], p: list[list[list[float]]], teacher: list[list[float]], scale: float) -> float:
    total = 0.0
    for qi, group, ti in zip(q, p, teacher, strict=True):
        s = [scale * dot(qi, d) for d in group]
        log_ps = [x - logsumexp(s) for x in s]
        log_pt = [x - logsumexp(ti) for x in ti]
        total += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_pt, log_ps, strict=True))
    return total / len(q)


def ref_flops(rows: list[list[float]]) -> float:
    n = len(rows)
    return sum((sum(abs(r[j]) for r in rows) / n) ** 2 for j in range(len(rows[0])))


# Two queries, 1+2 candidates each, 3 dims (arbitrary values with mixed signs).
Q3 = [[0.3, -1.2, 0.5], [1.1, 0.4, -0.7]]
P3 = [
    [[0.9, -0.8, 0.1], [0.2, 0.5, -0.3], [-1.0, 0.0, 0.7]],
    [[1.3, 0.2, -0.4], [0.6, -0.9, 0.8], [-0.2, 1.4, 0.3]],
]
T3 = [[7.5, 2.0, -1.0], [3.0, 4.5, 0.5]]


def batch3(scale: float = 1.0, teacher: bool = True) -> RetrievalBatch:
    return RetrievalBatch(t(Q3), t(P3), t(T3) if teacher else None, scale)


# ---- InfoNCE ------------------------------------------------------------------------------------------------------


def test_infonce_by_hand() -> None:
    # q0=[1,0], q1=[0,1]; flattened passages p00=[1,0] (q0's positive), p01=[0,1], p10=[0,2] (q1's positive), p11=[1,1]
    batch = RetrievalBatch(t([[1, 0], [0, 1]]), t([[[1, 0], [0, 1]], [[0, 2], [1, 1]]]))
    # q0 logits [1, 0, 0, 1], target 0; q1 logits [0, 1, 2, 1], target 2
    loss0 = -1 + math.log(math.e + 1 + 1 + math.e)
    loss1 = -2 + math.log(1 + math.e + math.e**2 + math.e)
    out = InfoNCE()(batch, 0)
    assert out.total.item() == pytest.approx((loss0 + loss1) / 2, abs=1e-12)
    assert set(out.parts) == {"cl"} and out.weights == {"cl": 1.0}

    scaled = RetrievalBatch(batch.queries, batch.passages, score_scale=2.0)  # logits doubled
    loss0 = -2 + math.log(math.e**2 + 1 + 1 + math.e**2)
    loss1 = -4 + math.log(1 + math.e**2 + math.e**4 + math.e**2)
    assert InfoNCE()(scaled, 0).total.item() == pytest.approx((loss0 + loss1) / 2, abs=1e-12)


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_infonce_matches_reference_with_hard_negatives(scale: float) -> None:
    got = InfoNCE()(batch3(scale, teacher=False), 0).total.item()
    assert got == pytest.approx(ref_infonce(Q3, P3, scale), rel=1e-12, abs=1e-12)


# ---- MarginMSE ----------------------------------------------------------------------------------------------------


def test_margin_mse_by_hand() -> None:
    # q0=[1,0]: s+ = [1,0]·[2,0] = 2, s- = [1,0]·[1,0] = 1, teacher (3, 1): ((2-1) - (3-1))² = 1
    # q1=[0,1]: s+ = 1, s- = 3, teacher (0.5, 0): ((1-3) - (0.5-0))² = 6.25
    batch = RetrievalBatch(t([[1, 0], [0, 1]]), t([[[2, 0], [1, 0]], [[0, 1], [0, 3]]]), teacher=t([[3, 1], [0.5, 0]]))
    out = MarginMSE()(batch, 0)
    assert out.total.item() == pytest.approx((1 + 6.25) / 2, abs=1e-12)
    assert set(out.parts) == {"kd"}
    # scale 2: student margins 2 and -4: ((2) - 2)² = 0, (-4 - 0.5)² = 20.25
    scaled = RetrievalBatch(batch.queries, batch.passages, batch.teacher, 2.0)
    assert MarginMSE()(scaled, 0).total.item() == pytest.approx(20.25 / 2, abs=1e-12)


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_margin_mse_matches_reference_with_two_negatives(scale: float) -> None:
    got = MarginMSE()(batch3(scale), 0).total.item()
    assert got == pytest.approx(ref_margin_mse(Q3, P3, T3, scale), rel=1e-12)


# ---- KL -----------------------------------------------------------------------------------------------------------


def test_kl_by_hand() -> None:
    # q0: student scores (1, 0), teacher (0, 0) → p_t = (½, ½), p_s = (e/(e+1), 1/(e+1))
    # KL = ½·log(½ / p_s0) + ½·log(½ / p_s1); q1: student (2, 2) equals teacher up to a shift → KL = 0
    batch = RetrievalBatch(t([[1, 0], [0, 1]]), t([[[1, 0], [0, 0]], [[0, 2], [0, 2]]]), teacher=t([[0, 0], [5, 5]]))
    ps0, ps1 = math.e / (math.e + 1), 1 / (math.e + 1)
    kl0 = 0.5 * math.log(0.5 / ps0) + 0.5 * math.log(0.5 / ps1)
    out = KLDistill()(batch, 0)
    assert out.total.item() == pytest.approx(kl0 / 2, abs=1e-12)
    assert set(out.parts) == {"kd"}


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_kl_matches_reference_teacher_unscaled(scale: float) -> None:
    got = KLDistill()(batch3(scale), 0).total.item()
    assert got == pytest.approx(ref_kl(Q3, P3, T3, scale), rel=1e-12, abs=1e-12)


def test_kl_zero_when_student_equals_teacher() -> None:
    batch = RetrievalBatch(t([[1.0, 2.0]]), t([[[1.0, 0.0], [0.0, 1.0], [3.0, -1.0]]]), t([[1.0, 2.0, 1.0]]))
    assert KLDistill()(batch, 0).total.item() == pytest.approx(0.0, abs=1e-15)


# ---- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss", [MarginMSE(), KLDistill(), build_loss("cl+kd", "dense"), build_loss("kd", "sparse", ramp_steps=3)]
)
def test_distillation_without_teacher_is_a_clear_error(loss: object) -> None:
    with pytest.raises(ValueError, match=r"needs teacher scores but batch.teacher is None"):
        loss(batch3(teacher=False), 0)  # type: ignore[operator]


@pytest.mark.parametrize("loss", [MarginMSE(), KLDistill()])
def test_distillation_without_negatives_is_a_clear_error(loss: object) -> None:
    batch = RetrievalBatch(t([[1.0, 0.0]]), t([[[1.0, 0.0]]]), t([[1.0]]))
    with pytest.raises(ValueError, match="at least one negative"):
        loss(batch, 0)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("queries", "passages", "teacher", "match"),
    [
        ([[1.0, 0.0]], [[1.0, 0.0]], None, r"passages must be \[B, 1\+n, D\]"),
        ([1.0, 0.0], [[[1.0, 0.0]]], None, r"queries must be \[B, D\]"),
        ([[1.0, 0.0]], [[[1.0, 0.0, 0.0]]], None, "B and D must agree"),
        ([[1.0, 0.0], [0.0, 1.0]], [[[1.0, 0.0]]], None, "B and D must agree"),
        ([[1.0, 0.0]], [[[1.0, 0.0], [0.0, 1.0]]], [[1.0]], r"teacher must be \[B, 1\+n\] = \(1, 2\)"),
    ],
)
def test_shape_mismatch_is_a_clear_error(queries: object, passages: object, teacher: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RetrievalBatch(t(queries), t(passages), None if teacher is None else t(teacher))


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
def test_bad_score_scale(scale: float) -> None:
    with pytest.raises(ValueError, match="score_scale must be a positive finite number"):
        RetrievalBatch(t(Q3), t(P3), score_scale=scale)


# ---- FLOPS regularizer --------------------------------------------------------------------------------------------


def test_flops_exact_value() -> None:
    # column means of |w|: (1+3)/2 = 2, (2+0)/2 = 1, (0+4)/2 = 2 → 2² + 1² + 2² = 9
    assert FLOPSRegularizer.flops(t([[1, -2, 0], [3, 0, 4]])).item() == 9.0
    rows = [[0.3, 0.0, 1.7, 0.2], [0.0, 0.9, 0.4, 0.0], [2.2, 0.1, 0.0, 0.6]]
    assert FLOPSRegularizer.flops(t(rows)).item() == pytest.approx(ref_flops(rows), rel=1e-12)
    # leading dims are flattened: [B, 1+n, V] counts every passage once
    assert FLOPSRegularizer.flops(t([[[1, -2, 0]], [[3, 0, 4]]])).item() == 9.0


def test_flops_ramp_is_quadratic() -> None:
    reg = FLOPSRegularizer(0.05, ramp_steps=100)
    assert reg.weight_at(0) == 0.0
    assert reg.weight_at(50) == pytest.approx(0.05 / 4, rel=1e-15)
    assert reg.weight_at(100) == pytest.approx(0.05, rel=1e-15)
    assert reg.weight_at(200) == pytest.approx(0.05, rel=1e-15)
    assert reg.weight_at(10) == pytest.approx(0.05 * 0.01, rel=1e-12)
    assert FLOPSRegularizer(0.04, ramp_steps=0).weight_at(0) == 0.04
    with pytest.raises(ValueError, match="step must be ≥ 0"):
        reg.weight_at(-1)
    with pytest.raises(ValueError, match="ramp_steps must be ≥ 0"):
        FLOPSRegularizer(0.05, -1)
    with pytest.raises(ValueError, match="weight must be finite and ≥ 0"):
        FLOPSRegularizer(-0.1, 10)


# ---- composition --------------------------------------------------------------------------------------------------


def test_weighted_sum_parts_and_total() -> None:
    batch = batch3(100.0)
    out = WeightedSum([(0.5, InfoNCE()), (0.5, KLDistill())])(batch, 7)
    cl, kd = ref_infonce(Q3, P3, 100.0), ref_kl(Q3, P3, T3, 100.0)
    assert set(out.parts) == {"cl", "kd"}
    assert out.parts["cl"].item() == pytest.approx(cl, rel=1e-12)
    assert out.parts["kd"].item() == pytest.approx(kd, rel=1e-12)
    assert out.weights == {"cl": 0.5, "kd": 0.5}
    assert out.total.item() == pytest.approx(0.5 * cl + 0.5 * kd, rel=1e-12)

    uneven = WeightedSum([(0.25, InfoNCE()), (2.0, MarginMSE())])(batch, 0)
    assert uneven.total.item() == pytest.approx(0.25 * cl + 2.0 * ref_margin_mse(Q3, P3, T3, 100.0), rel=1e-12)
    assert uneven.weights == {"cl": 0.25, "kd": 2.0}


def test_weighted_sum_rejects_duplicate_part_names_and_bad_weights() -> None:
    with pytest.raises(ValueError, match="two components produce a part named 'kd'"):
        WeightedSum([(1.0, MarginMSE()), (1.0, KLDistill())])(batch3(), 0)
    with pytest.raises(ValueError, match="finite and ≥ 0"):
        WeightedSum([(-1.0, InfoNCE())])
    with pytest.raises(ValueError, match="at least one"):
        WeightedSum([])


def test_sparse_wrapper_parts_weights_and_total() -> None:
    ramp = 10
    loss = SparseRegularized(InfoNCE(), FLOPSRegularizer(0.05, ramp), FLOPSRegularizer(0.04, ramp))
    fq = ref_flops(Q3)
    fd = ref_flops([d for group in P3 for d in group])  # every passage of the batch
    cl = ref_infonce(Q3, P3, 1.0)
    for step, frac in [(0, 0.0), (5, 0.25), (10, 1.0), (20, 1.0)]:
        out = loss(batch3(), step)
        assert list(out.parts) == ["cl", "flops_q", "flops_d"]
        assert out.parts["flops_q"].item() == pytest.approx(fq, rel=1e-12)
        assert out.parts["flops_d"].item() == pytest.approx(fd, rel=1e-12)
        assert out.weights["flops_q"] == pytest.approx(0.05 * frac, abs=1e-15)
        assert out.weights["flops_d"] == pytest.approx(0.04 * frac, abs=1e-15)
        assert out.total.item() == pytest.approx(cl + 0.05 * frac * fq + 0.04 * frac * fd, rel=1e-12)


def test_sparse_margin_mse_uses_per_slot_passage_flops() -> None:
    # The paper's MarginMSE regularizes passages as the mean over candidate slots of FLOPS(that slot's passages).
    loss = build_loss("kd", "sparse", ramp_steps=0)
    out = loss(batch3(), 0)
    per_slot = [ref_flops([group[k] for group in P3]) for k in range(3)]
    assert out.parts["flops_d"].item() == pytest.approx(sum(per_slot) / 3, rel=1e-12)
    assert out.parts["flops_d"].item() != pytest.approx(ref_flops([d for g in P3 for d in g]), rel=1e-6)
    expected = ref_margin_mse(Q3, P3, T3, 1.0) + 0.05 * ref_flops(Q3) + 0.04 * sum(per_slot) / 3
    assert out.total.item() == pytest.approx(expected, rel=1e-12)
    # an explicit choice overrides the loss's convention
    forced = SparseRegularized(MarginMSE(), FLOPSRegularizer(0.05, 0), FLOPSRegularizer(0.04, 0), passage_flops="all")
    assert forced(batch3(), 0).parts["flops_d"].item() == pytest.approx(ref_flops([d for g in P3 for d in g]))


def test_loss_output_floats() -> None:
    out = LossOutput(total=t(1.5), parts={"cl": t(1.0), "kd": t(2.0)}, weights={"cl": 0.5, "kd": 0.5})
    floats = out.floats()
    assert floats == {"total": 1.5, "cl": 1.0, "kd": 2.0}
    assert all(type(v) is float for v in floats.values())


# ---- factory ------------------------------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert RANKING_LOSSES.get("cl") is InfoNCE
    assert RANKING_LOSSES.get("margin_mse") is MarginMSE
    assert RANKING_LOSSES.get("kl") is KLDistill


@pytest.mark.parametrize(
    ("name", "paradigm", "kd", "parts", "expected"),
    [
        ("cl", "dense", "margin_mse", ["cl"], lambda s: ref_infonce(Q3, P3, s)),
        ("kd", "dense", "margin_mse", ["kd"], lambda s: ref_margin_mse(Q3, P3, T3, s)),
        ("kd", "dense", "kl", ["kd"], lambda s: ref_kl(Q3, P3, T3, s)),
        ("cl+kd", "dense", "margin_mse", ["cl", "kd"], lambda s: (ref_infonce(Q3, P3, s) + ref_kl(Q3, P3, T3, s)) / 2),
        ("cl", "sparse", "margin_mse", ["cl", "flops_q", "flops_d"], None),
        ("kd", "sparse", "kl", ["kd", "flops_q", "flops_d"], None),
        ("cl+kd", "sparse", "kl", ["cl", "kd", "flops_q", "flops_d"], None),
    ],
)
def test_build_loss(name: str, paradigm: str, kd: str, parts: list[str], expected: object) -> None:
    scale = 100.0 if paradigm == "dense" else 1.0
    loss = build_loss(name, paradigm, kd=kd, ramp_steps=9)
    out = loss(batch3(scale), 3)
    assert list(out.parts) == parts
    if expected is not None:
        assert out.total.item() == pytest.approx(expected(scale), rel=1e-12)  # type: ignore[operator]
    else:
        # ramp at step 3 of 9: (1/3)² of the configured weights
        assert out.weights["flops_q"] == pytest.approx(0.05 / 9) and out.weights["flops_d"] == pytest.approx(0.04 / 9)
        manual = sum(out.weights[k] * out.parts[k].item() for k in parts)
        assert out.total.item() == pytest.approx(manual, rel=1e-12)


def test_build_loss_weights_and_errors() -> None:
    out = build_loss("cl+kd", "dense", cl_weight=1.0, kd_weight=3.0)(batch3(), 0)
    assert out.total.item() == pytest.approx(ref_infonce(Q3, P3, 1.0) + 3.0 * ref_kl(Q3, P3, T3, 1.0), rel=1e-12)
    with pytest.raises(KeyError, match=r"unknown loss 'ce'; known: cl, cl\+kd, kd"):
        build_loss("ce", "dense")
    with pytest.raises(KeyError, match="unknown paradigm 'hybrid'; known: dense, sparse"):
        build_loss("cl", "hybrid")
    with pytest.raises(ValueError, match="unknown distillation loss kd='cl'; known: margin_mse, kl"):
        build_loss("kd", "dense", kd="cl")
    with pytest.raises(ValueError, match="sparse losses need ramp_steps"):
        build_loss("cl", "sparse")


def test_gradients_flow_to_representations() -> None:
    q = t(Q3).requires_grad_()
    p = t(P3).requires_grad_()
    out = build_loss("cl+kd", "sparse", ramp_steps=0)(RetrievalBatch(q, p, t(T3)), 1)
    out.total.backward()
    assert q.grad is not None and p.grad is not None
    assert q.grad.abs().sum() > 0 and p.grad.abs().sum() > 0


# ---- distributed helpers without a process group ------------------------------------------------------------------


def test_gather_is_identity_without_process_group() -> None:
    x = t([[1.0, 2.0]])
    assert all_gather_with_grad(x) is x
    batch = batch3()
    assert gather_batch(batch) is batch
    with pytest.raises(ValueError, match="leading batch dimension"):
        all_gather_with_grad(t(1.0))
