"""Jobs submitted to a running Ray cluster (`ray start --head` on loopback, its own ports and temp dir) that log to
a real `mlflow server` with proxied artifacts: a sweep, training, indexing and evaluation end SUCCEEDED with their
runs and files in place; a job with a bad config ends FAILED with the config error in its logs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import REPO_ROOT, free_ports, write_experiment

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
# The small experiment, 4 steps, logged to the experiment "jobs".
JOB_SETTINGS = {"budget.max_steps": 4, "train.checkpoint_every": 2, "tracking.experiment": "jobs"}


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass
        assert time.monotonic() < deadline, f"{url} not up after {timeout_s} s: {log.read_text()[-3000:]}"
        time.sleep(1)


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of the group remains."""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (the command and every daemon it started), SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            process.poll()
            if not group_alive(process.pid):
                return
            time.sleep(0.5)


def start_group(command: list[str], flags: dict, env: dict, log: Path) -> subprocess.Popen:
    """This environment's ``command`` with ``flags``, in a process group of its own (see `stop_group`)."""
    argv = [str(BIN / command[0]), *command[1:], *(str(part) for pair in flags.items() for part in pair)]
    return subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def cluster():
    """A Ray head (job API on the dashboard port) and an MLflow server, both on loopback; stopped at the end with
    every process they started (each runs in its own process group)."""
    root = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs, dashboard, client, agent, agent_grpc, env_agent, metrics, node_manager, object_manager, mlflow_port = (
        free_ports(10)
    )
    workers = free_ports(48)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    ray_flags = {
        "--node-ip-address": "127.0.0.1", "--port": gcs, "--dashboard-host": "127.0.0.1",
        "--dashboard-port": dashboard, "--include-dashboard": "true", "--ray-client-server-port": client,
        "--dashboard-agent-listen-port": agent, "--dashboard-agent-grpc-port": agent_grpc,
        "--runtime-env-agent-port": env_agent, "--metrics-export-port": metrics, "--node-manager-port": node_manager,
        "--object-manager-port": object_manager, "--worker-port-list": ",".join(map(str, workers)),
        "--temp-dir": root / "ray", "--num-cpus": 4,
    }  # fmt: skip
    head = start_group(
        ["ray", "start", "--head", "--block", "--disable-usage-stats"], ray_flags, env, root / "ray.log"
    )
    mlflow_flags = {
        "--host": "127.0.0.1", "--port": mlflow_port, "--workers": 1,
        "--backend-store-uri": f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination": root / "artifacts",
    }  # fmt: skip
    mlflow = start_group(["mlflow", "server", "--serve-artifacts"], mlflow_flags, env, root / "mlflow.log")
    try:
        wait_for(f"http://127.0.0.1:{dashboard}/api/version", head, root / "ray.log", 180)
        wait_for(f"http://127.0.0.1:{mlflow_port}/health", mlflow, root / "mlflow.log", 180)
        yield {"root": root, "jobs": f"http://127.0.0.1:{dashboard}", "mlflow": f"http://127.0.0.1:{mlflow_port}"}
    finally:
        stop_group(head)
        stop_group(mlflow)
        shutil.rmtree(root, ignore_errors=True)


def write_config(path: Path, output_dir: Path, **overrides) -> Path:
    return write_experiment(path, **{**JOB_SETTINGS, "train.output_dir": str(output_dir), **overrides})


def submit(client, cluster, entrypoint: str) -> str:
    """As `ray job submit --working-dir . --runtime-env-json '{"env_vars": {...}}' -- ENTRYPOINT` does."""
    return client.submit_job(
        entrypoint=entrypoint,
        runtime_env={
            "working_dir": str(REPO_ROOT),
            "env_vars": {"MLFLOW_TRACKING_URI": cluster["mlflow"], "RETRIEVER_TUNE_VERBOSE": "0"},
        },
    )


def wait_job(client, job_id: str, timeout_s: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return status
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {timeout_s} s"
        time.sleep(2)


def last_json(logs: str) -> dict:
    """The JSON object a command printed last (`retriever train` prints its result)."""
    start = logs.rindex("\n{") + 1
    return json.loads(logs[start : logs.index("\n}", start) + 2])


def test_jobs_on_a_running_cluster_log_to_an_mlflow_server(cluster) -> None:
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    from retriever.config import load_config
    from retriever.data.catalog import resolve_dataset

    root = cluster["root"]
    client = JobSubmissionClient(cluster["jobs"])
    sweep_config = write_config(
        root / "sweep.yaml",
        root / "runs",
        **{
            "sweep.backbones": ["tiny-s"],
            "sweep.paradigms": ["dense"],
            "sweep.losses": ["cl", "kd"],
            "sweep.max_concurrent": 1,
            "sweep.baselines": False,
            "name": "jobs",
        },
    )
    bad_config = write_config(root / "bad.yaml", root / "runs", **{"train.learning_rate": 1e-3})
    train_config = write_config(root / "train.yaml", root / "train", **{"train.num_workers": 1, "name": "one"})

    sweep = submit(client, cluster, f"python -m ray_jobs.sweep {sweep_config}")
    bad = submit(client, cluster, f"python -m ray_jobs.sweep {bad_config}")
    train = submit(client, cluster, f"python -m ray_jobs.train {train_config}")

    assert wait_job(client, bad, 300) == JobStatus.FAILED
    bad_logs = client.get_job_logs(bad)
    assert "learning_rate" in bad_logs and "unknown key" in bad_logs.lower(), bad_logs[-2000:]

    assert wait_job(client, train, 600) == JobStatus.SUCCEEDED, client.get_job_logs(train)[-3000:]
    trained = last_json(client.get_job_logs(train))
    encoder = Path(trained["export_dir"])
    assert trained["steps"] == 4 and (encoder / "encoder.json").is_file()

    dataset = resolve_dataset("synthetic/test", load_config(train_config))
    index = submit(
        client,
        cluster,
        f"python -m ray_jobs.index {encoder} --dataset {dataset} --out {root / 'indexed'} --actors 1 "
        "--cpus-per-actor 0.5",
    )
    evaluate = submit(
        client,
        cluster,
        f"python -m ray_jobs.evaluate {encoder} --dataset synthetic/test --config {train_config} "
        f"--out {root / 'evaluated'}",
    )
    for job in (index, evaluate, sweep):
        assert wait_job(client, job, 600) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
    assert (root / "indexed" / "index").is_dir() and list((root / "indexed" / "encodings").glob("*.parquet"))
    metrics = json.loads((root / "evaluated" / "metrics.json").read_text())
    assert 0.0 <= metrics["datasets"]["synthetic/test"]["metrics"]["ndcg@10"] <= 1.0
    assert "| tiny-s" in client.get_job_logs(sweep)  # the results table, in the job's logs

    # Every run went to the server; artifacts were uploaded over HTTP to its destination, none to local mlartifacts.
    mlflow = MlflowClient(tracking_uri=cluster["mlflow"])
    experiment = mlflow.get_experiment_by_name("jobs")
    runs = mlflow.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("retriever.kind") == "sweep"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.params["loss"] for r in children) == ["cl", "kd"]
    assert trained["tracking_run_id"] in {r.info.run_id for r in runs}
    for run in children:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        assert {"encoder", "eval", "config.yaml"} <= {a.path for a in mlflow.list_artifacts(run.info.run_id)}
        stored = root / "artifacts" / experiment.experiment_id / run.info.run_id / "artifacts" / "config.yaml"
        assert stored.is_file()
    assert not list(root.rglob("mlartifacts"))
