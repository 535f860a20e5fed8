"""Jobs submitted to a running Ray cluster (`ray start --head` on loopback, its own ports and temp dir) that log to
a real `mlflow server` with proxied artifacts: a sweep, training, indexing and evaluation end SUCCEEDED with their
runs and files in place; a job with a bad config ends FAILED with the config error in its logs. A real Prometheus
scrapes the cluster through `dashboards/prometheus.yml` while the jobs and then a Serve deployment run: every query
of every panel of `dashboards/` returns data."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import REPO_ROOT, SERVE_QUERIES, free_ports, stop_group, write_experiment

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


def start_group(command: list[str], flags: dict, env: dict, log: Path) -> subprocess.Popen:
    """This environment's ``command`` with ``flags``, in a process group of its own (see `stop_group`)."""
    argv = [str(BIN / command[0]), *command[1:], *(str(part) for pair in flags.items() for part in pair)]
    return subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def prometheus_config(root: Path, discovery_file: Path) -> Path:
    """`dashboards/prometheus.yml` for this cluster: its temp dir's discovery file, scraped every second."""
    config = yaml.safe_load((REPO_ROOT / "dashboards" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"] == [{"files": ["/tmp/ray/prom_metrics_service_discovery.json"]}]
    job["file_sd_configs"] = [{"files": [str(discovery_file)]}]
    path = root / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def cluster():
    """A Ray head (job API on the dashboard port), an MLflow server and a Prometheus, all on loopback; stopped at the
    end with every process they started (each runs in its own process group)."""
    root = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths have a length limit
    # One call: ports drawn in separate calls can repeat, and Ray refuses a port given to two of its components.
    ports = free_ports(12 + 48)
    gcs, dashboard, client, agent, agent_grpc, env_agent, metrics, node_manager, object_manager = ports[:9]
    mlflow_port, prometheus_port, serve_port, workers = ports[9], ports[10], ports[11], ports[12:]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # Every process of the cluster sends its metrics to the node's exporter each second (Ray's default: 10 s).
    ray_env = {**env, "RAY_metrics_report_interval_ms": "1000"}
    ray_flags = {
        "--node-ip-address": "127.0.0.1", "--port": gcs, "--dashboard-host": "127.0.0.1",
        "--dashboard-port": dashboard, "--include-dashboard": "true", "--ray-client-server-port": client,
        "--dashboard-agent-listen-port": agent, "--dashboard-agent-grpc-port": agent_grpc,
        "--runtime-env-agent-port": env_agent, "--metrics-export-port": metrics, "--node-manager-port": node_manager,
        "--object-manager-port": object_manager, "--worker-port-list": ",".join(map(str, workers)),
        "--temp-dir": root / "ray", "--num-cpus": 4,
    }  # fmt: skip
    head = start_group(
        ["ray", "start", "--head", "--block", "--disable-usage-stats"], ray_flags, ray_env, root / "ray.log"
    )
    mlflow_flags = {
        "--host": "127.0.0.1", "--port": mlflow_port, "--workers": 1,
        "--backend-store-uri": f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination": root / "artifacts",
    }  # fmt: skip
    mlflow = start_group(["mlflow", "server", "--serve-artifacts"], mlflow_flags, env, root / "mlflow.log")
    prometheus = None
    try:
        wait_for(f"http://127.0.0.1:{dashboard}/api/version", head, root / "ray.log", 180)
        wait_for(f"http://127.0.0.1:{mlflow_port}/health", mlflow, root / "mlflow.log", 180)
        if shutil.which("prometheus"):
            prometheus_flags = {
                "--config.file": prometheus_config(root, root / "ray" / "prom_metrics_service_discovery.json"),
                "--storage.tsdb.path": root / "prometheus",
                "--web.listen-address": f"127.0.0.1:{prometheus_port}",
            }
            prometheus = start_group([shutil.which("prometheus")], prometheus_flags, env, root / "prometheus.log")
            wait_for(f"http://127.0.0.1:{prometheus_port}/-/ready", prometheus, root / "prometheus.log", 120)
        yield {
            "root": root,
            "jobs": f"http://127.0.0.1:{dashboard}",
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
            "prometheus": f"http://127.0.0.1:{prometheus_port}" if prometheus else None,
            "started": time.time(),
            "serve_port": serve_port,
        }
    finally:
        for process in (head, mlflow, prometheus):
            if process is not None:
                stop_group(process)
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


@pytest.fixture(scope="module")
def jobs(cluster) -> dict:
    """A 2-cell sweep, a training, a job with a bad config, then indexing and evaluation with the trained encoder,
    submitted as a user does and waited for; their statuses, logs and outputs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from retriever.config import load_config
    from retriever.data.catalog import resolve_dataset, resolve_references
    from retriever.flops import plan_cell

    root = cluster["root"]
    client = JobSubmissionClient(cluster["jobs"])
    # The sweep's cells stop at a FLOP budget of 4.5 steps of its CL cell (the dashboards show FLOPs vs budget).
    probe = resolve_references(load_config(write_config(root / "probe.yaml", root / "runs")))
    flops_per_step = plan_cell(probe).flops_per_step
    sweep_config = write_config(
        root / "sweep.yaml",
        root / "runs",
        **{
            "budget.flops": 4.5 * flops_per_step,
            "budget.max_steps": None,
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

    ids = {
        "sweep": submit(client, cluster, f"python -m ray_jobs.sweep {sweep_config}"),
        "bad": submit(client, cluster, f"python -m ray_jobs.sweep {bad_config}"),
        "train": submit(client, cluster, f"python -m ray_jobs.train {train_config}"),
    }
    status = {"bad": wait_job(client, ids["bad"], 300), "train": wait_job(client, ids["train"], 600)}
    assert status["train"] == JobStatus.SUCCEEDED, client.get_job_logs(ids["train"])[-3000:]
    trained = last_json(client.get_job_logs(ids["train"]))
    encoder = Path(trained["export_dir"])
    dataset = resolve_dataset("synthetic/test", load_config(train_config))
    ids["index"] = submit(
        client,
        cluster,
        f"python -m ray_jobs.index {encoder} --dataset {dataset} --out {root / 'indexed'} --actors 1 "
        "--cpus-per-actor 0.5",
    )
    ids["evaluate"] = submit(
        client,
        cluster,
        f"python -m ray_jobs.evaluate {encoder} --dataset synthetic/test --config {train_config} "
        f"--out {root / 'evaluated'}",
    )
    for name in ("index", "evaluate", "sweep"):
        status[name] = wait_job(client, ids[name], 600)
    logs = {name: client.get_job_logs(job) for name, job in ids.items()}
    return {"client": client, "status": status, "logs": logs, "trained": trained, "encoder": encoder}


def test_jobs_on_a_running_cluster_log_to_an_mlflow_server(cluster, jobs) -> None:
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus

    root, status, logs, trained = cluster["root"], jobs["status"], jobs["logs"], jobs["trained"]
    assert status["bad"] == JobStatus.FAILED
    assert "learning_rate" in logs["bad"] and "unknown key" in logs["bad"].lower(), logs["bad"][-2000:]
    assert trained["steps"] == 4 and (jobs["encoder"] / "encoder.json").is_file()
    for name in ("index", "evaluate", "sweep"):
        assert status[name] == JobStatus.SUCCEEDED, logs[name][-3000:]
    assert (root / "indexed" / "index").is_dir() and list((root / "indexed" / "encodings").glob("*.parquet"))
    metrics = json.loads((root / "evaluated" / "metrics.json").read_text())
    assert 0.0 <= metrics["datasets"]["synthetic/test"]["metrics"]["ndcg@10"] <= 1.0
    assert "| tiny-s" in logs["sweep"]  # the results table, in the job's logs

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


def panel_queries() -> list[tuple[str, str]]:
    """(dashboard and panel title, PromQL) of every target of every dashboard, as Grafana sends it with every
    variable on "All" and a 30 s rate window."""
    queries = []
    for path in sorted((REPO_ROOT / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", "30s")
                queries.append((f"{path.name}: {panel['title']}", re.sub(r"\$\w+", ".*", expr)))
    return queries


def empty_panels(prometheus: str, since: float) -> list[str]:
    """The queries with no series at any time since `since` (a range query, as a dashboard's graph asks)."""
    empty = []
    for title, expr in panel_queries():
        params = {"query": expr, "start": since, "end": time.time(), "step": 2}
        answer = requests.get(f"{prometheus}/api/v1/query_range", params=params, timeout=30).json()
        assert answer["status"] == "success", (title, expr, answer)
        if not answer["data"]["result"]:
            empty.append(f"{title}: {expr}")
    return empty


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (.ci/run installs it)")
def test_prometheus_scraping_the_cluster_has_data_for_every_dashboard_panel(cluster, jobs) -> None:
    from ray.job_submission import JobStatus

    root, client = cluster["root"], jobs["client"]
    port = cluster["serve_port"]
    serve_config = root / "serve.yaml"
    settings = {
        "models": [{"name": "one", "encoder": str(jobs["encoder"]), "index": str(root / "indexed" / "index")}],
        "port": port,
        "encoder": {"num_cpus": 0.2},
        "shards": {"num_cpus": 0.1},
        "router": {"num_cpus": 0.2},
    }
    serve_config.write_text(yaml.safe_dump(settings))
    serve = submit(client, cluster, f"python -m ray_jobs.serve {serve_config}")
    assert wait_job(client, serve, 300) == JobStatus.SUCCEEDED, client.get_job_logs(serve)[-3000:]

    # A short load: searches, and requests that fail (an unknown model) for the error panel.
    url = f"http://127.0.0.1:{port}/search"
    deadline, answered = time.monotonic() + 15, 0
    while time.monotonic() < deadline:
        for query in SERVE_QUERIES:
            answered += requests.post(url, json={"query": query, "model": "one"}, timeout=30).status_code == 200
        assert requests.post(url, json={"query": "x", "model": "nope"}, timeout=30).status_code >= 400
    assert answered > 0

    deadline = time.monotonic() + 90
    while empty := empty_panels(cluster["prometheus"], cluster["started"]):
        assert time.monotonic() < deadline, "panels without data:\n" + "\n".join(empty)
        time.sleep(3)
