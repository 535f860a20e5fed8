"""The sweep's reference rows (`retriever.report.baselines`): BM25 and every (backbone, paradigm) encoder at step 0,
each written once to <root>/baselines/<id>/result.json and reused afterwards; BM25's reference numbers on the default
synthetic benchmark (DESIGN.md section 9b: nDCG@10 0.726, MRR@10 0.958, R@100 0.789)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_config

import retriever.report.baselines as baselines
from retriever.config import ExperimentConfig
from retriever.flops import plan_cell
from retriever.models.backbone import count_parameters
from retriever.models.encoders import load_encoder
from retriever.pipeline import METRICS_FILE
from retriever.records import BASELINES_DIR
from retriever.report.baselines import evaluate_bm25, run_baselines, run_bm25_baseline, run_step0_baseline, step0_id
from retriever.sweep.grid import cell_config
from retriever.train.trainer import TASKS
from retriever.trec import read_run

SMALL_DATA = {"synthetic_docs": 200, "synthetic_train_queries": 20, "synthetic_test_queries": 12}
TEXTS = ["kotibo suka butefi fufa", "guvasar ragarer mile", "an unknown word and ab1234"]
METRIC_NAMES = {"ndcg@10", "mrr@10", "recall@100"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("baselines")


def sweep_config(root, **sections):
    base = {
        "backbone": {"lora": {"enabled": False}},
        "data": SMALL_DATA,
        "sweep": {"backbones": ["tiny-s"], "paradigms": ["sparse", "dense"], "losses": ["cl", "kd"]},
    }
    return make_config(root, "base", **{**base, **sections})


def read_record(root, baseline_id):
    return json.loads((root / BASELINES_DIR / baseline_id / "result.json").read_text())


def test_step0_id_is_file_system_safe():
    assert step0_id("tiny-s", "sparse") == "step0__tiny-s__sparse"
    assert step0_id("meta-llama/Llama-3.2-1B", "dense") == "step0__meta-llama_Llama-3.2-1B__dense"


def test_bm25_baseline_record_and_reuse(root, tmp_path, monkeypatch):
    cfg = sweep_config(root)
    record = run_bm25_baseline(cfg, root)
    expected = evaluate_bm25("synthetic/test", cfg, tmp_path / "direct")
    assert set(expected) == METRIC_NAMES
    assert record == {
        "kind": "bm25",
        "name": "BM25",
        "backbone": None,
        "paradigm": None,
        "loss": None,
        "parameters": None,
        "flops": 0,
        "metrics": {"synthetic/test": expected},
        "status": "ok",
    }
    assert read_record(root, "bm25") == record
    assert (root / BASELINES_DIR / "bm25" / "eval" / "synthetic_test" / "run.trec").is_file()
    assert not (root / BASELINES_DIR / "bm25" / "result.json.partial").exists()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished BM25 baseline was evaluated again")

    monkeypatch.setattr("retriever.report.baselines.evaluate_bm25", must_not_run)
    assert run_bm25_baseline(cfg, root) == record


def test_bm25_baseline_runs_again_when_the_record_is_not_ok(tmp_path, monkeypatch):
    cfg = sweep_config(tmp_path)
    directory = tmp_path / BASELINES_DIR / "bm25"
    directory.mkdir(parents=True)
    (directory / "result.json").write_text(json.dumps({"kind": "bm25", "status": "failed"}))
    calls = []

    def fake(dataset, config, out_dir):
        calls.append((dataset, out_dir))
        return {"ndcg@10": 0.5}

    monkeypatch.setattr("retriever.report.baselines.evaluate_bm25", fake)
    cfg.eval.datasets = ["synthetic/test", "synthetic/train"]
    record = run_bm25_baseline(cfg, tmp_path)
    assert calls == [("synthetic/test", directory / "eval"), ("synthetic/train", directory / "eval")]
    assert record["status"] == "ok"
    assert record["metrics"] == {"synthetic/test": {"ndcg@10": 0.5}, "synthetic/train": {"ndcg@10": 0.5}}
    assert read_record(tmp_path, "bm25") == record


def test_step0_baseline_is_the_encoder_training_starts_from(root, monkeypatch):
    cfg = sweep_config(root)
    cell = cell_config(cfg, "tiny-s", "sparse", "cl")
    record = run_step0_baseline(cell, root)
    directory = root / BASELINES_DIR / "step0__tiny-s__sparse"
    saved = load_encoder(directory / "encoder")

    # The encoder the training loop builds before step 1 (run_loop seeds, then task.build()).
    planned = plan_cell(cell).steps if cell.budget.flops else cell.budget.max_steps
    task = TASKS.get("retrieval").make(cell, planned)
    torch.manual_seed(cell.train.seed)
    task.build()
    live = task.encoder
    assert saved.paradigm == live.paradigm == "sparse"
    for kind in ("query", "passage"):
        got, expected = saved.encode(TEXTS, kind), live.encode(TEXTS, kind)
        assert got.shape == expected.shape == (3, live.dimension)
        assert torch.allclose(got, expected, rtol=0, atol=1e-6)
        assert float(got.abs().sum()) > 0
    # ... and a different start (another backbone seed) would be told apart by this comparison.
    other = cell.model_copy(deep=True)
    other.backbone.seed = cell.backbone.seed + 1
    task_other = TASKS.get("retrieval").make(other, planned)
    torch.manual_seed(cell.train.seed)
    task_other.build()
    assert not torch.allclose(saved.encode(TEXTS, "passage"), task_other.encoder.encode(TEXTS, "passage"))

    assert record["kind"] == "step0" and record["status"] == "ok"
    assert record["name"] == "tiny-s sparse step 0"
    assert (record["backbone"], record["paradigm"], record["loss"], record["flops"]) == ("tiny-s", "sparse", None, 0)
    assert record["parameters"] == plan_cell(cell).total_parameters == count_parameters(live.lm) > 0
    assert set(record["metrics"]) == {"synthetic/test"}
    metrics = record["metrics"]["synthetic/test"]
    assert set(metrics) == METRIC_NAMES and all(0.0 <= v <= 1.0 for v in metrics.values())
    written = json.loads((directory / "eval" / METRICS_FILE).read_text())
    assert written["datasets"]["synthetic/test"]["metrics"] == metrics
    assert read_record(root, "step0__tiny-s__sparse") == record

    # Finished: neither built nor evaluated again.
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished step-0 baseline was evaluated again")

    monkeypatch.setattr("retriever.pipeline.evaluate_encoder", must_not_run)
    monkeypatch.setattr("retriever.models.encoders.build_encoder", must_not_run)
    assert run_step0_baseline(cell, root) == record


def test_run_baselines_makes_one_step0_row_per_backbone_and_paradigm(root, monkeypatch):
    """Cells of two losses share their (backbone, paradigm) row; BM25 comes first."""
    cfg = sweep_config(root, sweep={"backbones": ["tiny-s", "tiny-m"], "paradigms": ["sparse", "dense"]})
    seen = []

    def fake_step0(cell, where):
        seen.append((cell.backbone.name, cell.encoder.paradigm, cell.loss.name, where))
        return {"name": f"{cell.backbone.name} {cell.encoder.paradigm} step 0", "metrics": {}}

    monkeypatch.setattr(baselines, "run_step0_baseline", fake_step0)
    monkeypatch.setattr(baselines, "run_bm25_baseline", lambda config, where: {"name": "BM25", "metrics": {}})
    cells = [
        cell_config(cfg, b, p, loss) for b in cfg.sweep.backbones for p in cfg.sweep.paradigms for loss in ("cl", "kd")
    ]
    records = run_baselines(cfg, root, cells)
    assert [r["name"] for r in records] == [
        "BM25",
        "tiny-s sparse step 0",
        "tiny-s dense step 0",
        "tiny-m sparse step 0",
        "tiny-m dense step 0",
    ]
    assert seen == [(b, p, "cl", root) for b in ("tiny-s", "tiny-m") for p in ("sparse", "dense")]


def test_run_baselines_end_to_end_reuses_finished_rows(root):
    """Real rows: finished BM25 and sparse rows (from the tests above when run together) are reused, the dense
    row is new."""
    cfg = sweep_config(root)
    run_bm25_baseline(cfg, root)
    run_step0_baseline(cell_config(cfg, "tiny-s", "sparse", "cl"), root)
    before = {
        name: (root / BASELINES_DIR / name / "result.json").stat().st_mtime_ns
        for name in ("bm25", "step0__tiny-s__sparse")
    }
    cells = [cell_config(cfg, "tiny-s", p, loss) for p in ("sparse", "dense") for loss in ("cl", "kd")]
    records = run_baselines(cfg, root, cells)
    assert [(r["kind"], r["backbone"], r["paradigm"]) for r in records] == [
        ("bm25", None, None),
        ("step0", "tiny-s", "sparse"),
        ("step0", "tiny-s", "dense"),
    ]
    for name, mtime in before.items():
        assert (root / BASELINES_DIR / name / "result.json").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (root / BASELINES_DIR).iterdir()) == [
        "bm25",
        "step0__tiny-s__dense",
        "step0__tiny-s__sparse",
    ]
    dense = read_record(root, "step0__tiny-s__dense")
    assert dense == records[2] and dense["name"] == "tiny-s dense step 0"
    assert load_encoder(root / BASELINES_DIR / "step0__tiny-s__dense" / "encoder").paradigm == "dense"
    assert set(dense["metrics"]["synthetic/test"]) == METRIC_NAMES


def test_reference_numbers_on_the_default_synthetic_benchmark(tmp_path: Path) -> None:
    cfg = ExperimentConfig.model_validate({"train": {"output_dir": str(tmp_path)}})
    data = cfg.data  # the defaults are the reference benchmark: seed 0, 2,000 docs, 800 train / 200 test queries
    assert (data.synthetic_seed, data.synthetic_docs, data.synthetic_train_queries) == (0, 2000, 800)
    assert data.synthetic_test_queries == 200
    metrics = evaluate_bm25("synthetic/test", cfg, tmp_path / "bm25")
    assert metrics == pytest.approx(
        {"ndcg@10": 0.7260780647868024, "mrr@10": 0.9576726190476191, "recall@100": 0.7888354234968844}, abs=1e-9
    )
    assert {k: round(v, 3) for k, v in metrics.items()} == {"ndcg@10": 0.726, "mrr@10": 0.958, "recall@100": 0.789}
    run = read_run(tmp_path / "bm25" / "synthetic_test" / "run.trec")
    assert len(run) == 200 and max(len(docs) for docs in run.values()) == 100
    first = (tmp_path / "bm25" / "synthetic_test" / "run.trec").read_text().splitlines()[0].split()
    assert first[:2] == ["test-000001", "Q0"] and first[3] == "1" and first[5] == "bm25"
