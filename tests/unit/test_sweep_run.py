"""The sweep's parent MLflow run (`retriever.sweep.run`) ends FAILED when the sweep fails and KILLED when it is
interrupted, with the error as its tag; `--resume` reopens it."""

from __future__ import annotations

import pytest
from conftest import make_config
from mlflow.tracking import MlflowClient

from retriever.sweep import run as sweep_run
from retriever.tracking import open_experiment


def test_the_parent_run_ends_failed_or_killed_with_the_error(tmp_path, monkeypatch):
    cfg = make_config(
        tmp_path, "status", tracking={"enabled": True}, sweep={"paradigms": ["sparse"], "baselines": False}
    )
    monkeypatch.setattr(sweep_run, "prepare", lambda cfg: (cfg, []))  # no data or plans: the grid never runs

    def broken_grid(*args, **kwargs):
        raise RuntimeError("the grid broke")

    monkeypatch.setattr(sweep_run, "_run_grid", broken_grid)
    with pytest.raises(RuntimeError, match="the grid broke"):
        sweep_run.run_sweep(cfg)
    target = open_experiment(cfg.tracking, cfg.train.output_dir)
    client = MlflowClient(tracking_uri=target.uri)
    (parent,) = client.search_runs([target.experiment_id])
    assert parent.info.status == "FAILED" and parent.data.tags["error"] == "RuntimeError: the grid broke"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_run, "_run_grid", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep_run.run_sweep(cfg, resume=True)
    (parent,) = client.search_runs([target.experiment_id])
    assert parent.info.status == "KILLED" and parent.data.tags["error"] == "KeyboardInterrupt"
