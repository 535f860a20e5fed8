"""Ray Serve for real (`serve.run` on local Ray, loopback HTTP): parity with batch search, batching and
multiplexing on real replicas, bad input, schemathesis against the live schema, a shard replica killed under load,
the search page in headless Chromium and the `retriever query` client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from retriever.index import search_to_run
from tests.conftest import REPO_ROOT, SERVE_QUERIES, free_port, search_during_fault

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

APP = "retriever-test"
TOKEN_ENV = "RETRIEVER_TEST_SERVE_TOKEN"
TOKEN = "integration-token-1234"
ARTIFACTS = REPO_ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def served(ray_cluster, serving_world):
    """The app on local Ray: sparse over the 3-shard index, dense over the 1-shard index, bearer token on."""
    from ray import serve

    from retriever.config import ServeConfig
    from retriever.serving.catalog import build_catalog
    from retriever.serving.deployments import build_app, wait_until_running

    os.environ[TOKEN_ENV] = TOKEN
    port = free_port()
    settings = ServeConfig.model_validate(
        {
            "models": [
                {
                    "name": "sparse",
                    "encoder": str(serving_world["sparse"]["encoder"]),
                    "index": str(serving_world["sparse"]["index3"]),
                    "corpus": serving_world["corpus"],
                },
                {
                    "name": "dense",
                    "encoder": str(serving_world["dense"]["encoder"]),
                    "index": str(serving_world["dense"]["index"]),
                    "corpus": serving_world["corpus"],
                },
            ],
            "port": port,
            "app_name": APP,
            "auth_token_env": TOKEN_ENV,
            "shard_timeout_s": 10.0,  # generous: a loaded 2-core CI machine, not what is tested here
            "encoder_timeout_s": 20.0,
            "encoder": {"num_cpus": 0.2},
            "shards": {"num_cpus": 0.1},
            "router": {"num_cpus": 0.2},
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 30})
    serve.run(build_app(settings, build_catalog(settings)), name=APP, route_prefix="/", blocking=False)
    wait_until_running(APP, 240)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "session": session, "settings": settings}
    serve.shutdown()


def search(served, **body) -> requests.Response:
    return served["session"].post(served["url"] + "/search", json=body, timeout=30)


@pytest.mark.parametrize(("model", "index"), [("sparse", "index3"), ("dense", "index")])
def test_search_over_http_matches_batch_search(served, serving_world, model, index) -> None:
    expected = search_to_run(serving_world[model][index], serving_world[model]["queries"], 10)
    for qid, query in enumerate(SERVE_QUERIES):
        response = search(served, query=query, k=10, model=model)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["partial"] is False and body["model"] == model
        want = list(expected[f"q{qid}"].items())
        assert [h["docid"] for h in body["hits"]] == [d for d, _ in want]
        np.testing.assert_allclose([h["score"] for h in body["hits"]], [s for _, s in want], rtol=0, atol=1e-5)


def test_concurrent_requests_are_batched_and_both_models_share_one_encoder(served) -> None:
    from ray import serve

    bodies = [{"query": SERVE_QUERIES[i % 6], "k": 5, "model": ["sparse", "dense"][i % 2]} for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda b: search(served, **b), bodies))
    assert [r.status_code for r in responses] == [200] * 48
    encoder = serve.get_deployment_handle("QueryEncoder", APP).stats.remote().result(timeout_s=30)
    router = serve.get_deployment_handle("Router", APP).stats.remote().result(timeout_s=30)
    assert sorted(encoder["models_loaded"]) == ["dense", "sparse"]  # one replica, two multiplexed encoders
    assert router["largest_batch"] > 1 and router["batches"] < router["requests"]
    shard = serve.get_deployment_handle("sparse--shard-00000", APP).stats.remote().result(timeout_s=30)
    assert shard["documents"] > 0 and shard["batches"] >= 1


def test_hybrid_explain_and_text_over_http(served, serving_world) -> None:
    body = search(served, query="sparse vectors", k=5, model=["sparse", "dense"], explain=True, text=True).json()
    assert len(body["hits"]) == 5 and body["model"] == ["sparse", "dense"]
    for hit in body["hits"]:
        assert hit["text"] == serving_world["docs"][hit["docid"]]
        assert isinstance(hit["terms"], list)
    sparse = search(served, query="sparse vectors", k=3, model="sparse", explain=True).json()
    for hit in sparse["hits"]:
        assert sum(t["weight"] for t in hit["terms"]) == pytest.approx(hit["score"], rel=1e-4)
    encoded = (
        served["session"]
        .post(served["url"] + "/encode", json={"texts": ["a dog"], "model": "sparse"}, timeout=30)
        .json()
    )
    assert encoded["paradigm"] == "sparse" and encoded["terms"][0]


def test_bad_input_over_http_and_schemathesis_finds_no_server_error(served, tmp_path) -> None:
    url, session = served["url"], served["session"]
    cases = [
        (session.post(url + "/search", json={"query": " ", "model": "sparse"}), 400),
        (session.post(url + "/search", json={"query": "x", "k": 0, "model": "sparse"}), 422),
        (session.post(url + "/search", json={"query": "x", "model": "nope"}), 404),
        (session.post(url + "/search", data=b"not json", headers={"Content-Type": "application/json"}), 422),
        (requests.post(url + "/search", json={"query": "x", "model": "sparse"}, timeout=30), 401),
        (session.post(url + "/search", data=b"x" * 2_000_000, headers={"Content-Type": "application/json"}), 413),
    ]
    assert [r.status_code for r, _ in cases] == [status for _, status in cases]
    report = tmp_path / "junit.xml"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),  # this environment's, activated or not
            "run",
            url + "/openapi.json",
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
            "--max-examples",
            "30",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--report",
            "junit",
            "--report-junit-path",
            str(report),
            "--request-timeout",
            "20",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # schemathesis keeps a cache folder in its working directory
    )
    output = result.stdout + result.stderr
    print(output[-3000:])
    assert result.returncode == 0, output[-4000:]
    generated = [int(n) for n in __import__("re").findall(r"(\d+) generated", output)]
    assert sum(generated) >= 50, output[-2000:]
    ok = search(served, query="the lazy dog", k=3, model="dense")
    assert ok.status_code == 200 and len(ok.json()["hits"]) == 3


def shard_replicas(deployment: str = "sparse--shard-00001") -> list[str]:
    """Names of the live replica actors of one deployment."""
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and f"#{deployment}#" in a["name"]
    ]


def test_a_killed_shard_replica_is_restarted_and_no_answer_is_a_wrong_top_k(served) -> None:
    import ray
    from ray import serve

    expected = {
        q: [h["docid"] for h in search(served, query=q, k=10, model="sparse").json()["hits"]] for q in SERVE_QUERIES
    }
    replicas = shard_replicas()
    assert len(replicas) == 1, replicas

    def recovered() -> bool:
        alive = [name for name in shard_replicas() if name != replicas[0]]
        status = serve.status().applications[APP].deployments["sparse--shard-00001"].status
        return bool(alive) and status == "HEALTHY"

    outcomes, healed = search_during_fault(
        lambda query: search(served, query=query, k=10, model="sparse"),
        expected,
        lambda: ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True),
        recovered,
    )
    print(f"load during the replica kill: {outcomes}")
    assert healed, "Serve did not restart the killed shard replica within 120 s"
    assert outcomes["wrong"] == 0 and outcomes["other"] == 0, outcomes
    assert outcomes["ok"] > 0
    after = search(served, query=SERVE_QUERIES[0], k=10, model="sparse").json()
    assert [h["docid"] for h in after["hits"]] == expected[SERVE_QUERIES[0]]


def test_the_search_page_in_headless_chromium(served) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.set_page_load_timeout(60)
        browser.get(served["url"] + "/")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "query").send_keys("sparse vectors of the language model")
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-searched"))
        columns = {}
        for kind in ("sparse", "dense", "hybrid"):
            items = browser.find_elements(By.CSS_SELECTOR, f"#results-{kind} li.hit")
            columns[kind] = [item.get_attribute("data-docid") for item in items]
        marks = browser.find_elements(By.CSS_SELECTOR, "#results-sparse mark")
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "search-page.png"))
    finally:
        browser.quit()
    api = {
        m: [
            h["docid"]
            for h in search(served, query="sparse vectors of the language model", k=10, model=m).json()["hits"]
        ]
        for m in ("sparse", "dense")
    }
    assert columns["sparse"] == api["sparse"] and columns["dense"] == api["dense"]
    assert len(columns["hybrid"]) == 10
    assert marks, "matched terms are highlighted in the sparse hits"
    assert (ARTIFACTS / "search-page.png").stat().st_size > 10_000


def test_query_client_prints_a_ranked_table(served) -> None:
    env = {**os.environ, TOKEN_ENV: TOKEN}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "retriever",
            "query",
            "ray workers",
            "--url",
            served["url"],
            "--model",
            "dense",
            "-k",
            "3",
            "--token-env",
            TOKEN_ENV,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    api = search(served, query="ray workers", k=3, model="dense").json()["hits"]
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [row[1] for row in rows] == [h["docid"] for h in api]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "retriever",
            "query",
            "x",
            "--url",
            served["url"],
            "--model",
            "nope",
            "--token-env",
            TOKEN_ENV,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 2 and "unknown model 'nope'" in bad.stderr
    json.loads(json.dumps(api))
