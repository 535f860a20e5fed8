"""The statistics of the findings: percentile bootstrap intervals over test queries (paired: one set of resamples
shared by every cell of a judgement) and two-sided paired t-tests."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from retriever.report.per_query import CellValues


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "ci_low": self.low, "ci_high": self.high}

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def interval(estimate: float, resampled: np.ndarray, confidence: float) -> Interval:
    finite = resampled[np.isfinite(resampled)]
    if finite.size == 0:
        return Interval(estimate, math.nan, math.nan)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high))


def paired_t_test(diff: np.ndarray) -> float:
    """Two-sided p-value of a paired t-test on differences (1 when all are 0, 0 when all equal another value)."""
    from scipy import stats

    if np.all(diff == diff[0]):
        return 1.0 if diff[0] == 0 else 0.0
    return float(stats.ttest_1samp(diff, 0.0).pvalue)


class Bootstrap:
    """Bootstrap weights shared by every statistic of one judgement (paired resampling, one seed)."""

    def __init__(self, num_queries: int, n_boot: int, seed: int, confidence: float, alpha: float) -> None:
        rng = np.random.default_rng(seed)
        # counts of each query in each resample: a resampled mean is weights @ values / n
        self.weights = rng.multinomial(num_queries, np.full(num_queries, 1.0 / num_queries), size=n_boot).astype(float)
        self.n = num_queries
        self.confidence = confidence
        self.alpha = alpha

    def means(self, values: np.ndarray) -> np.ndarray:
        return self.weights @ values / self.n

    def mean_interval(self, values: np.ndarray) -> Interval:
        return interval(float(values.mean()), self.means(values), self.confidence)

    def paired(self, a: CellValues, b: CellValues) -> tuple[dict[str, Any], Interval]:
        """A paired comparison of two cells: mean difference a - b with its interval, t-test p, the better one."""
        assert a.values is not None and b.values is not None
        diff = a.values - b.values
        ci = interval(float(diff.mean()), self.means(diff), self.confidence)
        p_value = paired_t_test(diff)
        significant = p_value < self.alpha
        test = {
            "a": a.label,
            "b": b.label,
            "mean_a": float(a.values.mean()),
            "mean_b": float(b.values.mean()),
            "difference": ci.to_dict(),
            "p_value": p_value,
            "significant": significant,
            "better": ("a" if ci.estimate > 0 else "b") if significant else None,
        }
        return test, ci
