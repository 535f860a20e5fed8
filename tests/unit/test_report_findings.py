"""The paper's findings judged from per-query values (`retriever.report.findings`): every verdict of every finding from
hand-made cells with known answers, then once through real run files and qrels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from retriever.report.findings import (
    BEST_CELL,
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    RULES,
    SCALING,
    SPARSE_VS_DENSE,
    judge_findings,
)
from retriever.report.findings_page import write_findings
from retriever.report.per_query import CellValues, cell_run_file, load_cell_values, per_query_values

N_QUERIES = 200
SIZES = {"s": 1_000, "m": 4_000, "l": 16_000}
DATASET, METRIC = "synthetic/test", "ndcg@10"


def _values(mean: float, seed: int, spread: float = 0.1) -> np.ndarray:
    """Per-query values in [0, 1] whose mean is exactly ``mean`` (centred uniform noise of half-width spread)."""
    noise = np.random.default_rng(seed).uniform(-spread, spread, N_QUERIES)
    return mean + noise - noise.mean()


def _cell(backbone: str, paradigm: str, loss: str, mean: float | None, seed: int = 0, **kw) -> CellValues:
    return CellValues(
        backbone=backbone,
        paradigm=paradigm,
        loss=loss,
        parameters=float(SIZES[backbone]),
        status="ok" if mean is not None else "failed",
        values=None if mean is None else _values(mean, seed, **kw),
    )


def _grid(means: dict[tuple[str, str, str], float | None], **kw) -> list[CellValues]:
    return [_cell(b, p, lo, m, seed=i, **kw) for i, ((b, p, lo), m) in enumerate(means.items())]


def _law(a: float, b: float, n: float) -> float:
    """The metric whose error follows 1 - metric = a * n^b."""
    return 1.0 - a * n**b


def _judge(cells: list[CellValues], **kw):
    return judge_findings(cells, dataset=DATASET, metric=METRIC, n_boot=400, **kw)


# --------------------------------------------------------------------------------------------------------- finding 1


def _scaling_grid(cl: float, kd: float, paradigms=("sparse", "dense")) -> list[CellValues]:
    means = {}
    for paradigm in paradigms:
        for name, n in SIZES.items():
            means[(name, paradigm, "cl")] = _law(0.9, cl, n)
            means[(name, paradigm, "kd")] = _law(0.6, kd, n)
    return _grid(means)


def test_scaling_reproduced_when_cl_improves_and_kd_is_flat() -> None:
    finding = _judge(_scaling_grid(cl=-0.15, kd=0.0))[SCALING]
    assert finding.verdict == REPRODUCED, finding.reason
    lines = {(line["paradigm"], line["loss"]): line for line in finding.details["lines"]}
    cl = lines[("sparse", "cl")]["exponent"]
    assert cl["estimate"] == pytest.approx(-0.15, abs=1e-9)  # exact means: the fit recovers the law
    assert cl["ci_low"] < -0.15 < cl["ci_high"] < 0
    kd = lines[("dense", "kd")]["exponent"]
    assert kd["estimate"] == pytest.approx(0.0, abs=1e-9) and kd["ci_low"] < 0 < kd["ci_high"]
    assert [p["verdict"] for p in finding.details["paradigms"]] == [REPRODUCED, REPRODUCED]
    assert "KD is flat" in finding.reason and finding.rule == RULES[SCALING]


def test_scaling_reproduced_when_kd_improves_clearly_less() -> None:
    finding = _judge(_scaling_grid(cl=-0.3, kd=-0.05, paradigms=("sparse",)))[SCALING]
    assert finding.verdict == REPRODUCED
    paradigm = finding.details["paradigms"][0]
    assert paradigm["kd_minus_cl"]["ci_low"] > 0 and "KD clearly less" in paradigm["reason"]


def test_scaling_not_reproduced_when_cl_gets_worse() -> None:
    finding = _judge(_scaling_grid(cl=0.1, kd=0.0))[SCALING]
    assert finding.verdict == NOT_REPRODUCED and "CL gets worse with size" in finding.reason


def test_scaling_not_reproduced_when_kd_scales_clearly_better() -> None:
    finding = _judge(_scaling_grid(cl=-0.05, kd=-0.3))[SCALING]
    assert finding.verdict == NOT_REPRODUCED and "KD scales clearly better" in finding.reason


def test_scaling_inconclusive_with_one_size_or_an_unclear_trend() -> None:
    one_size = _grid({("m", "sparse", "cl"): 0.5, ("m", "sparse", "kd"): 0.4})
    finding = _judge(one_size)[SCALING]
    assert finding.verdict == INCONCLUSIVE and "1 model size(s)" in finding.reason
    # CL flat within noise: its interval contains 0
    flat = _judge(_scaling_grid(cl=0.0, kd=0.0, paradigms=("dense",)))[SCALING]
    assert flat.verdict == INCONCLUSIVE and "not clearly below 0" in flat.reason
    # CL improves in both paradigms, but dense has no KD line
    cells = [c for c in _scaling_grid(cl=-0.15, kd=0.0) if (c.paradigm, c.loss) != ("dense", "kd")]
    mixed = _judge(cells)[SCALING]
    assert mixed.verdict == INCONCLUSIVE and "dense: no KD cells" in mixed.reason


# --------------------------------------------------------------------------------------------------------- finding 2


def _versus(diffs: dict[tuple[str, str], float]) -> list[CellValues]:
    cells = []
    for i, ((backbone, loss), diff) in enumerate(diffs.items()):
        dense = _cell(backbone, "dense", loss, 0.5, seed=i)
        assert dense.values is not None
        sparse_values = dense.values + diff + _values(0.0, 100 + i, spread=0.05)  # paired: shared query noise
        cells += [dense, CellValues(backbone, "sparse", loss, dense.parameters, "ok", sparse_values)]
    return cells


def test_sparse_vs_dense_verdicts() -> None:
    pairs = [("s", "cl"), ("s", "kd"), ("l", "cl")]
    better = _judge(_versus(dict.fromkeys(pairs, 0.03)))[SPARSE_VS_DENSE]
    assert better.verdict == REPRODUCED and better.details["sparse_wins"] == 3 and better.details["dense_wins"] == 0
    test = better.details["pairs"][0]["test"]
    assert test["difference"]["estimate"] == pytest.approx(0.03, abs=1e-12)
    assert test["difference"]["ci_low"] > 0 and test["p_value"] < 1e-6 and test["better"] == "a"

    worse = _judge(_versus({pairs[0]: -0.03, pairs[1]: -0.03, pairs[2]: 0.03}))[SPARSE_VS_DENSE]
    assert worse.verdict == NOT_REPRODUCED and worse.details["dense_wins"] == 2

    # two sparse wins out of three, but one significant dense win: not a clean majority
    mixed = _judge(_versus({pairs[0]: 0.03, pairs[1]: 0.03, pairs[2]: -0.03}))[SPARSE_VS_DENSE]
    assert mixed.verdict == INCONCLUSIVE and "in 2 of 3 pair(s), dense in 1" in mixed.reason
    equal = _judge(_versus(dict.fromkeys(pairs, 0.0)))[SPARSE_VS_DENSE]
    assert equal.verdict == INCONCLUSIVE and equal.details["sparse_wins"] == 0
    assert all(not p["test"]["significant"] for p in equal.details["pairs"])

    only_sparse = [c for c in _versus(dict.fromkeys(pairs, 0.03)) if c.paradigm == "sparse"]
    none = _judge(only_sparse)[SPARSE_VS_DENSE]
    assert none.verdict == INCONCLUSIVE and "no (backbone, loss)" in none.reason


def test_identical_runs_are_a_tie_not_an_error() -> None:
    values = _values(0.4, 1)
    cells = [CellValues("s", p, "cl", 1e3, "ok", values.copy()) for p in ("sparse", "dense")]
    test = _judge(cells)[SPARSE_VS_DENSE].details["pairs"][0]["test"]
    assert test["p_value"] == 1.0 and test["difference"] == {"estimate": 0.0, "ci_low": 0.0, "ci_high": 0.0}


# --------------------------------------------------------------------------------------------------------- finding 3


def _best_grid(target: float | None, other: float, spread: float = 0.1) -> list[CellValues]:
    return _grid(
        {
            ("s", "sparse", "cl+kd"): 0.50,
            ("l", "dense", "cl"): other,
            ("l", "dense", "cl+kd"): 0.45,
            ("l", "sparse", "cl+kd"): target,
        },
        spread=spread,
    )


def test_best_cell_verdicts() -> None:
    best = _judge(_best_grid(target=0.70, other=0.60))[BEST_CELL]
    assert best.verdict == REPRODUCED and best.details["rank"] == 1 and best.details["to_best"] is None
    assert best.details["cell"] == "l sparse CL+KD" and best.details["largest"]["parameters"] == 16_000

    # slightly below the best but within noise: tied
    tied = _judge(_best_grid(target=0.600, other=0.602, spread=0.4))[BEST_CELL]
    assert tied.verdict == REPRODUCED and tied.details["rank"] == 2 and "tied with the best" in tied.reason
    assert not tied.details["to_best"]["significant"] and tied.details["cell_interval_covers_best"]

    beaten = _judge(_best_grid(target=0.55, other=0.70))[BEST_CELL]
    assert beaten.verdict == NOT_REPRODUCED and "l dense CL is significantly better" in beaten.reason
    assert beaten.details["to_best"]["difference"]["estimate"] == pytest.approx(0.15, abs=1e-12)

    failed = _judge(_best_grid(target=None, other=0.70))[BEST_CELL]
    assert failed.verdict == INCONCLUSIVE and "no usable result (failed)" in failed.reason
    missing = _judge([c for c in _best_grid(target=0.7, other=0.6) if c.backbone != "l" or c.paradigm != "sparse"])
    assert missing[BEST_CELL].verdict == INCONCLUSIVE and "is not in the sweep" in missing[BEST_CELL].reason


# --------------------------------------------------------------------------------------------------------- validation


def test_judging_is_deterministic_and_checks_its_input() -> None:
    cells = _scaling_grid(cl=-0.15, kd=0.0)
    assert _judge(cells).to_dict() == _judge(cells).to_dict()
    other_seed = _judge(cells, seed=1)[SCALING].details["lines"][0]["exponent"]
    assert other_seed != _judge(cells)[SCALING].details["lines"][0]["exponent"]
    short = CellValues("x", "sparse", "cl", 1.0, "ok", np.zeros(3))
    with pytest.raises(ValueError, match="share one query list"):
        _judge([*cells, short])
    with pytest.raises(ValueError, match="finite numbers"):
        _judge([CellValues("x", "sparse", "cl", 1.0, "ok", np.array([0.5, math.nan]))])
    with pytest.raises(ValueError, match="appears twice"):
        _judge([cells[0], cells[0]])
    with pytest.raises(ValueError, match="n_boot"):
        judge_findings(cells, dataset=DATASET, metric=METRIC, n_boot=10)
    empty = _judge([])
    assert [f.verdict for f in empty.findings] == [INCONCLUSIVE] * 3


# --------------------------------------------------------------------------------------------------------- files


def _write_run(path: Path, ranks: dict[str, int]) -> None:
    """A run where query q's relevant document `rel-q` sits at rank ranks[q] below filler documents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for qid, rank in ranks.items():
        docs = [f"filler-{i}" for i in range(1, rank)] + [f"rel-{qid}"]
        lines += [f"{qid} Q0 {doc} {r} {100 - r} run" for r, doc in enumerate(docs, start=1)]
    path.write_text("\n".join(lines) + "\n")


