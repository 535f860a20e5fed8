"""The search service and its HTTP API in one process (no Ray): parity with batch search, hybrid fusion,
explanations, shard failures, limits and every bad input as a 4xx."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient

from retriever.config import ServeConfig
from retriever.index import search_to_run
from retriever.serving.catalog import build_catalog
from retriever.serving.http import create_app
from retriever.serving.local import LocalBackend
from retriever.serving.schema import SearchRequest
from retriever.serving.service import SearchService, ServiceUnavailableError, fuse_rrf
from tests.conftest import SERVE_QUERIES

TOKEN = "s3cret-token"


def serve_config(world: dict, index: str = "index", **settings) -> ServeConfig:
    models = [
        {"name": p, "encoder": str(world[p]["encoder"]), "index": str(world[p][index]), "corpus": world["corpus"]}
        for p in ("sparse", "dense")
    ]
    return ServeConfig.model_validate({"models": models, **settings})


@pytest.fixture(scope="module")
def backend3(serving_world) -> LocalBackend:
    return LocalBackend(build_catalog(serve_config(serving_world, "index3")))


@pytest.fixture(scope="module")
def client(serving_world) -> TestClient:
    cfg = serve_config(serving_world, limits={"max_texts": 8, "max_query_chars": 300, "max_body_bytes": 20_000})
    service = SearchService(LocalBackend(build_catalog(cfg)), cfg)
    with TestClient(create_app(service, token=TOKEN)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield test_client


@pytest.mark.parametrize("paradigm", ["sparse", "dense"])
@pytest.mark.parametrize("index", ["index", "index3"])
def test_search_matches_batch_search(serving_world, backend3, paradigm, index) -> None:
    """Same ids in the same order and scores within 1e-5 as `retriever search` over the same index and queries."""
    world = serving_world[paradigm]
    expected = search_to_run(world[index], world["queries"], 10)
    cfg = serve_config(serving_world, index)
    service = SearchService(backend3 if index == "index3" else LocalBackend(build_catalog(cfg)), cfg)
    for qid, query in enumerate(SERVE_QUERIES):
        response = asyncio.run(service.search(SearchRequest(query=query, k=10, model=paradigm)))
        assert not response.partial
        got = [(hit.docid, hit.score) for hit in response.hits]
        want = list(expected[f"q{qid}"].items())
        assert [d for d, _ in got] == [d for d, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=0, atol=1e-5)


def test_batched_requests_answer_like_single_ones(serving_world, backend3) -> None:
    cfg = serve_config(serving_world, "index3")
    service = SearchService(backend3, cfg)
    requests = [SearchRequest(query=q, k=3 + i, model=["sparse", "dense"][i % 2]) for i, q in enumerate(SERVE_QUERIES)]
    together = asyncio.run(service.search_many(requests))
    for request, response in zip(requests, together):
        alone = asyncio.run(service.search(request))
        # Encoded in one batch with other queries: equal up to float rounding.
        assert [h.docid for h in response.hits] == [h.docid for h in alone.hits]
        np.testing.assert_allclose([h.score for h in response.hits], [h.score for h in alone.hits], atol=1e-5)
        assert len(response.hits) == request.k


def test_hybrid_is_ranx_reciprocal_rank_fusion(client) -> None:
    query = SERVE_QUERIES[0]
    lists = {
        m: client.post("/search", json={"query": query, "k": 20, "model": m}).json()["hits"]
        for m in ("sparse", "dense")
    }
    hybrid = client.post("/search", json={"query": query, "k": 20, "model": ["sparse", "dense"]}).json()
    assert hybrid["model"] == ["sparse", "dense"] and hybrid["partial"] is False
    by_hand: dict[str, float] = {}
    for hits in lists.values():
        for rank, hit in enumerate(hits, start=1):
            by_hand[hit["docid"]] = by_hand.get(hit["docid"], 0.0) + 1 / (60 + rank)
    # Equal sums (rank 1 + rank 5 = rank 5 + rank 1) are ties broken by doc id: scores are compared at 1e-12.
    expected = sorted(by_hand.items(), key=lambda item: (-round(item[1], 12), item[0]))[:20]
    assert [h["docid"] for h in hybrid["hits"]] == [d for d, _ in expected]
    np.testing.assert_allclose([h["score"] for h in hybrid["hits"]], [s for _, s in expected], rtol=1e-9)
    assert fuse_rrf([[("a", 1.0)], []], 5) == [("a", round(1 / 61, 12))]


def test_explain_gives_the_terms_that_make_up_the_score(client, serving_world) -> None:
    response = client.post(
        "/search",
        json={
            "query": "sparse vectors of the language model",
            "k": 5,
            "model": "sparse",
            "explain": True,
            "text": True,
        },
    ).json()
    assert len(response["hits"]) == 5
    for hit in response["hits"]:
        assert hit["text"] == serving_world["docs"][hit["docid"]]
        assert hit["terms"], hit
        assert sum(term["weight"] for term in hit["terms"]) == pytest.approx(hit["score"], rel=1e-4)
        weights = [term["weight"] for term in hit["terms"]]
        assert weights == sorted(weights, reverse=True)
        assert all(isinstance(term["term"], str) and term["term"] for term in hit["terms"])
    words = {term["term"].lower() for hit in response["hits"] for term in hit["terms"]}
    assert words & {"sparse", "vectors", "language", "model", "the", "of"} or any(len(w) > 1 for w in words)


def test_encode_returns_vectors_or_terms(client, serving_world) -> None:
    dense = client.post("/encode", json={"texts": ["a dog", "ray"], "model": "dense"}).json()
    assert dense["paradigm"] == "dense" and len(dense["vectors"]) == 2 and len(dense["vectors"][0]) > 8
    sparse = client.post("/encode", json={"texts": ["a dog"], "kind": "passage", "model": "sparse"}).json()
    assert sparse["paradigm"] == "sparse" and len(sparse["terms"]) == 1
    assert all(isinstance(w, float) and w > 0 for w in sparse["terms"][0].values())
    models = client.get("/models").json()["models"]
    assert [(m["name"], m["paradigm"], m["shards"], m["documents"]) for m in models] == [
        ("dense", "dense", ["shard-00000"], 60),
        ("sparse", "sparse", ["shard-00000"], 60),
    ]
    assert client.get("/healthz").json() == {"status": "ok", "models": ["dense", "sparse"]}
    page = client.get("/")
    assert page.status_code == 200 and "results-hybrid" in page.text


JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
DOG = {"query": "dog", "model": "sparse"}
BAD_INPUTS = [
    # (what, method, path, keyword arguments of the request, expected status)
    ("empty query", "post", "/search", {"json": {"query": "", "model": "sparse"}}, 400),
    ("whitespace query", "post", "/search", {"json": {"query": " \n\t ", "model": "sparse"}}, 400),
    ("100 kB query", "post", "/search", {"json": {"query": "dog " * 25_000, "model": "sparse"}}, 413),
    ("query over the length limit", "post", "/search", {"json": {"query": "dog " * 100, "model": "sparse"}}, 400),
    ("k = 0", "post", "/search", {"json": {"query": "dog", "k": 0, "model": "sparse"}}, 422),
    ("k = 10^6", "post", "/search", {"json": {"query": "dog", "k": 1_000_000, "model": "sparse"}}, 422),
    ("k as a string", "post", "/search", {"json": {"query": "dog", "k": "10", "model": "sparse"}}, 422),
    ("k as a float", "post", "/search", {"json": {"query": "dog", "k": 2.5, "model": "sparse"}}, 422),
    ("query as a number", "post", "/search", {"json": {"query": 42, "model": "sparse"}}, 422),
    ("query missing", "post", "/search", {"json": {"model": "sparse"}}, 422),
    ("model missing", "post", "/search", {"json": {"query": "dog"}}, 422),
    ("unknown model", "post", "/search", {"json": {"query": "dog", "model": "colbert"}}, 404),
    ("unknown model in a hybrid", "post", "/search", {"json": {"query": "dog", "model": ["sparse", "nope"]}}, 404),
    ("empty model list", "post", "/search", {"json": {"query": "dog", "model": []}}, 400),
    ("a model twice", "post", "/search", {"json": {"query": "dog", "model": ["dense", "dense"]}}, 400),
    ("model name with a slash", "post", "/search", {"json": {"query": "dog", "model": "../etc"}}, 422),
    (
        "explain on a dense model",
        "post",
        "/search",
        {"json": {"query": "dog", "model": "dense", "explain": True}},
        400,
    ),
    ("explain as a string", "post", "/search", {"json": {"query": "dog", "model": "sparse", "explain": "yes"}}, 422),
    ("unknown field", "post", "/search", {"json": {**DOG, "topk": 3}}, 422),
    ("body is a list", "post", "/search", {"json": ["dog"]}, 422),
    (
        "non-JSON body",
        "post",
        "/search",
        {"content": b"{query: dog", "headers": {"Content-Type": "application/json"}},
        422,
    ),
    (
        "wrong content type",
        "post",
        "/search",
        {"content": b"query=dog&model=sparse", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        422,
    ),
    (
        "invalid UTF-8",
        "post",
        "/search",
        {"content": b'{"query": "\xff\xfe", "model": "sparse"}', "headers": {"Content-Type": "application/json"}},
        400,
    ),
    (
        "missing token",
        "post",
        "/search",
        {"json": {"query": "dog", "model": "sparse"}, "headers": {"Authorization": ""}},
        401,
    ),
    (
        "wrong token",
        "post",
        "/search",
        {"json": {"query": "dog", "model": "sparse"}, "headers": {"Authorization": "Bearer nope"}},
        401,
    ),
    ("wrong token on /models", "get", "/models", {"headers": {"Authorization": "Bearer s3cret-tokeN"}}, 401),
    (
        "streamed body over the limit",
        "post",
        "/search",
        {"content": (b" " * 10_000 for _ in range(3)), "headers": JSON},
        413,
    ),
    ("10,000 texts to /encode", "post", "/encode", {"json": {"texts": ["x"] * 10_000, "model": "dense"}}, 413),
    ("too many texts to /encode", "post", "/encode", {"json": {"texts": ["x"] * 9, "model": "dense"}}, 400),
    ("no texts to /encode", "post", "/encode", {"json": {"texts": [], "model": "dense"}}, 422),
    ("an empty text to /encode", "post", "/encode", {"json": {"texts": ["ok", " "], "model": "dense"}}, 400),
    ("a text that is not a string", "post", "/encode", {"json": {"texts": ["ok", 3], "model": "dense"}}, 422),
    ("unknown kind", "post", "/encode", {"json": {"texts": ["ok"], "kind": "doc", "model": "dense"}}, 422),
    ("unknown model to /encode", "post", "/encode", {"json": {"texts": ["ok"], "model": "bm25"}}, 404),
    ("GET on /search", "get", "/search", {}, 405),
    ("unknown route", "get", "/nowhere", {}, 404),
]


@pytest.mark.parametrize(("what", "method", "path", "kwargs", "status"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_4xx_with_a_message(client, what, method, path, kwargs, status) -> None:
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status, (what, response.status_code, response.text[:300])
    detail = response.json()["detail"]
    assert isinstance(detail, str) and len(detail) > 5, detail
    if status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_the_server_answers_after_bad_input(client) -> None:
    for _, method, path, kwargs, _ in BAD_INPUTS[:5]:
        getattr(client, method)(path, **kwargs)
    ok = client.post("/search", json={"query": "the lazy dog", "k": 3, "model": "dense"})
    assert ok.status_code == 200 and len(ok.json()["hits"]) == 3


GUARDED_ROUTES = [("/search", "post"), ("/encode", "post"), ("/models", "get")]


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no token", "token"])
def test_the_schema_names_the_bearer_scheme_only_where_a_token_is_checked(serving_world, token) -> None:
    cfg = serve_config(serving_world)
    with TestClient(create_app(SearchService(LocalBackend(build_catalog(cfg)), cfg), token=token)) as test_client:
        schema = test_client.get("/openapi.json").json()
        search = test_client.post("/search", json={"query": "the lazy dog", "k": 2, "model": "dense"})
    responses = {path: set(schema["paths"][path][method]["responses"]) for path, method in GUARDED_ROUTES}
    schemes = schema.get("components", {}).get("securitySchemes", {})
    if token is None:
        assert search.status_code == 200
        assert not schemes and all("401" not in codes and "413" in codes for codes in responses.values())
    else:
        assert search.status_code == 401 and search.headers["WWW-Authenticate"] == "Bearer"
        assert schemes["HTTPBearer"]["scheme"] == "bearer"
        assert all({"401", "413"} <= codes for codes in responses.values())
        security = [schema["paths"][path][method]["security"] for path, method in GUARDED_ROUTES]
        assert security == [[{"HTTPBearer": []}]] * len(GUARDED_ROUTES)


class _SilentShard:
    """Wraps a backend so that one shard never answers (a hung or lost replica)."""

    def __init__(self, inner: LocalBackend, silent: str, fail: bool = False) -> None:
        self.inner = inner
        self.silent = silent
        self.fail = fail

    def catalog(self):
        return self.inner.catalog()

    async def encode(self, model, texts, kind):
        return await self.inner.encode(model, texts, kind)

    async def search_shard(self, model, shard, encoded, k, explain, text):
        if shard == self.silent:
            if self.fail:
                raise ConnectionError("replica died")
            await asyncio.sleep(10)
        return await self.inner.search_shard(model, shard, encoded, k, explain, text)

    async def term_texts(self, model, term_ids):
        return await self.inner.term_texts(model, term_ids)


@pytest.mark.parametrize("fail", [False, True], ids=["timeout", "replica error"])
def test_a_shard_that_does_not_answer_is_never_a_silent_short_top_k(serving_world, backend3, fail) -> None:
    request = SearchRequest(query=SERVE_QUERIES[2], k=30, model="sparse")
    everything = request.model_copy(update={"k": 60})  # the whole corpus, ranked
    complete = asyncio.run(SearchService(backend3, serve_config(serving_world, "index3")).search(everything))
    strict = serve_config(serving_world, "index3", shard_timeout_s=0.3, retry_after_s=7)
    with pytest.raises(ServiceUnavailableError, match=r"shard\(s\) shard-00001 of 'sparse' did not answer") as caught:
        asyncio.run(SearchService(_SilentShard(backend3, "shard-00001", fail), strict).search(request))
    assert caught.value.retry_after_s == 7

    lenient = serve_config(serving_world, "index3", shard_timeout_s=0.3, on_shard_timeout="partial")
    partial = asyncio.run(SearchService(_SilentShard(backend3, "shard-00001", fail), lenient).search(request))
    assert partial.partial and partial.missing_shards == ["sparse/shard-00001"]
    lost = set(backend3.shards["sparse"]["shard-00001"].index.doc_ids)
    expected = [(h.docid, h.score) for h in complete.hits if h.docid not in lost][:30]
    assert [(h.docid, h.score) for h in partial.hits] == expected


def test_a_silent_shard_is_a_503_with_retry_after_over_http(serving_world, backend3) -> None:
    cfg = serve_config(serving_world, "index3", shard_timeout_s=0.2, retry_after_s=3)
    app = create_app(SearchService(_SilentShard(backend3, "shard-00002"), cfg))
    with TestClient(app) as test_client:
        response = test_client.post("/search", json={"query": "dog", "model": "dense"})
    assert response.status_code == 503 and response.headers["Retry-After"] == "3"
    assert "did not answer" in response.json()["detail"]


def test_the_catalog_refuses_an_index_of_another_encoder(serving_world) -> None:
    from retriever.index import IndexMismatchError

    cfg = ServeConfig.model_validate(
        {
            "models": [
                {
                    "name": "x",
                    "encoder": str(serving_world["dense"]["encoder"]),
                    "index": str(serving_world["sparse"]["index"]),
                }
            ]
        }
    )
    with pytest.raises(IndexMismatchError, match="was built from another encoder"):
        build_catalog(cfg)


def test_explain_on_an_approximate_sparse_index_is_refused_before_searching(serving_world, tmp_path) -> None:
    from retriever.index import build_shards

    build_shards(serving_world["root"] / "sparse" / "encodings", tmp_path / "seismic", 1, "seismic")
    cfg = ServeConfig.model_validate(
        {
            "models": [
                {
                    "name": "approx",
                    "encoder": str(serving_world["sparse"]["encoder"]),
                    "index": str(tmp_path / "seismic"),
                }
            ]
        }
    )
    with TestClient(create_app(SearchService(LocalBackend(build_catalog(cfg)), cfg))) as test_client:
        refused = test_client.post("/search", json={"query": "ray workers", "model": "approx", "explain": True})
        plain = test_client.post("/search", json={"query": "ray workers", "k": 3, "model": "approx"})
    assert refused.status_code == 400 and "explain needs an exact sparse index; approx" in refused.json()["detail"]
    assert plain.status_code == 200 and len(plain.json()["hits"]) == 3
