"""The sweep report (`retriever.report.sweep_report`): baseline records, their MLflow metrics, and
`write_sweep_report` on a hand-made sweep directory over a small synthetic benchmark (cells' runs derived from the
qrels, a real BM25 run), logged to a SQLite MLflow parent run, with the best encoders promoted as champions."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from retriever.config import ExperimentConfig
from retriever.data.catalog import resolve_dataset
from retriever.data.sources import load_source
from retriever.records import RecordError, collect_baselines
from retriever.report.baselines import baseline_metrics, evaluate_bm25
from retriever.report.findings import BEST_CELL, INCONCLUSIVE, REPRODUCED, SPARSE_VS_DENSE
from retriever.report.per_query import cell_run_file
from retriever.report.promotion import CHAMPION
from retriever.report.sweep_report import judge_findings_safely, write_sweep_report
from retriever.tracking import RunTracker, open_experiment
from retriever.trec import write_run

DATASET = "synthetic/test"


def _write_baseline(root: Path, baseline_id: str, record: dict) -> None:
    folder = root / "baselines" / baseline_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(record))


def test_collect_baselines_and_their_metric_names(tmp_path: Path) -> None:
    assert collect_baselines(tmp_path) == []
    bm25 = {"kind": "bm25", "name": "BM25", "status": "ok", "metrics": {DATASET: {"ndcg@10": 0.7, "mrr@10": 0.9}}}
    step0 = {"kind": "step0", "name": "tiny-s sparse step 0", "backbone": "tiny-s", "paradigm": "sparse"}
    _write_baseline(tmp_path, "step0-tiny-s-sparse", step0 | {"status": "failed"})
    _write_baseline(tmp_path, "bm25", bm25)
    found = collect_baselines(tmp_path)
    assert [b["id"] for b in found] == ["bm25", "step0-tiny-s-sparse"] and found[0]["name"] == "BM25"
    assert baseline_metrics(found) == {
        "baseline/bm25/synthetic_test/ndcg_at_10": 0.7,
        "baseline/bm25/synthetic_test/mrr_at_10": 0.9,
    }
    (tmp_path / "baselines" / "bm25" / "result.json").write_text("{oops")
    with pytest.raises(RecordError, match=r"bm25/result.json:1: not valid JSON"):
        collect_baselines(tmp_path)
    (tmp_path / "baselines" / "bm25" / "result.json").write_text("[]")
    with pytest.raises(RecordError, match="expected a JSON object"):
        collect_baselines(tmp_path)


def _cfg(tmp_path: Path) -> ExperimentConfig:
    data = {"synthetic_docs": 120, "synthetic_train_queries": 20, "synthetic_test_queries": 30}
    return ExperimentConfig.model_validate(
        {"name": "report-test", "train": {"output_dir": str(tmp_path)}, "data": data}
    )


def _graded_run(qrels: dict[str, dict[str, int]], fillers: int) -> dict[str, dict[str, float]]:
    """Every query's judged documents by grade, below `fillers` unjudged documents (0 = the ideal ranking)."""
    run = {}
    for qid, docs in qrels.items():
        ranked = [f"filler-{i}" for i in range(fillers)] + sorted(docs, key=lambda d: (-docs[d], d))
        run[qid] = {doc: float(len(ranked) - i) for i, doc in enumerate(ranked)}
    return run


