"""The experiment service end to end on local Ray: a 2-cell sweep with SQLite MLflow, and resuming a sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from retriever.config import load_config
from retriever.sweep import cell_id, collect_cells, run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

SMALL = {
    "backbone": {"name": "tiny-s", "tokenizer": "synthetic", "lora": {"enabled": False}},
    "encoder": {"paradigm": "dense", "query_max_length": 16, "passage_max_length": 48},
    "loss": {"name": "cl", "num_negatives": 3},
    "budget": {"max_steps": 6},
    "train": {"batch_size": 8, "lr": 1e-3, "checkpoint_every": 3, "log_every": 1},
    "data": {"synthetic_docs": 300, "synthetic_train_queries": 120, "synthetic_test_queries": 30},
    "eval": {"datasets": ["synthetic/test"], "batch_size": 64},
}


def write_config(tmp_path: Path, name: str, *, output_dir: str | None = None, **overrides) -> Path:
    data = json.loads(json.dumps(SMALL))
    data["name"] = name
    data["train"]["output_dir"] = output_dir or str(tmp_path / "runs")
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        data.setdefault(section, {})[field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_two_cell_sweep_logs_nested_runs_and_writes_the_report(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    path = write_config(
        tmp_path,
        "two",
        **{
            "sweep.backbones": ["tiny-s"],
            "sweep.paradigms": ["dense"],
            "sweep.losses": ["cl", "kd"],
            "sweep.max_concurrent": 1,
            "train.num_workers": 1,
            "train.cpus_per_worker": 0.5,
        },
    )
    result = run_sweep(load_config(path))
    assert [c["cell"] for c in result.cells] == [cell_id("tiny-s", "dense", "cl"), cell_id("tiny-s", "dense", "kd")]
    assert all(c["status"] == "ok" and c["steps"] == 6 for c in result.cells)

    uri = f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("retriever")
    runs = client.search_runs([experiment.experiment_id])
    parent = client.get_run(result.parent_run_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(children) == 2
    for child in children:
        params = child.data.params
        assert params["paradigm"] == "dense" and params["scale"] == "tiny-s" and params["loss"] in {"cl", "kd"}
        assert params["budget.max_steps"] == "6" and params["train.num_workers"] == "1"
        history = client.get_metric_history(child.info.run_id, "flops")
        assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
        assert history[-1].value == pytest.approx(child.data.metrics["flops"])
        assert 0.0 <= child.data.metrics["synthetic/test/ndcg_at_10"] <= 1.0
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"encoder", "eval", "config.yaml"} <= artifacts
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(result.parent_run_id)} == {"report"}
    report = Path(result.report["markdown"]).read_text()
    assert "tiny-s" in report and "| dense" in report
    versions = client.search_model_versions("name='retriever-dense'")
    assert len(versions) == 1


def test_an_interrupted_sweep_resumes_without_rerunning_finished_cells(tmp_path):
    # Started from tmp_path with a relative output folder, as `retriever quickstart` is: the trials run in Tune's
    # own working directories, yet every cell must write into (and log to the MLflow database of) this one.
    path = write_config(
        tmp_path,
        "resumable",
        output_dir="runs",
        **{
            "sweep.backbones": ["tiny-s"],
            "sweep.paradigms": ["dense", "sparse"],
            "sweep.losses": ["cl", "kd"],
            "sweep.max_concurrent": 1,
            "sweep.cpus_per_trial": 1,
            "budget.max_steps": 30,
        },
    )
    root = tmp_path / "runs" / "sweeps" / "resumable"
    env = {**os.environ, "RETRIEVER_TUNE_VERBOSE": "0"}
    command = [sys.executable, "-m", "retriever", "sweep", str(path)]
    first = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 400
    while time.time() < deadline and not list(root.glob("cells/*/result.json")):
        assert first.poll() is None, first.stderr.read()[-3000:]
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment and stops
    first.wait(timeout=180)
    done_before = {p.parent.name: p.stat().st_mtime for p in root.glob("cells/*/result.json")}
    assert 1 <= len(done_before) < 4

    resumed = subprocess.run(
        [*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    cells = collect_cells(root)
    assert len(cells) == 4 and all(c["status"] == "ok" for c in cells)
    for name, mtime in done_before.items():
        assert (root / "cells" / name / "result.json").stat().st_mtime == mtime
        assert len((root / "cells" / name / "attempts.log").read_text().splitlines()) == 1
    assert "| sparse" in (root / "report" / "results.md").read_text()

    from mlflow.tracking import MlflowClient

    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("mlflow.db")] == [Path("runs/mlflow.db")]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("retriever")
    parents = client.search_runs([experiment.experiment_id], "tags.`retriever.kind` = 'sweep'")
    assert len(parents) == 1
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"
    )
    assert sorted(c.data.params["paradigm"] + "/" + c.data.params["loss"] for c in children) == [
        "dense/cl",
        "dense/kd",
        "sparse/cl",
        "sparse/kd",
    ]
    assert all("synthetic/test/ndcg_at_10" in c.data.metrics for c in children)
