"""Power-law fits of the scaling report.

`fit_power_law` fits y = a·x^b by ordinary least squares on (ln x, ln y): ln y = ln a + b·ln x; r2 is the
coefficient of determination of that log-log regression. Only points with finite x > 0 and y > 0 are used and at
least two distinct x are needed, otherwise there is no fit (None). The scaling fits (`scaling_fits`) use the
*error* form by default: 1 − metric = a·x^b, so b < 0 when the metric improves with scale. Retrieval metrics are
bounded by 1, and a power law in the metric itself would cross 1; the error form is the usual scaling-law shape (a
quantity that falls as a power of compute or size) and stays below 1 for any x. ``target="metric"`` fits
metric = a·x^b instead. A fit is made per (dataset, metric) column, per paradigm × loss line, against
``parameters`` and against ``flops``; lines whose x spans less than ``min_span`` (×2 by default) are not fitted:
cells of one sweep share a FLOP budget, and a power law through nearly equal x is meaningless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from retriever.report.formatting import LOSSES, PARADIGMS, order_key, split_metric_column
from retriever.report.tables import metric_columns

FitTarget = Literal["error", "metric"]
XAxis = Literal["parameters", "flops"]
X_AXES: tuple[XAxis, ...] = ("parameters", "flops")


@dataclass(frozen=True)
class PowerLaw:
    """y = a·x^b, fitted in log-log space; ``r2`` is that regression's R², ``n_points`` the points used."""

    a: float
    b: float
    r2: float
    n_points: int = 0

    def __call__(self, x: float | Sequence[float] | np.ndarray) -> np.ndarray:
        return self.a * np.power(np.asarray(x, dtype=float), self.b)

    def to_dict(self) -> dict[str, float | int]:
        return {"a": self.a, "b": self.b, "r2": self.r2, "n_points": self.n_points}


def fit_power_law(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> PowerLaw | None:
    """Least-squares fit of ln y = ln a + b·ln x over the points with finite x > 0 and y > 0.

    None when fewer than two such points remain or all their x are equal (the slope is undefined). R² is computed
    on ln y; when all ln y are equal the fit (b = 0) is exact and R² is 1.
    """
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.ndim != 1 or xs.shape != ys.shape:
        raise ValueError(f"x and y must be 1-D sequences of the same length, got shapes {xs.shape} and {ys.shape}")
    keep = np.isfinite(xs) & np.isfinite(ys) & (xs > 0) & (ys > 0)
    lx, ly = np.log(xs[keep]), np.log(ys[keep])
    if lx.size < 2 or np.all(lx == lx[0]):
        return None
    design = np.column_stack([lx, np.ones_like(lx)])
    (slope, intercept), *_ = np.linalg.lstsq(design, ly, rcond=None)
    residual = float(np.sum((ly - (slope * lx + intercept)) ** 2))
    total = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 if total == 0.0 else 1.0 - residual / total
    return PowerLaw(a=float(np.exp(intercept)), b=float(slope), r2=r2, n_points=int(lx.size))


@dataclass(frozen=True)
class ScalingFit:
    """The power law of one (dataset, metric) column for one paradigm × loss line against one x axis.

    ``points`` are (backbone, x, metric) of the cells used; ``law`` is None when no fit was made (``reason``).
    """

    dataset: str
    metric: str
    paradigm: str
    loss: str
    x_axis: XAxis
    target: FitTarget
    points: tuple[tuple[str, float, float], ...]
    law: PowerLaw | None
    reason: str | None = None

    def predict(self, x: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """The fitted metric at x (1 − a·x^b for the error form)."""
        if self.law is None:
            raise ValueError(f"no fit for {self.dataset} {self.metric} {self.paradigm}/{self.loss}: {self.reason}")
        y = self.law(x)
        return 1.0 - y if self.target == "error" else y

    def to_dict(self) -> dict[str, Any]:
        law = self.law.to_dict() if self.law else {"a": None, "b": None, "r2": None, "n_points": 0}
        return {
            "dataset": self.dataset,
            "metric": self.metric,
            "paradigm": self.paradigm,
            "loss": self.loss,
            "x": self.x_axis,
            "target": self.target,
            **law,
            "reason": self.reason,
            "points": [{"backbone": b, "x": x, "metric": m} for b, x, m in self.points],
        }


def fit_target(metric: np.ndarray, target: FitTarget) -> np.ndarray:
    if target == "error":
        return 1.0 - metric
    if target == "metric":
        return metric
    raise ValueError(f"unknown fit target {target!r}; expected 'error' (1 - metric) or 'metric'")


def scaling_fits(
    df: pd.DataFrame,
    target: FitTarget = "error",
    min_span: float = 2.0,
    x_axes: Sequence[XAxis] = X_AXES,
    columns: Sequence[str] | None = None,
) -> list[ScalingFit]:
    """Power-law fits of every metric column (or ``columns``) per paradigm × loss line and x axis.

    Only cells with status ok, a finite metric and x > 0 are used. A line is not fitted when fewer than two cells
    are usable, or when its x values span less than a factor ``min_span`` (cells of one sweep share a FLOP budget).
    """
    fit_target(np.zeros(1), target)  # validate early
    if min_span < 1.0:
        raise ValueError(f"min_span is a ratio max(x)/min(x) and must be >= 1, got {min_span}")
    for axis in x_axes:
        if axis not in X_AXES:
            raise ValueError(f"unknown x axis {axis!r}; expected one of {', '.join(X_AXES)}")
    columns = metric_columns(df) if columns is None else list(columns)
    ok = df[df["status"] == "ok"]
    lines = sorted(
        {(p, lo) for _, p, lo in df.index}, key=lambda pl: (order_key(pl[0], PARADIGMS), order_key(pl[1], LOSSES))
    )
    fits = []
    for column in columns:
        dataset, metric = split_metric_column(column)
        for axis in x_axes:
            for paradigm, loss in lines:
                sel = ok[
                    (ok.index.get_level_values("paradigm") == paradigm) & (ok.index.get_level_values("loss") == loss)
                ]
                xs = sel[axis].astype(float).to_numpy()
                ms = sel[column].to_numpy(dtype=float)
                use = np.isfinite(xs) & (xs > 0) & np.isfinite(ms)
                backbones = sel.index.get_level_values("backbone")[use]
                points = tuple((str(b), float(x), float(m)) for b, x, m in zip(backbones, xs[use], ms[use]))
                law, reason = None, None
                if len(points) < 2:
                    reason = f"needs at least 2 finished cells with {axis} > 0 and a {metric} value, has {len(points)}"
                elif xs[use].max() / xs[use].min() < min_span:
                    reason = f"{axis} spans x{xs[use].max() / xs[use].min():.3g} only (< x{min_span:g})"
                else:
                    law = fit_power_law(xs[use], fit_target(ms[use], target))
                    if law is None:
                        reason = f"fewer than 2 points with {'1 - metric' if target == 'error' else 'metric'} > 0"
                fits.append(ScalingFit(dataset, metric, paradigm, loss, axis, target, points, law, reason))
    return fits
