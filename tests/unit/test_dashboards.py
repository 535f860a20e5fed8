"""`dashboards/`: the JSON matches its generator, every query names a metric that is recorded, the scrape config
finds Ray's nodes through its service-discovery file (a live Prometheus runs the queries: tests/integration)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from retriever import telemetry
from tests.conftest import REPO_ROOT

DASHBOARDS = REPO_ROOT / "dashboards"
# Ray Serve's own metrics that the serving dashboard reads (recorded by Serve, not by this project).
RAY_SERVE_SERIES = {
    "ray_serve_deployment_processing_latency_ms_bucket",
    "ray_serve_deployment_replica_healthy",
    "ray_serve_replica_processing_queries",
}


def load_generator():
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_the_json_files_are_what_the_generator_writes(tmp_path, capsys):
    generator = load_generator()
    assert generator.main(["--check"]) == 0, capsys.readouterr().out
    assert sorted(p.name for p in DASHBOARDS.glob("*.json")) == sorted(generator.DASHBOARDS)
    # And the check notices a stale file.
    (tmp_path / "sweep.json").write_text("{}")
    assert generator.main(["--check", "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize("name", ["sweep.json", "serving.json"])
def test_every_query_reads_a_recorded_metric(name):
    dashboard = json.loads((DASHBOARDS / name).read_text())
    ours = {m.series for m in telemetry.METRICS}
    ours |= {m.sample(part) for m in telemetry.METRICS if m.kind == "histogram" for part in ("sum", "count")}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bray_[a-z0-9_]+", target["expr"]))
            assert names and names <= ours | RAY_SERVE_SERIES, (panel["title"], names - ours - RAY_SERVE_SERIES)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", json.dumps([p["targets"] for p in panels(dashboard)]))) - {"__rate_interval"}
    assert used <= variables and "datasource" in variables


def test_the_dashboards_cover_the_sweep_and_serving_views():
    sweep = {p["title"] for p in panels(json.loads((DASHBOARDS / "sweep.json").read_text()))}
    serving = {p["title"] for p in panels(json.loads((DASHBOARDS / "serving.json").read_text()))}
    assert {"Cells by state", "FLOPs vs budget per cell", "Loss", "Tokens per second"} <= sweep
    assert {"Requests per second", "Errors per second", "Stage latency", "Healthy replicas", "Batch size"} <= serving


def test_the_scrape_config_reads_rays_service_discovery_file(tmp_path):
    config = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"] == [{"files": ["/tmp/ray/prom_metrics_service_discovery.json"]}]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    result = subprocess.run([promtool, "check", "config", str(DASHBOARDS / "prometheus.yml")], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
