"""The paper's three findings (arXiv 2502.15526), judged from a sweep's cells with per-query statistics.

Every finding gets a verdict, ``reproduced``, ``not reproduced`` or ``inconclusive``, the numbers behind it and the
rule that turned the numbers into the verdict (`RULES`). All statistics use one metric on one dataset (the report's
primary metric: the first evaluation dataset's protocol's first metric, nDCG@10 on the synthetic benchmark) and the
per-query values of each cell's TREC run against the dataset's judged queries
(`retriever.report.per_query.per_query_values`).

* **Intervals** are 95% percentile bootstrap intervals over test queries: ``n_boot`` resamples of the queries (with
  replacement, seeded, the same resamples for every cell, so differences stay paired); each resample recomputes
  every cell's mean and everything derived from the means.
* **Paired tests** are two-sided paired t-tests over the queries (ranx's "student" test, exact and deterministic);
  a difference is significant when p < ``alpha`` (0.05).
* **Finding 1** fits ``1 - metric = a * parameters^b`` per paradigm × loss line (`retriever.report.fits.
  fit_power_law`, least squares in log-log space, as the report's scaling fits): b < 0 means the metric improves
  with size.

``inconclusive`` always says why (too few scales, a missing or failed cell, intervals that decide nothing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from retriever.report.fits import fit_power_law
from retriever.report.formatting import LOSSES, order_key
from retriever.report.per_query import CellValues, load_cell_values
from retriever.report.statistics import Bootstrap, Interval, interval
from retriever.tracking import safe_metric_name

if TYPE_CHECKING:
    from retriever.config import ExperimentConfig


Verdict = Literal["reproduced", "not reproduced", "inconclusive"]


REPRODUCED: Verdict = "reproduced"


NOT_REPRODUCED: Verdict = "not reproduced"


INCONCLUSIVE: Verdict = "inconclusive"


SCALING, SPARSE_VS_DENSE, BEST_CELL = "1_scaling", "2_sparse_vs_dense", "3_best_cell"


CLAIMS = {
    SCALING: "Retrieval quality grows with model size under contrastive loss (CL) and stays flat under "
    "distillation (KD).",
    SPARSE_VS_DENSE: "Sparse retrievers beat dense ones at the same size, loss and FLOP budget.",
    BEST_CELL: "Sparse CL+KD at the largest size is the best cell.",
}


RULES = {
    SCALING: "Per paradigm, fit 1 - metric = a * N^b (N = parameters) to the CL and the KD line; b < 0 improves "
    "with size. Reproduced when CL's 95% interval of b lies below 0 and KD improves less: its interval contains 0 "
    "with b_KD > b_CL, or the interval of b_KD - b_CL lies above 0. Not reproduced when CL's interval lies above 0 "
    "or the interval of b_KD - b_CL lies below 0 (KD scales clearly better). Otherwise, or with fewer than 2 scales "
    "in a line, inconclusive. Over paradigms: not reproduced if any paradigm is, reproduced if all are, else "
    "inconclusive.",
    SPARSE_VS_DENSE: "For every (backbone, loss) with a finished sparse and dense cell, a two-sided paired t-test on "
    "the per-query metric (sparse - dense). Reproduced when sparse is significantly better (p < alpha) in a "
    "majority of the pairs and dense significantly better in none; not reproduced when dense is significantly "
    "better in a majority; otherwise (or without any pair) inconclusive.",
    BEST_CELL: "The sparse CL+KD cell of the largest backbone against the best cell by mean metric: reproduced when "
    "it is the best or its paired difference to the best is not significant (two-sided paired t-test, p >= alpha); "
    "not reproduced when the best is significantly better; inconclusive when that cell is missing or failed.",
}


@dataclass
class Finding:
    id: str
    claim: str
    verdict: Verdict
    reason: str
    rule: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "claim": self.claim,
            "verdict": self.verdict,
            "reason": self.reason,
            "rule": self.rule,
            "details": self.details,
        }


@dataclass
class Findings:
    dataset: str
    metric: str
    num_queries: int
    settings: dict[str, Any]
    findings: list[Finding]

    def __getitem__(self, finding_id: str) -> Finding:
        for finding in self.findings:
            if finding.id == finding_id:
                return finding
        raise KeyError(f"no finding {finding_id!r}; known: {', '.join(f.id for f in self.findings)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "paper": "arXiv 2502.15526",
            "dataset": self.dataset,
            "metric": self.metric,
            "num_queries": self.num_queries,
            "settings": self.settings,
            "findings": [f.to_dict() for f in self.findings],
        }

    def mlflow(self) -> dict[str, dict[str, Any]]:
        """``{"tags": {"findings/<id>": verdict}, "metrics": {...}}``: the verdicts as tags, the exponents, their
        intervals, the paired differences and p-values as metrics (NaNs left out)."""
        tags = {f"findings/{f.id}": f.verdict for f in self.findings}
        metrics: dict[str, float] = {}
        for line in self[SCALING].details.get("lines", []):
            if line["exponent"] is not None:
                key = f"findings/{SCALING}/{line['paradigm']}/{line['loss']}/exponent"
                metrics.update({f"{key}{suffix}": line["exponent"][k] for suffix, k in _CI_SUFFIXES})
        for pair in self[SPARSE_VS_DENSE].details.get("pairs", []):
            key = f"findings/{SPARSE_VS_DENSE}/{pair['backbone']}/{pair['loss']}"
            metrics.update({f"{key}/difference{s}": pair["test"]["difference"][k] for s, k in _CI_SUFFIXES})
            metrics[f"{key}/p_value"] = pair["test"]["p_value"]
        best = self[BEST_CELL].details
        if best.get("to_best"):
            key = f"findings/{BEST_CELL}/difference_to_best"
            metrics.update({f"{key}{s}": best["to_best"]["difference"][k] for s, k in _CI_SUFFIXES})
            metrics[f"findings/{BEST_CELL}/p_value"] = best["to_best"]["p_value"]
        metrics = {safe_metric_name(k): float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        return {"tags": tags, "metrics": metrics}


_CI_SUFFIXES = (("", "estimate"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))


def _scales(cells: Sequence[CellValues]) -> list[float]:
    return sorted({c.parameters for c in cells if c.parameters is not None and c.parameters > 0})


@dataclass
class _Line:
    """A fitted paradigm × loss line: its report entry, exponent interval and resampled exponents."""

    entry: dict[str, Any]
    exponent: Interval | None = None
    slopes: np.ndarray | None = None


def _fit_line(cells: list[CellValues], stats: Bootstrap) -> _Line:
    """The exponent of 1 - metric = a * N^b through a line's cells, with its bootstrap interval."""
    x = np.asarray([c.parameters for c in cells], dtype=float)
    means = np.asarray([c.values.mean() for c in cells])  # type: ignore[union-attr]
    scales = len(_scales(cells))
    entry: dict[str, Any] = {
        "cells": [
            {"backbone": c.backbone, "parameters": c.parameters, "mean": float(m)} for c, m in zip(cells, means)
        ],
        "scales": scales,
        "exponent": None,
        "r2": None,
    }
    law = fit_power_law(x, 1.0 - means) if scales >= 2 else None
    if law is None:
        entry["reason"] = f"{scales} scale(s)" if scales < 2 else "1 - metric is 0 at all but one scale"
        return _Line(entry)
    resampled = np.stack([stats.means(c.values) for c in cells])  # type: ignore[arg-type]
    slopes = np.full(resampled.shape[1], math.nan)
    for i in range(resampled.shape[1]):
        fit = fit_power_law(x, 1.0 - resampled[:, i])
        if fit is not None:
            slopes[i] = fit.b
    exponent = interval(law.b, slopes, stats.confidence)
    entry["exponent"], entry["r2"] = exponent.to_dict(), law.r2
    return _Line(entry, exponent, slopes)