def test_write_sweep_report_with_baselines_and_findings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path)
    tracking = open_experiment(cfg.tracking, tmp_path)
    parent = RunTracker.start(tracking.uri, tracking.experiment_id, run_name="report-test")
    qrels = load_source(resolve_dataset(DATASET, cfg)).qrels()
    root = tmp_path / "sweep"
    # sparse beats dense at every (backbone, loss); tiny-l sparse CL+KD ranks ideally (the best cell)
    fillers = {"sparse": {"cl": 1, "cl+kd": 0}, "dense": {"cl": 3, "cl+kd": 2}}
    for backbone, parameters in (("tiny-s", 1_000_000), ("tiny-l", 16_000_000)):
        for paradigm, by_loss in fillers.items():
            for loss, n in by_loss.items():
                n += backbone == "tiny-s"
                cell = f"{backbone}__{paradigm}__{loss.replace('+', '_')}"
                record = {"cell": cell, "backbone": backbone, "paradigm": paradigm, "loss": loss, "status": "ok"}
                record |= {"parameters": parameters, "flops": 1e15, "steps": 10}
                child = RunTracker.start(
                    tracking.uri, tracking.experiment_id, run_name=cell, parent_run_id=parent.run_id
                )
                record["tracking_run_id"] = child.run_id
                write_run(_graded_run(qrels, n), cell_run_file(root, record, DATASET), tag="cell")
                record["metrics"] = {DATASET: {"ndcg@10": 0.9 - 0.1 * n, "mrr@10": 0.95, "recall@100": 1.0}}
                (root / "cells" / cell / "result.json").write_text(json.dumps(record))

    bm25 = evaluate_bm25(DATASET, cfg, root / "baselines" / "bm25" / "eval")
    _write_baseline(root, "bm25", {"kind": "bm25", "name": "BM25", "backbone": None, "paradigm": None, "loss": None}
                    | {"parameters": None, "flops": 0, "metrics": {DATASET: bm25}, "status": "ok"})  # fmt: skip
    step0_metrics = {DATASET: {"ndcg@10": 0.75, "mrr@10": 0.5, "recall@100": 0.4}}
    _write_baseline(root, "step0-tiny-s-sparse", {"kind": "step0", "name": "tiny-s sparse step 0"}
                    | {"backbone": "tiny-s", "paradigm": "sparse", "parameters": 1_000_000, "flops": 0}
                    | {"metrics": step0_metrics, "status": "ok"})  # fmt: skip

    # Another sweep of this process set the process-wide registry: the versions must still land in this one's store.
    import mlflow
    import mlflow.tracking._model_registry.utils as registry_settings

    monkeypatch.setattr(registry_settings, "_registry_uri", None)  # restored after the test
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'another-sweep.db'}")
    files = write_sweep_report(root, cfg, parent.run_id, tracking)
    uri = tracking.uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    report = root / "report"
    assert files["findings"] == str(report / "findings.md") and Path(files["registered"]).is_file()
    findings = json.loads((report / "findings.json").read_text())
    verdicts = {f["id"]: f["verdict"] for f in findings["findings"]}
    assert verdicts[SPARSE_VS_DENSE] == REPRODUCED and verdicts[BEST_CELL] == REPRODUCED
    assert findings["metric"] == "ndcg@10" and findings["num_queries"] == 30

    markdown = (report / "results.md").read_text()
    assert "| BM25 | – | baseline | – | 0 | – |" in markdown
    assert "| tiny-s | sparse | baseline (step 0) | 1M | 0 | – | 75.0 |" in markdown
    assert "| nDCG@10 vs BM25 | > step 0 |" in markdown
    assert "## The paper's findings" in markdown and "[findings.md](findings.md)" in markdown
    csv = pd.read_csv(report / "results.csv", index_col=[0, 1, 2])
    assert csv.loc[("tiny-l", "sparse", "cl+kd"), "vs_bm25"] == pytest.approx(0.9 / bm25["ndcg@10"])
    # tiny-s sparse: CL 0.7 and CL+KD 0.8 against its step 0's 0.75; dense cells have no step-0 row
    assert not csv.loc[("tiny-s", "sparse", "cl"), "beats_step0"]
    assert csv.loc[("tiny-s", "sparse", "cl+kd"), "beats_step0"]
    assert pd.isna(csv.loc[("tiny-s", "dense", "cl"), "beats_step0"])
    fits = json.loads((report / "fits.json").read_text())["fits"]
    assert {f["paradigm"] for f in fits} == {"sparse", "dense"}  # baselines are not fitted

    run = MlflowClient(tracking_uri=uri).get_run(parent.run_id)
    assert run.data.metrics["baseline/bm25/synthetic_test/ndcg_at_10"] == pytest.approx(bm25["ndcg@10"])
    assert run.data.metrics["baseline/step0_tiny_s_sparse/synthetic_test/ndcg_at_10"] == 0.75
    assert run.data.tags["findings/2_sparse_vs_dense"] == REPRODUCED
    assert run.data.tags["findings/3_best_cell"] == REPRODUCED
    assert "findings/2_sparse_vs_dense/tiny_l/cl_kd/p_value" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.run_id, "report")}
    assert {"report/findings.md", "report/findings.json", "report/results.md"} <= artifacts

    # The champion of each paradigm is a version of the best cell's run (by nDCG@10: tiny-l CL+KD in both).
    for paradigm in ("sparse", "dense"):
        best = json.loads((root / "cells" / f"tiny-l__{paradigm}__cl_kd" / "result.json").read_text())
        champion = client.get_model_version_by_alias(f"retriever-{paradigm}", CHAMPION)
        assert champion.run_id == best["tracking_run_id"] and champion.tags["cell"] == best["cell"]
        assert champion.source == f"runs:/{best['tracking_run_id']}/encoder"

    # The best cells against BM25 and each other, per query (the sparse best ranks every query ideally).
    significance = json.loads((report / "significance.json").read_text())
    assert significance["missing"] == [] and significance["num_queries"] == 30
    rows = {(r["run_a"], r["run_b"]): r for r in significance["comparisons"]}
    sparse, dense = "best sparse: tiny-l sparse CL+KD", "best dense: tiny-l dense CL+KD"
    assert set(rows) == {("BM25", dense), ("BM25", sparse), (dense, sparse)}
    assert rows[("BM25", sparse)]["significant"] and rows[("BM25", sparse)]["better"] == sparse
    assert rows[("BM25", sparse)]["mean_b"] == pytest.approx(1.0)
    assert "## Significance of the best cells" in markdown and f"| BM25 | {sparse} |" in markdown


def test_findings_that_cannot_be_read_leave_the_report_inconclusive(tmp_path: Path, monkeypatch) -> None:
    import retriever.report.sweep_report

    def unavailable(*args, **kwargs):
        raise FileNotFoundError("qrels of synthetic/test are not here")

    monkeypatch.setattr(retriever.report.sweep_report, "judge_sweep", unavailable)
    findings = judge_findings_safely(tmp_path, [], _cfg(tmp_path))
    assert [f.verdict for f in findings.findings] == [INCONCLUSIVE] * 3
    assert "FileNotFoundError: qrels of synthetic/test are not here" in findings.findings[0].reason
