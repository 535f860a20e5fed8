"""Which Serve ingress `retriever serve` starts, and the refusals that come before any Ray starts."""

from __future__ import annotations

import pytest

from retriever.config import ServeConfig
from retriever.errors import UserError
from retriever.serving.launch import HAPROXY_BINARY_ENV, ingress_environment, serve_on_ray


def settings(**values) -> ServeConfig:
    return ServeConfig.model_validate({"models": [{"name": "m", "encoder": "e", "index": "i"}], **values})


@pytest.fixture
def no_haproxy(monkeypatch, tmp_path):
    monkeypatch.delenv(HAPROXY_BINARY_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no haproxy on the path


@pytest.fixture
def haproxy(monkeypatch, tmp_path) -> str:
    binary = tmp_path / "haproxy"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.delenv(HAPROXY_BINARY_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    return str(binary)


def test_auto_is_haproxy_when_installed(haproxy) -> None:
    ingress, environment = ingress_environment("auto")
    assert ingress == "haproxy"
    assert environment == {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        HAPROXY_BINARY_ENV: haproxy,
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


def test_auto_falls_back_to_the_python_proxy_without_haproxy(no_haproxy) -> None:
    assert ingress_environment("auto") == ("proxy", {})
    assert ingress_environment("proxy") == ("proxy", {})


def test_the_binary_can_be_named_by_environment(no_haproxy, monkeypatch) -> None:
    monkeypatch.setenv(HAPROXY_BINARY_ENV, "/opt/haproxy/sbin/haproxy")
    ingress, environment = ingress_environment("haproxy")
    assert ingress == "haproxy" and environment[HAPROXY_BINARY_ENV] == "/opt/haproxy/sbin/haproxy"


def test_haproxy_asked_for_but_missing_is_refused(no_haproxy) -> None:
    with pytest.raises(UserError, match=r"ingress=haproxy needs the `haproxy` binary \(apt-get install haproxy"):
        ingress_environment("haproxy")


def test_an_ingress_cannot_be_chosen_for_a_running_cluster(haproxy) -> None:
    with pytest.raises(UserError, match="a running cluster's ingress is set where the cluster starts"):
        serve_on_ray(settings(ingress="haproxy"), [], address="ray://cluster:10001")


def test_each_haproxy_ingress_gets_its_own_files_and_ports() -> None:
    from pathlib import Path

    from retriever.serving.launch import haproxy_instance_environment

    first, second = haproxy_instance_environment(), haproxy_instance_environment()
    for env in (first, second):
        folder = Path(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
        assert folder.is_dir() and folder.name.startswith("haproxy-serve-")
        assert Path(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent == folder
        assert Path(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent == folder
        assert len(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]) < 100  # under the socket path limit
    assert first["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] != second["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    for env in (first, second):  # free ports, not Ray's fixed 8404 and 9101
        ports = {env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]}
        assert len(ports) == 2 and not ports & {"8404", "9101"}


@pytest.mark.parametrize(
    ("environment", "grpc"),
    [
        ({}, False),
        ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, True),
        ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}, False),
        ({"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}, True),
    ],
)
def test_router_calls_go_over_grpc_exactly_in_serves_throughput_mode(monkeypatch, environment, grpc) -> None:
    from retriever.serving.deployments import handle_transport

    for name in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_USE_GRPC_BY_DEFAULT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert handle_transport() == {"_by_reference": not grpc}


def test_the_haproxy_ingress_environment_gives_the_router_grpc_calls(haproxy, monkeypatch) -> None:
    monkeypatch.delenv("RAY_SERVE_USE_GRPC_BY_DEFAULT", raising=False)
    for name, value in ingress_environment("haproxy")[1].items():
        monkeypatch.setenv(name, value)
    from retriever.serving.deployments import handle_transport

    assert handle_transport() == {"_by_reference": False}