def _judge_paradigm(paradigm: str, lines: dict[str, _Line], stats: Bootstrap) -> dict[str, Any]:
    cl, kd = lines.get("cl"), lines.get("kd")
    out: dict[str, Any] = {"paradigm": paradigm, "kd_minus_cl": None}
    if cl is None or cl.exponent is None or cl.slopes is None:
        why = "no CL cells" if cl is None else f"the CL line cannot be fitted ({cl.entry['reason']})"
        return out | {"verdict": INCONCLUSIVE, "reason": why}
    b_cl = cl.exponent
    if b_cl.low > 0:
        return out | {"verdict": NOT_REPRODUCED, "reason": f"CL gets worse with size (b = {_ci(b_cl)})"}
    if kd is None or kd.exponent is None or kd.slopes is None:
        why = "no KD cells" if kd is None else f"the KD line cannot be fitted ({kd.entry['reason']})"
        return out | {"verdict": INCONCLUSIVE, "reason": why}
    b_kd = kd.exponent
    diff = interval(b_kd.estimate - b_cl.estimate, kd.slopes - cl.slopes, stats.confidence)
    out["kd_minus_cl"] = diff.to_dict()
    if diff.high < 0:
        why = f"KD scales clearly better than CL (b_KD - b_CL = {_ci(diff)})"
        return out | {"verdict": NOT_REPRODUCED, "reason": why}
    if b_cl.high >= 0:
        return out | {"verdict": INCONCLUSIVE, "reason": f"CL's exponent is not clearly below 0 (b = {_ci(b_cl)})"}
    if b_kd.contains(0.0) and b_kd.estimate > b_cl.estimate:
        why = f"CL improves with size (b = {_ci(b_cl)}), KD is flat (b = {_ci(b_kd)})"
        return out | {"verdict": REPRODUCED, "reason": why}
    if diff.low > 0:
        why = f"CL improves with size (b = {_ci(b_cl)}), KD clearly less (b_KD - b_CL = {_ci(diff)})"
        return out | {"verdict": REPRODUCED, "reason": why}
    why = f"CL improves (b = {_ci(b_cl)}) but KD is not clearly flatter (b = {_ci(b_kd)}, b_KD - b_CL = {_ci(diff)})"
    return out | {"verdict": INCONCLUSIVE, "reason": why}


