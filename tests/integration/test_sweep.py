"""The experiment service end to end on local Ray: a 2-cell sweep with SQLite MLflow, resuming a sweep, and the
console of a sweep with a failing cell."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from retriever.config import load_config
from retriever.records import cell_id, collect_cells
from retriever.sweep.run import run_sweep
from tests.conftest import write_experiment

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

# Two CL/KD cells of tiny-s dense, one at a time on one CPU.
ONE_CELL_AT_A_TIME = {
    "sweep.backbones": ["tiny-s"],
    "sweep.paradigms": ["dense"],
    "sweep.losses": ["cl", "kd"],
    "sweep.max_concurrent": 1,
    "sweep.cpus_per_trial": 1,
}


def write_config(tmp_path: Path, name: str, *, output_dir: str | None = None, **overrides) -> Path:
    output_dir = output_dir or str(tmp_path / "runs")
    return write_experiment(tmp_path / f"{name}.yaml", name=name, **{"train.output_dir": output_dir, **overrides})


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
    # The baselines: BM25 and the untrained tiny-s dense encoder, as rows of the table and metrics of the parent.
    assert "BM25" in report and "step 0" in report
    assert parent.data.metrics["baseline/bm25/synthetic_test/ndcg_at_10"] > 0.3
    step0 = json.loads((result.directory / "baselines" / "step0__tiny-s__dense" / "result.json").read_text())
    assert step0["kind"] == "step0" and step0["flops"] == 0
    assert 0.0 <= step0["metrics"]["synthetic/test"]["ndcg@10"] <= 1.0
    assert (result.directory / "report" / "findings.md").is_file()
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
            **ONE_CELL_AT_A_TIME,
            "sweep.paradigms": ["dense", "sparse"],
            "sweep.baselines": False,
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


@pytest.mark.timeout(480)
def test_the_console_shows_progress_and_cells_while_tune_output_goes_to_files(tmp_path):
    from retriever.train.loop import FAIL_ONCE_ENV

    path = write_config(
        tmp_path,
        "console",
        output_dir="runs",
        **{
            **ONE_CELL_AT_A_TIME,
        },
    )
    # The first cell (cl) fails at step 2; the second one finishes.
    env = {**os.environ, FAIL_ONCE_ENV: f"2:{tmp_path / 'failed-once'}"}
    env.pop("RETRIEVER_TUNE_VERBOSE", None)
    run = subprocess.run(
        [sys.executable, "-m", "retriever", "sweep", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert run.returncode == 1, run.stderr[-3000:]  # a cell failed
    console = run.stdout + run.stderr
    cells = tmp_path / "runs" / "sweeps" / "console" / "cells"
    assert re.search(r"\[sweep console\] 0/2 done, 0 failed \| running: tiny-s dense cl \(\w+", run.stderr)
    failed = "✗ tiny-s dense cl  failed: RuntimeError: injected failure at step 2"
    assert f"{failed} (rank 0)  (log: runs/sweeps/console/cells/tiny-s__dense__cl/trial.log)" in run.stderr
    assert re.search(r"✓ tiny-s dense kd  nDCG@10 [01]\.\d{3}  \d\.\de\d+ FLOPs  (\d+m)?\d+s", run.stderr)
    assert re.search(r"\n\[sweep console\] finished in \d+s: 1/2 done, 1 failed\n", run.stderr)
    for tune_output in ("Trial status", "│ Trial name", "started with configuration", "Traceback"):
        assert tune_output not in console
    assert "| tiny-s" in run.stdout  # the results table comes after the progress
    assert "Trial status" in (cells.parents[0] / "tune.log").read_text()
    assert "RuntimeError: injected failure at step 2" in (cells / "tiny-s__dense__cl" / "trial.log").read_text()


def test_bow_stages_run_as_ray_tasks_before_the_grid_and_every_cell_continues_its_pair(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    path = write_config(
        tmp_path,
        "staged",
        **{
            "sweep.backbones": ["tiny-s"],
            "sweep.paradigms": ["sparse", "dense"],
            "sweep.losses": ["cl"],
            "sweep.cpus_per_trial": 0.5,
            "bow.enabled": True,
            "bow.steps": 3,
            "bow.batch_size": 8,
        },
    )
    result = run_sweep(load_config(path))
    assert all(c["status"] == "ok" for c in result.cells)
    state = json.loads((result.directory / "sweep.json").read_text())
    stages = {(s["backbone"], s["paradigm"]): s for s in state["pretrain"]}
    assert set(stages) == {("tiny-s", "sparse"), ("tiny-s", "dense")}
    assert all(s["task"] == "bow" and s["steps"] == 3 and s["kind"] == "weights" for s in stages.values())
    for paradigm in ("sparse", "dense"):
        product = stages[("tiny-s", paradigm)]["product"]
        assert product.endswith(f"staged-bow-tiny-s-{paradigm}/bow")
        cell = yaml.safe_load(
            (result.directory / "cells" / cell_id("tiny-s", paradigm, "cl") / "config.yaml").read_text()
        )
        assert cell["backbone"]["init_weights"] == product
        step0 = json.loads((result.directory / "baselines" / f"step0__tiny-s__{paradigm}" / "result.json").read_text())
        assert step0["kind"] == "step0"
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}")
    metrics = client.get_run(result.parent_run_id).data.metrics
    assert metrics["pretrain/tiny_s/sparse/bow/steps"] == 3 and metrics["pretrain/tiny_s/dense/bow/flops"] > 0


@pytest.mark.timeout(120)
def test_the_flop_stopper_stops_a_trial_that_reports_more_than_the_budget(ray_cluster, tmp_path):
    from ray import tune

    from retriever.sweep.tune import FlopStopper, tune_stopper

    budget = 1e6

    def trainable(config):
        # Real workers stop at the budget themselves: one trial reports an over-budget count at its third step.
        for step in range(1, 11):
            tune.report({"flops": 2 * budget if step == config["over_at"] else budget * step / 10})

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 0.1}),
        param_space={"over_at": tune.grid_search([3, 0])},
        run_config=tune.RunConfig(
            name="stopper", storage_path=str(tmp_path), stop=tune_stopper(FlopStopper(budget)), verbose=0
        ),
    )
    results = {result.config["over_at"]: result.metrics for result in tuner.fit()}
    assert results[3]["training_iteration"] == 3 and results[3]["flops"] == 2 * budget
    assert results[0]["training_iteration"] == 10 and results[0]["flops"] == budget  # at the budget: not stopped
