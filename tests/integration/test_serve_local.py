"""`retriever serve CONFIG --local` as a user starts it: one process, uvicorn, no Ray; stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(300)


def test_serve_local_answers_and_stops_on_sigterm(serving_world, tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "name": "dense",
                        "encoder": str(serving_world["dense"]["encoder"]),
                        "index": str(serving_world["dense"]["index3"]),
                    }
                ],
                "port": port,
                "auth_token_env": "RETRIEVER_LOCAL_TOKEN",
            }
        )
    )
    env = {**os.environ, "RETRIEVER_LOCAL_TOKEN": "local-secret"}
    server = subprocess.Popen(
        [sys.executable, "-m", "retriever", "serve", str(config), "--local"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read()
            try:
                if requests.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        headers = {"Authorization": "Bearer local-secret"}
        response = requests.post(
            url + "/search", json={"query": "ray workers", "k": 4, "model": "dense"}, headers=headers, timeout=30
        )
        assert response.status_code == 200 and len(response.json()["hits"]) == 4
        assert requests.post(url + "/search", json={"query": "ray", "model": "dense"}, timeout=30).status_code == 401
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert server.returncode is not None


def test_serve_refuses_a_missing_token_variable(serving_world, tmp_path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "name": "d",
                        "encoder": str(serving_world["dense"]["encoder"]),
                        "index": str(serving_world["dense"]["index"]),
                    }
                ],
                "auth_token_env": "RETRIEVER_UNSET_TOKEN_VARIABLE",
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "RETRIEVER_UNSET_TOKEN_VARIABLE"}
    result = subprocess.run(
        [sys.executable, "-m", "retriever", "serve", str(config), "--local"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        "auth_token_env is 'RETRIEVER_UNSET_TOKEN_VARIABLE' but that environment variable is not set" in result.stderr
    )
