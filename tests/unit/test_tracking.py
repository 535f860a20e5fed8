"""MLflow tracking (`retriever.tracking`) on a local SQLite store: the one experiment set-up every stage uses (URI,
artifact location, the experiment-kind tag), runs nested under a parent, MLflow-safe metric names, and runs that
end FAILED or KILLED with their error."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from retriever.config import TrackingConfig
from retriever.tracking import (
    ERROR_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    RunTracker,
    TrackingTarget,
    artifact_location,
    end_running_runs,
    open_experiment,
    safe_metric_name,
    status_for,
    tracking_uri,
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


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite store for the tests below (creating one takes a second): each uses its own experiment."""
    return tmp_path_factory.mktemp("mlflow")


def test_a_job_that_loses_the_race_to_create_the_experiment_joins_it(tmp_path: Path, monkeypatch) -> None:
    # Two jobs starting together both look the experiment up before either creates it.
    winner = open_experiment(TrackingConfig(experiment="race"), tmp_path / "out")
    assert winner is not None
    real_lookup = MlflowClient.get_experiment_by_name
    lookups = []

    def lookup_that_came_too_early(self, name):
        lookups.append(name)
        return None if len(lookups) == 1 else real_lookup(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", lookup_that_came_too_early)
    assert open_experiment(TrackingConfig(experiment="race"), tmp_path / "out") == winner
    assert lookups == ["race", "race"]


def test_the_tracking_uri_comes_from_the_config_then_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri(TrackingConfig(), tmp_path) == "http://mlflow.internal:5000"
    assert tracking_uri(TrackingConfig(tracking_uri="sqlite:///other.db"), tmp_path) == "sqlite:///other.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(TrackingConfig(), tmp_path) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"


def test_a_tracking_server_keeps_the_artifacts_unless_configured(tmp_path: Path) -> None:
    # The server's default artifact root (`mlflow-artifacts:/` with --serve-artifacts): uploads go over HTTP.
    assert artifact_location(TrackingConfig(), tmp_path, "http://127.0.0.1:5000") is None
    assert not (tmp_path / "mlartifacts").exists()
    configured = TrackingConfig(artifact_location="s3://bucket/mlflow")
    assert artifact_location(configured, tmp_path, "http://127.0.0.1:5000") == "s3://bucket/mlflow"
    assert artifact_location(TrackingConfig(), tmp_path, "sqlite:///x.db") == (tmp_path / "mlartifacts").as_uri()


def test_a_failed_or_interrupted_run_ends_with_its_status_and_error(store: Path) -> None:
    target = open_experiment(TrackingConfig(experiment="status"), store)
    client = MlflowClient(tracking_uri=target.uri)
    failed = RunTracker.start(target.uri, target.experiment_id, run_name="failed")
    failed.fail(ValueError("bad batch"))
    killed = RunTracker.start(target.uri, target.experiment_id, run_name="killed")
    killed.fail(KeyboardInterrupt())
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert client.get_run(failed.run_id).data.tags[ERROR_TAG] == "ValueError: bad batch"
    assert client.get_run(killed.run_id).info.status == "KILLED"
    assert status_for(SystemExit(143)) == "KILLED" and status_for(RuntimeError()) == "FAILED"
    # Resumed, the run is RUNNING again and the error is kept as the previous attempt's.
    again = RunTracker.start(target.uri, target.experiment_id, run_name="failed", run_id=failed.run_id)
    run = client.get_run(again.run_id)
    assert run.info.status == "RUNNING" and ERROR_TAG not in run.data.tags
    assert run.data.tags["previous_error"] == "ValueError: bad batch"
    RunTracker.disabled().fail(RuntimeError("nothing to end"))  # a no-op without tracking


def test_the_last_logged_step_of_a_metric(store: Path) -> None:
    target = open_experiment(TrackingConfig(experiment="steps"), store)
    run = RunTracker.start(target.uri, target.experiment_id, run_name="steps")
    assert run.last_step("loss/total") == 0
    for step in (1, 2, 3):
        run.log_metrics({"loss/total": 1.0 / step, "ndcg@10": 0.1}, step=step)
    assert run.last_step("loss/total") == 3 and run.last_step("ndcg@10") == 3
    assert RunTracker.disabled().last_step("loss/total") == 0


def test_runs_left_running_by_a_killed_process_are_ended_by_name_and_parent(store: Path) -> None:
    target = open_experiment(TrackingConfig(experiment="orphans"), store)
    client = MlflowClient(tracking_uri=target.uri)
    parent = RunTracker.start(target.uri, target.experiment_id, run_name="sweep")
    orphan = RunTracker.start(target.uri, target.experiment_id, run_name="cell", parent_run_id=parent.run_id)
    other_name = RunTracker.start(target.uri, target.experiment_id, run_name="cell-2", parent_run_id=parent.run_id)
    no_parent = RunTracker.start(target.uri, target.experiment_id, run_name="cell")
    done = RunTracker.start(target.uri, target.experiment_id, run_name="cell", parent_run_id=parent.run_id)
    done.end()
    ended = end_running_runs(target, "cell", parent.run_id, RuntimeError("rank 1 died"))
    assert ended == [orphan.run_id]
    assert client.get_run(orphan.run_id).info.status == "FAILED"
    assert client.get_run(orphan.run_id).data.tags[ERROR_TAG] == "RuntimeError: rank 1 died"
    for untouched, status in ((other_name, "RUNNING"), (no_parent, "RUNNING"), (done, "FINISHED")):
        assert client.get_run(untouched.run_id).info.status == status
    assert end_running_runs(target, "cell", None, KeyboardInterrupt()) == [no_parent.run_id]
    assert client.get_run(no_parent.run_id).info.status == "KILLED"