def _ci(interval: Interval) -> str:
    return f"{interval.estimate:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}]"


def judge_scaling(cells: Sequence[CellValues], stats: Bootstrap) -> Finding:
    usable = [c for c in cells if c.usable and c.parameters is not None and c.parameters > 0]
    usable.sort(key=lambda c: (c.parameters, c.backbone))
    paradigms = sorted({c.paradigm for c in usable})
    lines_out, per_paradigm = [], []
    for paradigm in paradigms:
        lines = {}
        losses = {c.loss for c in usable if c.paradigm == paradigm}
        for loss in sorted(losses, key=lambda loss: order_key(loss, LOSSES)):
            line = _fit_line([c for c in usable if (c.paradigm, c.loss) == (paradigm, loss)], stats)
            lines[loss] = line
            lines_out.append({"paradigm": paradigm, "loss": loss, **line.entry})
        per_paradigm.append(_judge_paradigm(paradigm, lines, stats))
    verdicts = [p["verdict"] for p in per_paradigm]
    scales = len(_scales(usable))
    if scales < 2:
        verdict, reason = INCONCLUSIVE, f"the finished cells cover {scales} model size(s); a trend needs at least 2"
    elif NOT_REPRODUCED in verdicts:
        verdict = NOT_REPRODUCED
        reason = "; ".join(f"{p['paradigm']}: {p['reason']}" for p in per_paradigm if p["verdict"] == NOT_REPRODUCED)
    elif verdicts and all(v == REPRODUCED for v in verdicts):
        verdict, reason = REPRODUCED, "; ".join(f"{p['paradigm']}: {p['reason']}" for p in per_paradigm)
    else:
        verdict = INCONCLUSIVE
        reason = "; ".join(f"{p['paradigm']}: {p['reason']}" for p in per_paradigm) or "no finished cells"
    details = {"scales": scales, "lines": lines_out, "paradigms": per_paradigm}
    return Finding(SCALING, CLAIMS[SCALING], verdict, reason, RULES[SCALING], details)


def judge_sparse_vs_dense(cells: Sequence[CellValues], stats: Bootstrap) -> Finding:
    by_key = {(c.backbone, c.paradigm, c.loss): c for c in cells if c.usable}
    size = {c.backbone: math.inf if c.parameters is None else c.parameters for c in cells}
    pairs = []
    for backbone, paradigm, loss in sorted(by_key, key=lambda k: (size[k[0]], k[0], order_key(k[2], LOSSES))):
        if paradigm == "sparse" and (backbone, "dense", loss) in by_key:
            sparse, dense = by_key[(backbone, "sparse", loss)], by_key[(backbone, "dense", loss)]
            pairs.append({"backbone": backbone, "loss": loss, "test": stats.paired(sparse, dense)[0]})
    sparse_wins = sum(p["test"]["better"] == "a" for p in pairs)
    dense_wins = sum(p["test"]["better"] == "b" for p in pairs)
    n = len(pairs)
    counts = f"sparse significantly better in {sparse_wins} of {n} pair(s), dense in {dense_wins}"
    if n == 0:
        verdict, reason = INCONCLUSIVE, "no (backbone, loss) has both a finished sparse and a finished dense cell"
    elif sparse_wins > n / 2 and dense_wins == 0:
        verdict, reason = REPRODUCED, counts
    elif dense_wins > n / 2:
        verdict, reason = NOT_REPRODUCED, counts
    else:
        verdict, reason = INCONCLUSIVE, counts
    details = {"pairs": pairs, "sparse_wins": sparse_wins, "dense_wins": dense_wins}
    return Finding(SPARSE_VS_DENSE, CLAIMS[SPARSE_VS_DENSE], verdict, reason, RULES[SPARSE_VS_DENSE], details)


