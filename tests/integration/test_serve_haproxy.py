"""`retriever serve CONFIG` as a user starts it, on a Ray of its own with the HAProxy ingress: answers on the
configured port like batch search, binds loopback only, stops on SIGTERM with nothing left behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import requests
import yaml

from retriever.index import search_to_run
from tests.conftest import REPO_ROOT, SERVE_QUERIES, free_port, search_during_fault

pytestmark = [
    pytest.mark.timeout(420),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed (.ci/run installs it)"),
]


def listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(ip, port, process name) of every TCP socket the processes ``pids`` listen on."""
    found = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            found.append((conn.laddr.ip, conn.laddr.port, psutil.Process(conn.pid).name()))
    return found


def post(url: str, query: str) -> requests.Response:
    return requests.post(url + "/search", json={"query": query, "k": 10, "model": "sparse"}, timeout=60)


def replica_process(server: subprocess.Popen, deployment: str, not_pid: int | None = None) -> psutil.Process | None:
    """The live process of the (one) replica of ``deployment`` under the service ``server``."""
    for pid in tree(psutil.Process(server.pid)):
        try:
            process = psutil.Process(pid)
            if f":{deployment}" in process.name() and pid != not_pid and process.status() != "zombie":
                return process
        except psutil.NoSuchProcess:
            continue
    return None


def tree(process: psutil.Process) -> set[int]:
    try:
        return {process.pid, *(child.pid for child in process.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def test_serve_with_haproxy_ingress_answers_on_loopback_and_stops_cleanly(serving_world, tmp_path) -> None:
    port = free_port()
    config = tmp_path / "serve.yaml"
    models = [
        {"name": p, "encoder": str(serving_world[p]["encoder"]), "index": str(serving_world[p]["index3"])}
        for p in ("sparse", "dense")
    ]
    settings = {
        "models": models,
        "port": port,
        "ingress": "haproxy",
        "encoder": {"num_cpus": 0.2},
        "shards": {"num_cpus": 0.1},
        "router": {"num_cpus": 0.2},
    }
    config.write_text(yaml.safe_dump(settings))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "retriever", "serve", str(config)],
        cwd=REPO_ROOT,
        env=env,
        stdout=(tmp_path / "serve.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if requests.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # HAProxy may accept before the router is up
                pass
            assert time.monotonic() < deadline, "not healthy after 300 s"
            time.sleep(1)
        started = tree(psutil.Process(server.pid))
        for paradigm in ("sparse", "dense"):
            expected = search_to_run(serving_world[paradigm]["index3"], serving_world[paradigm]["queries"], 10)
            for qid, query in enumerate(SERVE_QUERIES):
                response = requests.post(
                    url + "/search", json={"query": query, "k": 10, "model": paradigm}, timeout=60
                )
                assert response.status_code == 200, response.text
                hits = response.json()["hits"]
                want = list(expected[f"q{qid}"].items())
                assert [h["docid"] for h in hits] == [d for d, _ in want]
                np.testing.assert_allclose([h["score"] for h in hits], [s for _, s in want], rtol=0, atol=1e-5)
        # Serve's throughput mode sends the router's calls over gRPC: a shard replica's process killed under load
        # is restarted, and no answer meanwhile is a wrong or silently partial top-k.
        expected = {query: [h["docid"] for h in post(url, query).json()["hits"]] for query in SERVE_QUERIES}
        victim = replica_process(server, "sparse--shard-00001")
        outcomes, healed = search_during_fault(
            lambda query: post(url, query),
            expected,
            victim.kill,
            lambda: (
                replica_process(server, "sparse--shard-00001", not_pid=victim.pid) is not None
                and post(url, SERVE_QUERIES[0]).status_code == 200
            ),
        )
        print(f"load during the replica kill: {outcomes}")
        assert healed, "Serve did not restart the killed shard replica within 120 s"
        assert outcomes["wrong"] == 0 and outcomes["other"] == 0, outcomes
        assert outcomes["ok"] > 0
        started = tree(psutil.Process(server.pid))  # now: HAProxy is restarted as replicas come up
        sockets = listening(started)
        # HAProxy holds the configured port; the router replica serves HTTP itself on a port of its own.
        assert any(p == port and name == "haproxy" for _, p, name in sockets), sockets
        assert any(30000 <= p <= 31000 for _, p, _ in sockets), sockets
        exposed = [(ip, p, name) for ip, p, name in sockets if p == port or 30000 <= p <= 31000]
        assert all(ip == "127.0.0.1" for ip, _, _ in exposed), exposed
        deadline = time.monotonic() + 120  # the command reports once Serve calls the application RUNNING
        while "ingress: haproxy" not in (tmp_path / "serve.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(1)
    finally:
        began = time.monotonic()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        stopped_in = time.monotonic() - began
        leftover = [p for p in map(psutil.Process, filter(psutil.pid_exists, started)) if p.status() != "zombie"]
        for process in leftover:
            process.kill()
    assert server.returncode == 0, (tmp_path / "serve.log").read_text()
    assert not leftover, [p.name() for p in leftover]
    assert stopped_in < 90
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind (closed connections may linger)
        s.bind(("127.0.0.1", port))  # nothing listens on the port any more
