"""Scaling report: power-law fits, the results table, its Markdown rendering, plots and the written report.

Expected numbers are computed by hand or by an independent reference (scipy.stats.linregress on the logs).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from retriever.records import RecordError
from retriever.report.fits import PowerLaw, fit_power_law, scaling_fits
from retriever.report.formatting import (
    BEIR_MEAN,
    format_count,
    format_flops,
    format_metric,
    metric_column,
    metric_label,
    split_metric_column,
)
from retriever.report.markdown import to_markdown
from retriever.report.plots import plot_scaling
from retriever.report.scaling import ReportPaths, write_report
from retriever.report.tables import baseline_comparison, baseline_table, bm25_reference, metric_columns, results_table
from retriever.report.validation import NUMBER_COLUMNS

DEV = "msmarco-passage/dev/small"
DL19 = "msmarco-passage/trec-dl-2019/judged"
NFC = "beir/nfcorpus/test"
SCIFACT = "beir/scifact/test"
LOCAL = "local/toy"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(backbone: str, paradigm: str, loss: str, parameters: int | None, metrics: dict | None, **extra) -> dict:
    record = {
        "backbone": backbone,
        "paradigm": paradigm,
        "loss": loss,
        "parameters": parameters,
        "trainable_parameters": None if parameters is None else parameters // 10,
        "flops": 6.2e19,
        "steps": 1200,
        "status": "ok" if metrics is not None else "failed",
        "metrics": metrics,
    }
    record.update(extra)
    return record


def _full(dev: float, ndcg: float, mrr_l2: float, nfc: float, scifact: float, toy: float) -> dict:
    return {
        DEV: {"mrr@10": dev},
        DL19: {"mrr@10-l2": mrr_l2, "ndcg@10": ndcg},  # out of protocol order on purpose
        SCIFACT: {"ndcg@10": scifact},
        NFC: {"ndcg@10": nfc},
        LOCAL: {"recall@100": toy, "mrr@10": toy / 2},
    }


@pytest.fixture
def records() -> list[dict]:
    """A hand-made 2 backbones × 2 paradigms × 2 losses grid, shuffled, with one failed cell and one cell that
    misses a BEIR set."""
    no_scifact = _full(0.30, 0.60, 0.70, 0.33, 0.0, 0.5)
    del no_scifact[SCIFACT]
    return [
        _record("tiny-l", "sparse", "kd", 8000, _full(0.36, 0.66, 0.75, 0.34, 0.70, 0.6)),
        _record("tiny-s", "sparse", "cl", 1000, _full(0.3125, 0.625, 0.8125, 0.25, 0.5, 0.25)),
        _record("tiny-l", "dense", "cl", 8000, None, flops=1.5e18, steps=40),  # failed part-way
        _record("tiny-s", "dense", "kd", 1000, no_scifact),
        _record("tiny-l", "sparse", "cl", 8000, _full(0.40, 0.70, 0.85, 0.35, 0.75, 0.7)),
        _record("tiny-s", "dense", "cl", 1000, _full(0.20, 0.50, 0.60, 0.30, 0.60, 0.4)),
        _record("tiny-s", "sparse", "kd", 1000, _full(0.29, 0.61, 0.71, 0.31, 0.61, 0.3)),
        _record("tiny-l", "dense", "kd", 8000, _full(0.31, 0.62, 0.72, 0.32, 0.62, 0.2)),
    ]


# ----------------------------------------------------------------------------------------------------- power laws


@pytest.mark.parametrize(("a", "b"), [(2.5, -0.37), (0.004, 0.5), (7.0, 1.0)])
def test_fit_recovers_exact_power_law(a: float, b: float) -> None:
    x = np.array([1e3, 3.3e4, 2.0e6, 1.24e9, 8.03e9])
    law = fit_power_law(x, a * x**b)
    assert law is not None
    assert law.a == pytest.approx(a, rel=1e-9, abs=0)
    assert law.b == pytest.approx(b, rel=0, abs=1e-9)
    assert law.r2 == pytest.approx(1.0, abs=1e-12)
    assert law.n_points == 5
    np.testing.assert_allclose(law([10.0, 1e5]), a * np.array([10.0, 1e5]) ** b, rtol=1e-9)


def test_fit_matches_linregress_on_noisy_data() -> None:
    x = np.array([1.0, 2.0, 4.0, 9.0, 20.0, 55.0])
    y = np.array([3.0, 2.2, 1.9, 1.2, 1.1, 0.6])
    law = fit_power_law(list(x), list(y))
    ref = stats.linregress(np.log(x), np.log(y))
    assert law is not None
    assert law.b == pytest.approx(ref.slope, rel=1e-12)
    assert law.a == pytest.approx(math.exp(ref.intercept), rel=1e-12)
    assert law.r2 == pytest.approx(ref.rvalue**2, rel=1e-12)
    assert 0.8 < law.r2 < 1.0


def test_fit_uses_only_positive_finite_points() -> None:
    # (0, 1), (-1, 2), (2, 0), (3, -1), (nan, 1), (4, inf) are dropped; (1, 5) and (10, 0.5) define the law.
    x = [0.0, -1.0, 2.0, 3.0, float("nan"), 4.0, 1.0, 10.0]
    y = [1.0, 2.0, 0.0, -1.0, 1.0, float("inf"), 5.0, 0.5]
    law = fit_power_law(x, y)
    assert law is not None and law.n_points == 2
    assert law.a == pytest.approx(5.0, rel=1e-12)
    assert law.b == pytest.approx(-1.0, abs=1e-12)
    assert law.r2 == 1.0


@pytest.mark.parametrize(
    ("x", "y"),
    [
        ([], []),
        ([5.0], [2.0]),
        ([3.0, 3.0, 3.0], [1.0, 2.0, 4.0]),  # one x value: the slope is undefined
        ([1.0, 2.0, 0.0], [0.5, 0.0, 0.5]),  # one usable point after dropping y <= 0 and x <= 0
        ([1.0, 2.0], [-1.0, -2.0]),
    ],
)
def test_fit_is_none_for_degenerate_input(x: list[float], y: list[float]) -> None:
    assert fit_power_law(x, y) is None


def test_fit_of_constant_y_is_flat_and_exact() -> None:
    law = fit_power_law([1.0, 10.0, 100.0], [0.3, 0.3, 0.3])
    assert law is not None
    assert law.b == pytest.approx(0.0, abs=1e-12)
    assert law.a == pytest.approx(0.3, rel=1e-12)
    assert law.r2 == 1.0


def test_fit_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same length"):
        fit_power_law([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        fit_power_law([[1.0, 2.0]], [[1.0, 2.0]])


# ----------------------------------------------------------------------------------------------------- table


def test_results_table_order_columns_and_values(records: list[dict]) -> None:
    df = results_table(records)
    # parameters, then paradigm (dense, sparse), then loss (cl, kd, cl+kd)
    assert list(df.index) == [
        ("tiny-s", "dense", "cl"),
        ("tiny-s", "dense", "kd"),
        ("tiny-s", "sparse", "cl"),
        ("tiny-s", "sparse", "kd"),
        ("tiny-l", "dense", "cl"),
        ("tiny-l", "dense", "kd"),
        ("tiny-l", "sparse", "cl"),
        ("tiny-l", "sparse", "kd"),
    ]
    assert list(df.index.names) == ["backbone", "paradigm", "loss"]
    # MS MARCO dev, DL19 (protocol order), other datasets (alphabetical metrics), BEIR sets, BEIR mean
    assert list(df.columns) == [
        "status",
        "parameters",
        "trainable_parameters",
        "flops",
        "steps",
        f"{DEV}:mrr@10",
        f"{DL19}:ndcg@10",
        f"{DL19}:mrr@10-l2",
        f"{LOCAL}:mrr@10",
        f"{LOCAL}:recall@100",
        f"{NFC}:ndcg@10",
        f"{SCIFACT}:ndcg@10",
        f"{BEIR_MEAN}:ndcg@10",
    ]
    assert df.shape == (8, 13)

    row = df.loc[("tiny-s", "sparse", "cl")]
    assert row["status"] == "ok"
    assert row["parameters"] == 1000 and row["trainable_parameters"] == 100 and row["steps"] == 1200
    assert row["flops"] == 6.2e19
    assert row[f"{DEV}:mrr@10"] == 0.3125
    assert row[f"{DL19}:mrr@10-l2"] == 0.8125
    assert row[f"{LOCAL}:mrr@10"] == 0.125
    assert row[f"{BEIR_MEAN}:ndcg@10"] == 0.375  # (0.25 + 0.5) / 2
    assert df.loc[("tiny-l", "sparse", "kd"), f"{BEIR_MEAN}:ndcg@10"] == pytest.approx(0.52)  # (0.34 + 0.70) / 2

    # a cell without one of the BEIR sets has no mean (not a mean over a different subset)
    assert math.isnan(df.loc[("tiny-s", "dense", "kd"), f"{BEIR_MEAN}:ndcg@10"])
    assert df.loc[("tiny-s", "dense", "kd"), f"{NFC}:ndcg@10"] == 0.33

    failed = df.loc[("tiny-l", "dense", "cl")]
    assert failed["status"] == "failed"
    assert failed["parameters"] == 8000 and failed["steps"] == 40 and failed["flops"] == 1.5e18
    assert failed.iloc[5:].isna().all()
    assert str(df["parameters"].dtype) == "Int64" and df[f"{DEV}:mrr@10"].dtype == np.float64


def test_results_table_sorts_by_parameters_before_names() -> None:
    metrics = {DEV: {"mrr@10": 0.1}}
    df = results_table(
        [
            _record("a-big", "sparse", "cl", 50, metrics),
            _record("z-small", "sparse", "cl+kd", 10, metrics),
            _record("z-small", "sparse", "kd", 10, metrics),
            _record("failed-no-size", "dense", "cl", None, None),
        ]
    )
    assert list(df.index) == [
        ("z-small", "sparse", "kd"),
        ("z-small", "sparse", "cl+kd"),
        ("a-big", "sparse", "cl"),
        ("failed-no-size", "dense", "cl"),
    ]
    assert df["parameters"].isna().tolist() == [False, False, False, True]


def test_no_beir_mean_with_a_single_beir_set() -> None:
    df = results_table([_record("m", "dense", "cl", 10, {NFC: {"ndcg@10": 0.3}, DEV: {"mrr@10": 0.2}})])
    assert list(df.columns[5:]) == [f"{DEV}:mrr@10", f"{NFC}:ndcg@10"]


def test_beir_mean_only_over_metrics_every_set_reports() -> None:
    metrics = {NFC: {"ndcg@10": 0.2, "recall@100": 0.4}, SCIFACT: {"ndcg@10": 0.6}}
    df = results_table([_record("m", "sparse", "cl", 10, metrics)])
    assert [c for c in df.columns if c.startswith(BEIR_MEAN)] == [f"{BEIR_MEAN}:ndcg@10"]
    assert df[f"{BEIR_MEAN}:ndcg@10"].iloc[0] == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"paradigm": "hybrid"}, "unknown paradigm 'hybrid'"),
        ({"loss": "mse"}, "unknown loss 'mse'"),
        ({"status": "running"}, "unknown status 'running'"),
        ({"backbone": ""}, "'backbone' must be a non-empty string"),
        ({"metrics": {DEV: {"mrr@10": 41.7}}}, r"in \[0, 1\] \(not percentages\)"),
        ({"metrics": {DEV: 0.4}}, "must map metric name -> score"),
        ({"metrics": {}}, "needs 'metrics'"),
        ({"parameters": None}, "needs 'parameters'"),
        ({"parameters": 10.5}, "whole number"),
        ({"flops": -1.0}, "finite number >= 0"),
        ({"steps": "many"}, "must be a number"),
    ],
)
def test_bad_records_fail_clearly(change: dict, message: str) -> None:
    good = _record("m", "sparse", "cl", 10, {DEV: {"mrr@10": 0.4}})
    bad = {**good, **change}
    with pytest.raises(RecordError, match=message) as err:
        results_table([good | {"backbone": "other"}, bad])
    assert "record 1" in str(err.value)


def test_duplicate_and_empty_records_fail() -> None:
    record = _record("m", "sparse", "cl", 10, {DEV: {"mrr@10": 0.4}})
    with pytest.raises(RecordError, match=r"record 1 .* duplicates record 0"):
        results_table([record, dict(record)])
    with pytest.raises(RecordError, match="no result records"):
        results_table([])
    with pytest.raises(RecordError, match="expected a dict"):
        results_table([["m", "sparse"]])


def test_metric_columns_round_trip() -> None:
    column = metric_column(DL19, "mrr@10-l2")
    assert column == f"{DL19}:mrr@10-l2"
    assert split_metric_column(column) == (DL19, "mrr@10-l2")
    with pytest.raises(ValueError, match="not a metric column"):
        split_metric_column("parameters")


# ----------------------------------------------------------------------------------------------------- formatting


def test_number_formats() -> None:
    assert format_flops(6.2e19) == "6.2e19"
    assert format_flops(7.94e19) == "7.9e19"
    assert format_flops(123456.0) == "1.2e5"
    assert format_flops(3.0e-2) == "3.0e-2"
    assert format_flops(float("nan")) == "–"
    assert format_count(1_235_814_400) == "1.24B"
    assert format_count(8_030_261_248) == "8.03B"
    assert format_count(999_600_000) == "1B"  # 999.6M rounds up into the next unit
    assert format_count(260_000) == "260K"
    assert format_count(512) == "512"
    assert format_metric(0.417) == "41.7"
    assert format_metric(0.41749, percent=False, decimals=4) == "0.4175"
    assert format_metric(None) == "–"
    assert metric_label("ndcg@10") == "nDCG@10"
    assert metric_label("mrr@10-l2") == "MRR@10 (rel≥2)"
    assert metric_label("recall@1000") == "R@1000"
    assert metric_label("bpref") == "bpref"


def test_markdown_table(records: list[dict]) -> None:
    lines = to_markdown(results_table(records)).splitlines()
    assert lines[0] == (
        "| Backbone | Paradigm | Loss | Params | FLOPs | Steps | MS MARCO dev MRR@10 | DL19 nDCG@10 "
        "| DL19 MRR@10 (rel≥2) | local/toy MRR@10 | local/toy R@100 | nfcorpus nDCG@10 | scifact nDCG@10 "
        "| BEIR mean (2) nDCG@10 |"
    )
    assert lines[1] == "|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    assert len(lines) == 2 + 8
    # ×100 with one decimal; the best value of each column (among finished cells) in bold
    assert lines[4] == (
        "| tiny-s | sparse | CL | 1K | 6.2e19 | 1,200 | 31.2 | 62.5 | 81.2 | 12.5 | 25.0 | 25.0 | 50.0 | 37.5 |"
    )
    assert lines[3] == (
        "| tiny-s | dense | KD | 1K | 6.2e19 | 1,200 | 30.0 | 60.0 | 70.0 | 25.0 | 50.0 | 33.0 | – | – |"
    )
    assert lines[8] == (
        "| tiny-l | sparse | CL | 8K | 6.2e19 | 1,200 | **40.0** | **70.0** | **85.0** | **35.0** | **70.0** "
        "| **35.0** | **75.0** | **55.0** |"
    )
    assert lines[6] == "| tiny-l | dense | CL | 8K | 1.5e18 | 40 |" + " failed |" * 8


def test_markdown_raw_scores_and_ties() -> None:
    metrics = {DEV: {"mrr@10": 0.41749}}
    df = results_table([_record("a", "sparse", "cl", 10, metrics), _record("b", "dense", "kd", 10, metrics)])
    lines = to_markdown(df, percent=False, decimals=4).splitlines()
    # equal parameters: grouped by backbone name, then paradigm and loss
    assert lines[2] == "| a | sparse | CL | 10 | 6.2e19 | 1,200 | **0.4175** |"
    assert lines[3] == "| b | dense | KD | 10 | 6.2e19 | 1,200 | **0.4175** |"
    assert "**" not in to_markdown(df, bold_best=False)


def test_markdown_all_failed_shows_status() -> None:
    df = results_table([_record("a", "sparse", "cl", 10, None)])
    lines = to_markdown(df).splitlines()
    assert lines[0].endswith("| Steps | Status |")
    assert lines[2] == "| a | sparse | CL | 10 | 6.2e19 | 1,200 | failed |"


# ----------------------------------------------------------------------------------------------------- scaling fits

SIZES = {"s": 1.0e3, "m": 3.0e3, "l": 8.0e3}
LAWS = {  # (paradigm, loss) -> (a, b) of 1 - metric = a * parameters**b
    ("sparse", "cl"): (0.9, -0.05),
    ("sparse", "kd"): (0.8, -0.01),
    ("dense", "cl"): (1.2, -0.08),
}


def _law_records(failed: tuple[str, str, str] | None = None) -> list[dict]:
    out = []
    for (paradigm, loss), (a, b) in LAWS.items():
        for name, n in SIZES.items():
            metrics = {DEV: {"mrr@10": 1.0 - a * n**b}}
            if failed == (name, paradigm, loss):
                metrics = None
            out.append(_record(name, paradigm, loss, int(n), metrics, flops=6.2e19 * (1 + n / 1e5)))
    return out


def test_scaling_fits_recover_error_power_laws() -> None:
    fits = scaling_fits(results_table(_law_records()))
    by_key = {(f.paradigm, f.loss, f.x_axis): f for f in fits}
    assert len(fits) == 1 * 2 * 3  # one column × two axes × three lines
    for (paradigm, loss), (a, b) in LAWS.items():
        fit = by_key[(paradigm, loss, "parameters")]
        assert fit.law is not None and fit.reason is None and fit.target == "error"
        assert fit.law.a == pytest.approx(a, rel=1e-9)
        assert fit.law.b == pytest.approx(b, abs=1e-9)
        assert fit.law.r2 == pytest.approx(1.0, abs=1e-9)
        assert [p[0] for p in fit.points] == ["s", "m", "l"]
        assert fit.predict(5e3)[()] == pytest.approx(1.0 - a * 5e3**b, rel=1e-9)
        # FLOPs of one sweep span x1.07 here: no fit, and the reason says so
        flops_fit = by_key[(paradigm, loss, "flops")]
        assert flops_fit.law is None and "spans x1.07" in flops_fit.reason
        with pytest.raises(ValueError, match="no fit"):
            flops_fit.predict(1e19)
    # lines are ordered dense before sparse, cl before kd
    assert [(f.paradigm, f.loss) for f in fits if f.x_axis == "parameters"] == [
        ("dense", "cl"),
        ("sparse", "cl"),
        ("sparse", "kd"),
    ]


def test_scaling_fits_metric_target_and_min_span() -> None:
    df = results_table(_law_records())
    fits = scaling_fits(df, target="metric", min_span=1.0, x_axes=["flops"])
    assert {f.x_axis for f in fits} == {"flops"} and all(f.law is not None for f in fits)
    fit = next(f for f in fits if (f.paradigm, f.loss) == ("dense", "cl"))
    xs = [6.2e19 * (1 + n / 1e5) for n in SIZES.values()]
    ys = [1.0 - 1.2 * n**-0.08 for n in SIZES.values()]
    ref = stats.linregress(np.log(xs), np.log(ys))
    assert fit.law.b == pytest.approx(ref.slope, rel=1e-9)
    assert fit.predict(xs[0])[()] == pytest.approx(math.exp(ref.intercept) * xs[0] ** ref.slope, rel=1e-9)
    with pytest.raises(ValueError, match="unknown fit target"):
        scaling_fits(df, target="loss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_span"):
        scaling_fits(df, min_span=0.5)
    with pytest.raises(ValueError, match="unknown x axis"):
        scaling_fits(df, x_axes=["steps"])  # type: ignore[list-item]


def test_scaling_fits_skip_failed_cells() -> None:
    fits = scaling_fits(results_table(_law_records(failed=("m", "sparse", "kd"))), x_axes=["parameters"])
    fit = next(f for f in fits if (f.paradigm, f.loss) == ("sparse", "kd"))
    assert [p[0] for p in fit.points] == ["s", "l"]
    assert fit.law.b == pytest.approx(-0.01, abs=1e-9)  # two exact points still give the law
    two_failed = _law_records(failed=("m", "dense", "cl"))
    two_failed[6]["status"], two_failed[6]["metrics"] = "failed", None  # ("s", "dense", "cl")
    fit = next(f for f in scaling_fits(results_table(two_failed)) if (f.paradigm, f.loss) == ("dense", "cl"))
    assert fit.law is None and "has 1" in fit.reason


# ----------------------------------------------------------------------------------------------------- plots, report


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_scaling_writes_a_png(tmp_path: Path) -> None:
    fits = scaling_fits(results_table(_law_records()), x_axes=["parameters"])
    path = plot_scaling(fits, tmp_path / "sub" / "p.png", figsize=(4.0, 3.0), dpi=50)
    assert _png_size(path) == (200, 150)
    assert 2_000 < path.stat().st_size < 200_000
    mixed = scaling_fits(results_table(_law_records()))
    with pytest.raises(ValueError, match="one metric against one axis"):
        plot_scaling(mixed, tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one fit"):
        plot_scaling([], tmp_path / "x.png")


def _strict_json(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_write_report(tmp_path: Path, records: list[dict]) -> None:
    law_records = _law_records()
    # extend the fitted grid with the hand-made table's datasets so both shapes go through one report
    for record in law_records:
        record["backbone"] = "law-" + record["backbone"]
    paths = write_report(records + law_records, tmp_path / "report")
    assert isinstance(paths, ReportPaths)
    assert [p.name for p in paths.all()[:3]] == ["results.md", "results.csv", "fits.json"]
    assert all(p.is_file() for p in paths.all())

    # CSV: the table with full precision, readable back
    csv = pd.read_csv(paths.csv, index_col=[0, 1, 2])
    assert csv.loc[("tiny-s", "sparse", "cl"), f"{BEIR_MEAN}:ndcg@10"] == 0.375
    assert csv.loc[("tiny-l", "dense", "cl"), "status"] == "failed"
    assert len(csv) == 8 + 9

    # fits.json: every column × axis × line, exponents of the law lines, null + reason where no fit was made
    fits = _strict_json(paths.fits.read_text())
    assert fits["target"] == "error" and fits["form"] == "1 - metric = a * x**b" and fits["min_span"] == 2.0
    n_columns, n_lines = 8, 4  # 8 metric columns; lines: dense cl, dense kd, sparse cl, sparse kd
    assert len(fits["fits"]) == n_columns * 2 * n_lines
    dev = {
        (f["paradigm"], f["loss"], f["x"]): f for f in fits["fits"] if (f["dataset"], f["metric"]) == (DEV, "mrr@10")
    }
    sparse_cl = dev[("sparse", "cl", "parameters")]
    # the law line's three points and the hand-made grid's two sparse/cl points are fitted together
    assert sparse_cl["n_points"] == 5 and len(sparse_cl["points"]) == 5
    assert sparse_cl["b"] is not None and sparse_cl["r2"] < 1.0
    assert dev[("dense", "cl", "flops")]["a"] is None and "spans" in dev[("dense", "cl", "flops")]["reason"]
    ref = stats.linregress(
        np.log([p["x"] for p in sparse_cl["points"]]), np.log([1 - p["metric"] for p in sparse_cl["points"]])
    )
    assert sparse_cl["b"] == pytest.approx(ref.slope, rel=1e-9)
    assert sparse_cl["r2"] == pytest.approx(ref.rvalue**2, rel=1e-9)

    # plots: every non-BEIR column and the BEIR mean, against both axes; the single BEIR sets are not drawn
    names = sorted(p.name for p in paths.plots)
    assert len(names) == (8 - 2) * 2
    assert "msmarco_passage_dev_small__mrr_at_10__vs_parameters.png" in names
    assert "beir_mean__ndcg_at_10__vs_flops.png" in names
    assert not any("nfcorpus" in n or "scifact" in n for n in names)
    for plot in paths.plots:
        assert _png_size(plot) == (500, 350)
        assert 5_000 < plot.stat().st_size < 500_000

    markdown = paths.markdown.read_text()
    assert markdown.startswith("# Scaling report\n\n17 cells (1 failed).")
    assert to_markdown(results_table(records + law_records)) in markdown
    assert "| MS MARCO dev | MRR@10 | sparse | CL | parameters |" in markdown
    assert "nfcorpus | nDCG@10 | dense" not in markdown  # single-BEIR fits live in fits.json only
    for plot in paths.plots:
        assert f"](plots/{plot.name})" in markdown

    with_beir = write_report(records, tmp_path / "beir", plot_beir_datasets=True, target="metric")
    assert len(with_beir.plots) == 8 * 2
    assert _strict_json(with_beir.fits.read_text())["form"] == "metric = a * x**b"


def test_write_report_survives_an_all_failed_sweep(tmp_path: Path) -> None:
    paths = write_report([_record("a", "sparse", "cl", 10, None)], tmp_path)
    assert paths.plots == []
    assert _strict_json(paths.fits.read_text())["fits"] == []
    assert "| a | sparse | CL | 10 | 6.2e19 | 1,200 | failed |" in paths.markdown.read_text()
    with_baselines = write_report(
        [_record("a", "sparse", "cl", 10, None)], tmp_path / "b", baselines=_baselines(), compare=f"{DEV}:mrr@10"
    )
    assert "| BM25 | – | baseline | – | 0 | – | ok |" in with_baselines.markdown.read_text()


# ----------------------------------------------------------------------------------------------------- records IO


def test_power_law_to_dict() -> None:
    assert PowerLaw(2.0, -0.5, 0.99, 3).to_dict() == {"a": 2.0, "b": -0.5, "r2": 0.99, "n_points": 3}


# ----------------------------------------------------------------------------------------------------- baselines


def _baselines() -> list[dict]:
    """BM25 and step-0 rows for the hand-made grid (BM25 has no DL19 value; tiny-l sparse has no step 0)."""

    def baseline(kind: str, name: str, backbone: str | None, paradigm: str | None, n: int | None, dev: float) -> dict:
        metrics = {DEV: {"mrr@10": dev}, NFC: {"ndcg@10": dev / 2}, SCIFACT: {"ndcg@10": dev}}
        if kind == "step0":
            metrics[DL19] = {"ndcg@10": 0.1}
        return {
            "kind": kind,
            "name": name,
            "backbone": backbone,
            "paradigm": paradigm,
            "loss": None,
            "parameters": n,
            "flops": 0,
            "metrics": metrics,
            "status": "ok",
        }

    return [
        baseline("step0", "tiny-l dense step 0", "tiny-l", "dense", 8000, 0.02),
        baseline("step0", "tiny-s sparse step 0", "tiny-s", "sparse", 1000, 0.35),
        baseline("bm25", "BM25", None, None, None, 0.25),
        baseline("step0", "tiny-s dense step 0", "tiny-s", "dense", 1000, 0.01),
    ]


def test_baseline_table_rows_columns_and_comparison(records: list[dict]) -> None:
    base = baseline_table(_baselines())
    assert list(base.index) == ["BM25", "tiny-s dense step 0", "tiny-s sparse step 0", "tiny-l dense step 0"]
    assert base.index.name == "name"
    assert list(base.columns) == [
        "kind",
        "backbone",
        "paradigm",
        "status",
        *NUMBER_COLUMNS,  # as in the results table
        f"{DEV}:mrr@10",
        f"{DL19}:ndcg@10",
        f"{NFC}:ndcg@10",
        f"{SCIFACT}:ndcg@10",
        f"{BEIR_MEAN}:ndcg@10",
    ]
    assert base.loc["BM25", f"{BEIR_MEAN}:ndcg@10"] == pytest.approx(0.1875)  # (0.125 + 0.25) / 2
    assert base.loc["BM25", "backbone"] is None and math.isnan(base.loc["BM25", f"{DL19}:ndcg@10"])

    df = results_table(records)
    aligned = baseline_table(_baselines(), metric_columns(df))
    assert metric_columns(aligned) == metric_columns(df)  # the cells' columns, e.g. local/toy (NaN for baselines)
    assert bm25_reference(aligned, f"{DEV}:mrr@10") == 0.25

    compared = baseline_comparison(df, aligned, f"{DEV}:mrr@10")
    assert list(compared.columns) == ["vs_bm25", "beats_step0"] and list(compared.index) == list(df.index)
    assert compared.loc[("tiny-s", "sparse", "cl"), "vs_bm25"] == pytest.approx(0.3125 / 0.25)
    assert compared.loc[("tiny-s", "sparse", "cl"), "beats_step0"] == np.False_  # 0.3125 < 0.35
    assert compared.loc[("tiny-s", "dense", "kd"), "beats_step0"] == np.True_
    assert pd.isna(compared.loc[("tiny-l", "sparse", "cl"), "beats_step0"])  # no tiny-l sparse step 0
    assert pd.isna(compared.loc[("tiny-l", "dense", "cl"), "beats_step0"])  # the failed cell
    assert math.isnan(compared.loc[("tiny-l", "dense", "cl"), "vs_bm25"])
    # DL19: no BM25 value, so no ratio, but the step-0 comparison still works
    dl19 = baseline_comparison(df, aligned, f"{DL19}:ndcg@10")
    assert dl19["vs_bm25"].isna().all() and dl19.loc[("tiny-s", "dense", "cl"), "beats_step0"] == np.True_
    with pytest.raises(ValueError, match="not a column"):
        baseline_comparison(df, aligned, "nope:mrr@10")
    assert baseline_table([]).empty


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "tfidf"}, "unknown kind 'tfidf'"),
        ({"name": ""}, "'name' must be a non-empty string"),
        ({"paradigm": "hybrid"}, "unknown paradigm 'hybrid'"),
        ({"backbone": None}, "needs its 'backbone' and 'paradigm'"),
        ({"backbone": 3}, "'backbone' must be a non-empty string or null"),
        ({"metrics": None}, "needs 'metrics'"),
        ({"metrics": {DEV: {"mrr@10": 25.0}}}, "not percentages"),
        ({"flops": -1}, "finite number >= 0"),
        ({"status": "running"}, "unknown status"),
    ],
)
def test_bad_baselines_fail_clearly(change: dict, message: str) -> None:
    good = _baselines()[0]
    with pytest.raises(RecordError, match=message) as err:
        baseline_table([_baselines()[2], {**good, **change}])
    assert "baseline 1" in str(err.value)


def test_duplicate_baselines_fail() -> None:
    bm25 = _baselines()[2]
    with pytest.raises(RecordError, match="names must be unique; repeated: BM25"):
        baseline_table([bm25, bm25])
    df = results_table([_record("tiny-s", "sparse", "cl", 1000, {DEV: {"mrr@10": 0.3}})])
    two_bm25 = baseline_table([bm25, {**bm25, "name": "BM25 again"}])
    with pytest.raises(RecordError, match="more than one BM25 baseline"):
        baseline_comparison(df, two_bm25, f"{DEV}:mrr@10")
    step0 = _baselines()[1]
    two_step0 = baseline_table([step0, {**step0, "name": "again"}])
    with pytest.raises(RecordError, match="two step-0 baselines for tiny-s sparse"):
        baseline_comparison(df, two_step0, f"{DEV}:mrr@10")


def test_markdown_table_with_baselines(records: list[dict]) -> None:
    df = results_table(records)
    base = baseline_table(_baselines(), metric_columns(df))
    lines = to_markdown(df, baselines=base, compare=f"{DEV}:mrr@10").splitlines()
    assert lines[0].endswith("| BEIR mean (2) nDCG@10 | MRR@10 vs BM25 | > step 0 |")
    assert len(lines) == 2 + 8 + 4
    # cells: the comparison columns; the bold best is unchanged although tiny-s sparse step 0 has 35.0 > 31.2
    assert lines[4] == (
        "| tiny-s | sparse | CL | 1K | 6.2e19 | 1,200 | 31.2 | 62.5 | 81.2 | 12.5 | 25.0 | 25.0 | 50.0 | 37.5 "
        "| 125% | no |"
    )
    assert lines[8].endswith("| **55.0** | 160% | – |")  # tiny-l sparse CL: no step-0 row for tiny-l sparse
    assert lines[6].endswith(" failed | – | – |")
    # baselines below the cells, marked, never bold
    assert lines[10] == "| BM25 | – | baseline | – | 0 | – | 25.0 | – | – | – | – | 12.5 | 25.0 | 18.8 | 100% | – |"
    assert lines[12] == (
        "| tiny-s | sparse | baseline (step 0) | 1K | 0 | – | 35.0 | 10.0 | – | – | – | 17.5 | 35.0 | 26.2 "
        "| 140% | – |"
    )
    assert all("**" not in line for line in lines[10:])
    # without compare: baseline rows, no comparison columns
    plain = to_markdown(df, baselines=base).splitlines()
    assert plain[0].endswith("| BEIR mean (2) nDCG@10 |") and len(plain) == 2 + 8 + 4


def test_write_report_with_baselines(tmp_path: Path) -> None:
    records = _law_records()
    without = write_report(records, tmp_path / "plain")
    paths = write_report(records, tmp_path / "report", baselines=_baselines(), sections=["## Extra", "", "extra text"])
    # baselines are not fitted: fits.json is the same with and without them
    assert paths.fits.read_text() == without.fits.read_text()
    assert [p.name for p in paths.plots] == [p.name for p in without.plots]

    markdown = paths.markdown.read_text()
    assert "Rows marked `baseline` are not cells" in markdown
    assert "*MRR@10 vs BM25*: MS MARCO dev MRR@10 as a percentage of BM25's" in markdown
    assert "| BM25 | – | baseline | – | 0 | – | 25.0 | 100% | – |" in markdown
    assert markdown.index("| BM25 |") < markdown.index("## Extra\n\nextra text\n") < markdown.index("## Power-law")

    csv = pd.read_csv(paths.csv, index_col=[0, 1, 2])
    assert list(csv.columns[:2]) == ["row", "name"] and list(csv.columns[-2:]) == ["vs_bm25", "beats_step0"]
    assert list(csv["row"]) == ["cell"] * 9 + ["bm25", "step0", "step0", "step0"]
    assert csv.loc[("BM25", slice(None), "baseline"), "name"].tolist() == ["BM25"]
    step0 = csv.loc[("tiny-s", "sparse", "baseline")]
    assert step0["name"] == "tiny-s sparse step 0" and step0[f"{DEV}:mrr@10"] == 0.35
    assert step0["vs_bm25"] == pytest.approx(1.4)
    cell = csv.loc[("s", "sparse", "cl")]
    assert cell["vs_bm25"] == pytest.approx((1 - 0.9 * 1e3**-0.05) / 0.25) and pd.isna(cell["beats_step0"])
    # without baselines the CSV only gains the leading row column
    plain = pd.read_csv(without.csv, index_col=[0, 1, 2])
    assert list(plain.columns[:2]) == ["row", "status"] and set(plain["row"]) == {"cell"}