def judge_best_cell(cells: Sequence[CellValues], stats: Bootstrap) -> Finding:
    def finding(verdict: Verdict, reason: str, **details: Any) -> Finding:
        return Finding(BEST_CELL, CLAIMS[BEST_CELL], verdict, reason, RULES[BEST_CELL], details)

    sized = [c for c in cells if c.parameters is not None]
    if not sized:
        return finding(INCONCLUSIVE, "no cell has a parameter count, so the largest size is unknown")
    largest = max(c.parameters for c in sized)  # type: ignore[type-var]
    backbones = sorted({c.backbone for c in sized if c.parameters == largest})
    targets = [c for c in cells if c.backbone in backbones and (c.paradigm, c.loss) == ("sparse", "cl+kd")]
    target = next((c for c in targets if c.usable), None)
    base = {"largest": {"backbones": backbones, "parameters": largest}}
    if target is None:
        why = f"{' / '.join(backbones)} sparse CL+KD " + (
            f"has no usable result ({targets[0].note or targets[0].status})" if targets else "is not in the sweep"
        )
        return finding(INCONCLUSIVE, why, **base)
    usable = [c for c in cells if c.usable]
    mean = {c.label: float(c.values.mean()) for c in usable}  # type: ignore[union-attr]
    best = max(usable, key=lambda c: mean[c.label])
    if mean[best.label] <= mean[target.label]:
        best = target  # a tie for the best mean counts as the best
    assert target.values is not None
    cell_mean = stats.mean_interval(target.values)
    details = base | {
        "cell": target.label,
        "cell_mean": cell_mean.to_dict(),
        "rank": 1 + sum(m > mean[target.label] for m in mean.values()),
        "cells": len(usable),
        "best": best.label,
        "best_mean": mean[best.label],
        "cell_interval_covers_best": cell_mean.contains(mean[best.label]),
        "to_best": None,
    }
    if best is target:
        return finding(REPRODUCED, f"{target.label} is the best of {len(usable)} finished cells", **details)
    test, diff = stats.paired(best, target)
    details["to_best"] = test
    if test["significant"]:
        why = f"{best.label} is significantly better (best - cell {_ci(diff)}, p = {test['p_value']:.3g})"
        return finding(NOT_REPRODUCED, why, **details)
    why = f"tied with the best cell, {best.label} (best - cell {_ci(diff)}, p = {test['p_value']:.3g})"
    return finding(REPRODUCED, why, **details)


def judge_findings(
    cells: Sequence[CellValues],
    *,
    dataset: str,
    metric: str,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> Findings:
    """Judge the three findings from cells whose ``values`` share one query order (see the module docstring)."""
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100 for a 95% interval, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    lengths = {c.values.shape for c in cells if c.values is not None}
    if len(lengths) > 1:
        raise ValueError(f"cells' per-query values must share one query list; got shapes {sorted(lengths)}")
    for c in cells:
        if c.values is not None and (c.values.ndim != 1 or c.values.size == 0 or not np.isfinite(c.values).all()):
            raise ValueError(f"{c.label}: per-query values must be a non-empty 1-D array of finite numbers")
    seen: set[tuple[str, str, str]] = set()
    for c in cells:
        if (c.backbone, c.paradigm, c.loss) in seen:
            raise ValueError(f"{c.label} appears twice; one cell per backbone × paradigm × loss")
        seen.add((c.backbone, c.paradigm, c.loss))
    num_queries = lengths.pop()[0] if lengths else 0
    stats = Bootstrap(max(num_queries, 1), n_boot, seed, 1.0 - alpha, alpha)
    settings = {
        "alpha": alpha,
        "confidence": 1.0 - alpha,
        "bootstrap_resamples": n_boot,
        "seed": seed,
        "interval": "percentile bootstrap over test queries (paired: the same resamples for every cell)",
        "test": "two-sided paired t-test over test queries",
        "fit": "1 - metric = a * parameters^b, least squares in log-log space",
    }
    findings = [judge_scaling(cells, stats), judge_sparse_vs_dense(cells, stats), judge_best_cell(cells, stats)]
    return Findings(dataset, metric, num_queries, settings, findings)


def unjudged(dataset: str, metric: str, reason: str) -> Findings:
    """Findings that could not be judged: all three inconclusive with ``reason``."""
    findings = [Finding(key, CLAIMS[key], INCONCLUSIVE, reason, RULES[key]) for key in CLAIMS]
    return Findings(dataset, metric, 0, {"error": reason}, findings)


def judge_sweep(
    root: str | Path,
    records: Sequence[Mapping[str, Any]],
    cfg: ExperimentConfig,
    dataset: str,
    metric: str,
    **options: Any,
) -> Findings:
    """The findings of a sweep directory: qrels of ``dataset`` (resolved as the cells' evaluation resolved it),
    per-query values of every cell's run, then `judge_findings`."""
    from retriever.data.catalog import resolve_dataset
    from retriever.data.sources import load_source

    qrels = load_source(resolve_dataset(dataset, cfg)).qrels()
    _, cells = load_cell_values(root, records, dataset, metric, qrels)
    return judge_findings(cells, dataset=dataset, metric=metric, **options)