def test_findings_from_run_files_and_qrels(tmp_path: Path) -> None:
    queries = [f"q{i:02d}" for i in range(30)]
    qrels = {q: {f"rel-{q}": 1} for q in queries}
    # sparse puts every relevant document first, dense third; q29 is missing from the dense run (scores 0)
    records = []
    for backbone, n in (("tiny-s", 1_000), ("tiny-l", 8_000)):
        for paradigm, rank in (("sparse", 1), ("dense", 3)):
            record = {"backbone": backbone, "paradigm": paradigm, "loss": "cl+kd", "parameters": n, "status": "ok"}
            record["cell"] = f"{backbone}__{paradigm}__cl_kd"
            ranks = {q: rank for q in queries if paradigm == "sparse" or q != "q29"}
            _write_run(cell_run_file(tmp_path, record, DATASET), ranks)
            records.append(record)
    records.append({"backbone": "tiny-l", "paradigm": "dense", "loss": "cl", "status": "failed"})
    assert cell_run_file(tmp_path, records[0], DATASET) == (
        tmp_path / "cells" / "tiny-s__sparse__cl_kd" / "eval" / "synthetic_test" / "run.trec"
    )

    dense_values = per_query_values(cell_run_file(tmp_path, records[1], DATASET), qrels, DATASET, METRIC)
    assert dense_values["q00"] == pytest.approx(1 / math.log2(4)) and dense_values["q29"] == 0.0

    order, cells = load_cell_values(tmp_path, records, DATASET, METRIC, qrels)
    assert order == queries and [c.usable for c in cells] == [True] * 4 + [False]
    assert cells[0].values.tolist() == [1.0] * 30 and cells[4].note == "cell failed"

    findings = judge_findings(cells, dataset=DATASET, metric=METRIC, n_boot=200)
    assert findings.num_queries == 30
    assert findings[SPARSE_VS_DENSE].verdict == REPRODUCED
    assert findings[BEST_CELL].verdict == REPRODUCED  # tiny-l sparse CL+KD ties tiny-s sparse CL+KD at 1.0
    assert findings[SCALING].verdict == INCONCLUSIVE  # no CL or KD line
    assert "sparse: no CL cells" in findings[SCALING].reason

    logged = write_findings(tmp_path / "report", findings)
    page = (tmp_path / "report" / "findings.md").read_text()
    assert page.startswith("# The paper's findings, judged from this sweep\n")
    assert "| 2. Sparse retrievers beat dense ones" in page and "**reproduced**" in page
    assert "| tiny-l | CL+KD | 1.0000 | 0.4833 | +0.5167 [" in page  # dense: (29 × 0.5 + 0) / 30
    assert "| dense | CL+KD | tiny-s (1K): 0.4833, tiny-l (8K): 0.4833 | +0.0000 [+0.0000, +0.0000] |" in page
    for rule in RULES.values():
        assert f"Rule: {rule}" in page
    saved = json.loads((tmp_path / "report" / "findings.json").read_text())
    assert saved["dataset"] == DATASET and saved["metric"] == METRIC and saved["settings"]["seed"] == 0
    assert [f["verdict"] for f in saved["findings"]] == [INCONCLUSIVE, REPRODUCED, REPRODUCED]
    assert logged["tags"] == {
        "findings/1_scaling": INCONCLUSIVE,
        "findings/2_sparse_vs_dense": REPRODUCED,
        "findings/3_best_cell": REPRODUCED,
    }
    key = "findings/2_sparse_vs_dense/tiny_l/cl_kd"
    assert logged["metrics"][f"{key}/difference"] == pytest.approx(1 - 29 * 0.5 / 30)
    assert {f"{key}/difference_ci_low", f"{key}/difference_ci_high", f"{key}/p_value"} <= set(logged["metrics"])
