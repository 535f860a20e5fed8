"""Scaling plots: PNGs drawn with matplotlib's Agg canvas (no pyplot state), one per metric column and x axis (log
scale), one marker style per paradigm and one colour per loss, the fitted curve drawn through each line with its
exponent b in the legend."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retriever.report.fits import ScalingFit
from retriever.report.formatting import dataset_label, format_count, format_flops, metric_label

_LOSS_COLOURS = {"cl": "C0", "kd": "C1", "cl+kd": "C2"}
_PARADIGM_STYLES = {"sparse": ("o", "-"), "dense": ("s", "--")}


def slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", text.replace("@", "_at_")).strip("_")


def _label_log_axis(ax: Any, xs: Sequence[float], fmt: Any) -> None:
    """Ticks at the cells' x values (those closer than ×1.15 to the previous tick are skipped) with compact labels:
    sweeps span less than a decade, where matplotlib's default log ticks are unlabelled or overlap."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks: list[float] = []
    for x in sorted(set(xs)):
        if not ticks or x / ticks[-1] >= 1.15:
            ticks.append(x)
    if not ticks:
        return
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt(x)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(min(xs) / 1.2, max(xs) * 1.2)


def plot_scaling(
    fits: Sequence[ScalingFit],
    path: str | Path,
    title: str = "",
    percent: bool = True,
    figsize: tuple[float, float] = (5.0, 3.5),
    dpi: int = 100,
) -> Path:
    """One PNG of a metric against one x axis (log scale): the cells of each paradigm × loss line as markers and
    the fitted curve through them, labelled with its exponent. ``fits`` must share dataset, metric and x axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not fits:
        raise ValueError("plot_scaling needs at least one fit (one line)")
    keys = {(f.dataset, f.metric, f.x_axis, f.target) for f in fits}
    if len(keys) != 1:
        raise ValueError(f"plot_scaling draws one metric against one axis; got {sorted(keys)}")
    dataset, metric, x_axis, target = keys.pop()
    scale = 100.0 if percent else 1.0
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    handles = _draw_lines(ax, fits, scale)
    ax.set_xscale("log")
    _label_log_axis(
        ax, [p[1] for f in fits for p in f.points], format_count if x_axis == "parameters" else format_flops
    )
    ax.set_xlabel("parameters" if x_axis == "parameters" else "training FLOPs")
    ax.set_ylabel(metric_label(metric) + (" ×100" if percent else ""))
    ax.set_title(title or f"{dataset_label(dataset)} {metric_label(metric)}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if handles:
        form = "1 − metric = a·x^b" if target == "error" else "metric = a·x^b"
        ax.legend(handles=handles, fontsize=7, title=f"fit: {form}", title_fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _draw_lines(ax: Any, fits: Sequence[ScalingFit], scale: float) -> list[Any]:
    """Each line's cells as markers and its fitted curve; returns the legend handles."""
    from matplotlib.lines import Line2D

    handles, extra = [], 0
    for fit in fits:
        if not fit.points:
            continue
        if fit.loss in _LOSS_COLOURS:
            colour = _LOSS_COLOURS[fit.loss]
        else:
            colour, extra = f"C{3 + extra}", extra + 1
        marker, linestyle = _PARADIGM_STYLES.get(fit.paradigm, ("^", ":"))
        xs = np.array([p[1] for p in fit.points])
        ax.plot(xs, np.array([p[2] for p in fit.points]) * scale, marker=marker, linestyle="none", color=colour)
        label = f"{fit.paradigm} {fit.loss.upper()}"
        if fit.law is not None:
            grid = np.geomspace(xs.min(), xs.max(), 64)
            ax.plot(grid, fit.predict(grid) * scale, linestyle=linestyle, color=colour, linewidth=1.2)
            label += f": b={fit.law.b:+.3f}"
        else:
            linestyle = "none"
        handles.append(Line2D([], [], color=colour, marker=marker, linestyle=linestyle, label=label))
    return handles
