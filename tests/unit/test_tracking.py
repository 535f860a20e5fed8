"""MLflow tracking (`retriever.tracking`) on a local SQLite store: the one experiment set-up every stage uses (URI,
artifact location, the experiment-kind tag), runs nested under a parent, and MLflow-safe metric names."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from retriever.config import TrackingConfig
from retriever.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    RunTracker,
    TrackingTarget,
    open_experiment,
    safe_metric_name,
)


def test_disabled_tracking_opens_nothing(tmp_path: Path) -> None:
    assert open_experiment(TrackingConfig(enabled=False), tmp_path) is None
    assert not (tmp_path / "mlflow.db").exists()
    assert not RunTracker.of(None, "some-run").enabled
    assert not RunTracker.of(TrackingTarget("sqlite:///x.db", "1"), None).enabled


def test_the_experiment_is_created_once_in_sqlite_with_its_artifacts_and_kind(tmp_path: Path) -> None:
    target = open_experiment(TrackingConfig(experiment="exp"), tmp_path / "out")
    assert target is not None and target.uri == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=target.uri)
    experiment = client.get_experiment(target.experiment_id)
    assert experiment.name == "exp" and experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert experiment.artifact_location == (tmp_path / "out" / "mlartifacts").resolve().as_uri()
    assert open_experiment(TrackingConfig(experiment="exp"), tmp_path / "out") == target  # opened, not created again

    # An experiment made elsewhere without the tag gets it; one whose kind was chosen keeps it.
    plain = client.create_experiment("plain")
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert open_experiment(TrackingConfig(experiment="plain"), tmp_path / "out").experiment_id == plain
    assert client.get_experiment(plain).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    open_experiment(TrackingConfig(experiment="chosen"), tmp_path / "out")
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"

    # Runs of the experiment: a child nests under its parent; metric names are made MLflow-safe.
    parent = RunTracker.start(target.uri, target.experiment_id, run_name="sweep")
    child = RunTracker.start(target.uri, target.experiment_id, run_name="cell", parent_run_id=parent.run_id)
    child.log_metrics({"synthetic/test/ndcg@10": 0.5}, step=3)
    child.end()
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.info.status == "FINISHED"
    assert run.data.metrics == {"synthetic/test/ndcg_at_10": 0.5}
    assert RunTracker.of(target, parent.run_id).run_id == parent.run_id


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("ndcg@10", "ndcg_at_10"),
        ("mrr@10-l2", "mrr_at_10_l2"),
        ("eval/beir/nq:test/r@1000", "eval/beir/nq:test/r_at_1000"),
    ],
)
def test_metric_names_are_mlflow_safe(name: str, safe: str) -> None:
    assert safe_metric_name(name) == safe
