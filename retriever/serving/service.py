"""What the HTTP API does, without Ray or HTTP: check a request, encode the query, fan out to every shard, merge
with the batch search's `merge_topk`, fuse several models with ranx RRF, explain sparse hits.

The service talks to encoders and shards through a `Backend`: in-process objects (`LocalBackend`) or Ray Serve
deployment handles (`retriever.serving.deployments`). A shard that does not answer in time makes the response a
`ServiceUnavailableError` (HTTP 503 with Retry-After) or, with ``on_shard_timeout: partial``, a response flagged
``partial`` naming the missing shards: never a silently incomplete top-k.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from retriever.config import ServeConfig
from retriever.errors import UnknownNameError, UserError
from retriever.index.shards import merge_topk
from retriever.serving.encoder import Encoded
from retriever.serving.schema import (
    EncodeRequest,
    EncodeResponse,
    Hit,
    ModelInfo,
    SearchRequest,
    SearchResponse,
    Term,
)
from retriever.serving.shard import ShardHit

log = logging.getLogger(__name__)

RRF_K = 60  # ranx's default for reciprocal rank fusion (Cormack et al.)


class BadRequestError(UserError, ValueError):
    """A request the API cannot answer as asked (HTTP 400)."""


class UnknownModelError(UnknownNameError):
    """A model name that is not served (HTTP 404)."""


class ServiceUnavailableError(Exception):
    """Some part of the service did not answer in time (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Backend(Protocol):
    """Where encoders and shards live."""

    def catalog(self) -> dict[str, ModelInfo]: ...

    async def encode(self, model: str, texts: list[str], kind: str) -> Encoded: ...

    async def search_shard(
        self, model: str, shard: str, encoded: Encoded, k: int, explain: bool, text: bool
    ) -> list[list[ShardHit]]: ...

    async def term_texts(self, model: str, term_ids: list[int]) -> list[str]: ...


class Observer(Protocol):
    """Receives the service's measurements (Ray metrics in Serve; nothing in process)."""

    def stage(self, name: str, seconds: float, model: str) -> None: ...


class NoObserver:
    def stage(self, name: str, seconds: float, model: str) -> None:
        pass


@dataclass
class _ModelResult:
    """One model's answer for one request: ranked (doc id, score), the hits' details, the shards that did not
    answer."""

    ranked: list[tuple[str, float]]
    details: dict[str, ShardHit]
    missing: list[str]


class SearchService:
    def __init__(self, backend: Backend, settings: ServeConfig, observer: Observer | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.observer: Observer = observer or NoObserver()
        self.models = backend.catalog()

    # ---- checks -----------------------------------------------------------------------------------------------
    def model_info(self, name: str) -> ModelInfo:
        info = self.models.get(name)
        if info is None:
            served = ", ".join(sorted(self.models))
            raise UnknownModelError(f"unknown model {name!r}; served models: {served} (see GET /models)")
        return info

    def check_text(self, text: str, limit: int, what: str) -> None:
        if not text.strip():
            raise BadRequestError(f"{what} is empty; send some text")
        if len(text) > limit:
            raise BadRequestError(f"{what} has {len(text)} characters, more than the limit of {limit}; shorten it")

    def check_search(self, request: SearchRequest) -> list[str]:
        """The request's model names, after every check that needs no encoder or shard."""
        names = request.model_names
        if not names:
            raise BadRequestError("model is an empty list; name at least one served model")
        if len(set(names)) != len(names):
            raise BadRequestError(f"model lists a name twice ({', '.join(names)}); name each model once")
        infos = [self.model_info(name) for name in names]
        self.check_text(request.query, self.settings.limits.max_query_chars, "query")
        if request.explain and not any(info.paradigm == "sparse" for info in infos):
            raise BadRequestError(
                f"explain needs a sparse model (matched vocabulary terms); {', '.join(names)} is dense"
            )
        unexplained = [i.name for i in infos if request.explain and i.paradigm == "sparse" and i.index_kind != "exact"]
        if unexplained:
            raise BadRequestError(
                f"explain needs an exact sparse index; {', '.join(unexplained)} is served from an approximate one "
                "(search without explain, or serve an index of kind 'exact')"
            )
        if request.text and not all(info.texts for info in infos):
            raise BadRequestError(
                "text was asked for, but some of these models are served without their corpus; set `corpus` for "
                "them in the serve config"
            )
        return names

    # ---- search -----------------------------------------------------------------------------------------------
    async def search(self, request: SearchRequest) -> SearchResponse:
        result = (await self.search_many([request]))[0]
        if isinstance(result, BaseException):
            raise result
        return result

    async def search_many(self, requests: Sequence[SearchRequest]) -> list[SearchResponse | BaseException]:
        """Answer several requests together: one encoder call and one call per shard for each model they use.
        Each request gets its response or its own error."""
        started = time.perf_counter()
        results: list[SearchResponse | BaseException | None] = [None] * len(requests)
        names_of: dict[int, list[str]] = {}
        for i, request in enumerate(requests):
            try:
                names_of[i] = self.check_search(request)
            except (UserError, ValueError) as exc:
                results[i] = exc
        users: dict[str, list[int]] = defaultdict(list)
        for i, names in names_of.items():
            for name in names:
                users[name].append(i)
        per_model = await asyncio.gather(
            *(self._search_model(name, [requests[i] for i in users[name]]) for name in users), return_exceptions=True
        )
        answers: dict[tuple[int, str], _ModelResult] = {}
        for name, outcome in zip(users, per_model):
            for position, i in enumerate(users[name]):
                if isinstance(outcome, BaseException):
                    results[i] = outcome
                elif results[i] is None:
                    answers[(i, name)] = outcome[position]
        for i, names in names_of.items():
            if results[i] is None:
                results[i] = self._respond(requests[i], names, [answers[(i, name)] for name in names])
        elapsed_ms = (time.perf_counter() - started) * 1000
        for result in results:
            if isinstance(result, SearchResponse):
                result.took_ms = round(elapsed_ms, 3)
        return results  # type: ignore[return-value]

    async def _search_model(self, name: str, requests: list[SearchRequest]) -> list[_ModelResult]:
        """One model for several requests: encode their queries in one call, search every shard once."""
        info = self.models[name]
        depth = max(request.k for request in requests)
        explain = info.paradigm == "sparse" and any(request.explain for request in requests)
        text = any(request.text for request in requests)
        clock = time.perf_counter()
        encoded = await self._encode(name, [request.query for request in requests], "query")
        self.observer.stage("encode", time.perf_counter() - clock, name)
        clock = time.perf_counter()
        answers = await asyncio.gather(
            *(self._ask_shard(name, shard, encoded, depth, explain, text) for shard in info.shards)
        )
        self.observer.stage("shards", time.perf_counter() - clock, name)
        answered = [(shard, hits) for shard, hits in zip(info.shards, answers) if not isinstance(hits, str)]
        missing = [shard for shard, hits in zip(info.shards, answers) if isinstance(hits, str)]
        if missing and self.settings.on_shard_timeout == "error":
            reasons = "; ".join(
                f"{shard}: {hits}" for shard, hits in zip(info.shards, answers) if isinstance(hits, str)
            )
            raise ServiceUnavailableError(
                f"shard(s) {', '.join(missing)} of {name!r} did not answer ({reasons}); the top-k would be "
                "incomplete, retry shortly",
                self.settings.retry_after_s,
            )
        clock = time.perf_counter()
        results = []
        for row, request in enumerate(requests):
            per_shard = [[[(hit["docid"], hit["score"]) for hit in hits[row]]] for _, hits in answered]
            ranked = merge_topk(per_shard, request.k)[0] if per_shard else []
            details = {hit["docid"]: hit for _, hits in answered for hit in hits[row]}
            results.append(_ModelResult(ranked, details, missing))
        if explain:
            await self._name_terms(name, results)
        self.observer.stage("merge", time.perf_counter() - clock, name)
        return results

    async def _encode(self, model: str, texts: list[str], kind: str) -> Encoded:
        """The backend's encoding; an encoder that fails or does not answer in time is a 503, bad input stays 4xx."""
        try:
            return await asyncio.wait_for(self.backend.encode(model, texts, kind), self.settings.encoder_timeout_s)
        except (UserError, ValueError):
            raise
        except TimeoutError:
            reason = f"no answer within {self.settings.encoder_timeout_s} s"
        except Exception as exc:  # a lost replica, a failed actor: the service, not the request
            log.warning("the encoder of %s failed: %r", model, exc)
            reason = f"failed: {type(exc).__name__}"
        raise ServiceUnavailableError(
            f"the query encoder of {model!r} is unavailable ({reason}); retry shortly", self.settings.retry_after_s
        )

    async def _ask_shard(
        self, model: str, shard: str, encoded: Encoded, k: int, explain: bool, text: bool
    ) -> list[list[ShardHit]] | str:
        """The shard's hits, or why there are none: no answer in time, or its replica failed."""
        try:
            return await asyncio.wait_for(
                self.backend.search_shard(model, shard, encoded, k, explain, text), self.settings.shard_timeout_s
            )
        except (UserError, ValueError):
            raise  # a request the shard refuses is the client's problem, not an outage
        except TimeoutError:
            return f"no answer within {self.settings.shard_timeout_s} s"
        except Exception as exc:
            log.warning("shard %s of %s failed: %r", shard, model, exc)
            return f"failed: {type(exc).__name__}"

    async def _name_terms(self, model: str, results: list[_ModelResult]) -> None:
        ids = sorted({term for r in results for docid, _ in r.ranked for term, _ in r.details[docid].get("terms", [])})
        names = dict(zip(ids, await self.backend.term_texts(model, ids))) if ids else {}
        for r in results:
            for docid, _ in r.ranked:
                hit = r.details[docid]
                if "terms" in hit and "term_texts" not in hit:
                    hit["term_texts"] = [(names[term], weight) for term, weight in hit["terms"]]

    def _respond(self, request: SearchRequest, names: list[str], answers: list[_ModelResult]) -> SearchResponse:
        if len(answers) == 1:
            ranked = answers[0].ranked
        else:
            ranked = fuse_rrf([answer.ranked for answer in answers], request.k)
        hits = []
        for docid, score in ranked:
            hit = Hit(docid=docid, score=score)
            for answer in answers:
                detail = answer.details.get(docid)
                if detail is None:
                    continue
                if request.text and hit.text is None and "text" in detail:
                    hit.text = detail["text"]
                if request.explain and hit.terms is None and "term_texts" in detail:
                    hit.terms = [Term(term=term, weight=weight) for term, weight in detail["term_texts"]]
            if request.explain and hit.terms is None and any(self.models[n].paradigm == "sparse" for n in names):
                hit.terms = []  # found by the dense model only: no sparse term matched
            hits.append(hit)
        missing = [f"{name}/{shard}" for name, answer in zip(names, answers) for shard in answer.missing]
        return SearchResponse(
            hits=hits, model=request.model, took_ms=0.0, partial=bool(missing), missing_shards=missing
        )

    # ---- encode -----------------------------------------------------------------------------------------------
    async def encode(self, request: EncodeRequest) -> EncodeResponse:
        info = self.model_info(request.model)
        limits = self.settings.limits
        if len(request.texts) > limits.max_texts:
            raise BadRequestError(
                f"{len(request.texts)} texts in one call, more than the limit of {limits.max_texts}; split them"
            )
        limit = limits.max_query_chars if request.kind == "query" else limits.max_passage_chars
        for position, text in enumerate(request.texts):
            self.check_text(text, limit, f"text {position}")
        encoded = await self._encode(request.model, list(request.texts), request.kind)
        if info.paradigm == "dense":
            vectors = np.asarray(encoded, dtype=np.float32)
            return EncodeResponse(model=request.model, paradigm="dense", vectors=vectors.tolist())
        ids = sorted({int(t) for term_ids, _ in encoded for t in term_ids.tolist()})
        names = dict(zip(ids, await self.backend.term_texts(request.model, ids))) if ids else {}
        terms = []
        for term_ids, weights in encoded:
            entry: dict[str, float] = {}
            for term, weight in zip(term_ids.tolist(), weights.tolist()):
                key = names[term]
                entry[key if key not in entry else f"{key}#{term}"] = weight  # two ids may read the same
            terms.append(entry)
        return EncodeResponse(model=request.model, paradigm="sparse", terms=terms)

    def catalog(self) -> list[ModelInfo]:
        return [self.models[name] for name in sorted(self.models)]


def fuse_rrf(rankings: Sequence[Sequence[tuple[str, float]]], k: int) -> list[tuple[str, float]]:
    """Reciprocal rank fusion of ranked lists with ranx (score of a document: sum of 1 / (60 + rank)), top ``k``
    by fused score, ties by doc id (scores rounded to 1e-12 first: equal rank sums added in another order must
    tie)."""
    from ranx import Run, fuse

    # RRF reads ranks only. ranx re-ranks a run by score with its own tie order (doc id descending), so each list is
    # given strictly decreasing stand-in scores that keep our ranks (ties by doc id ascending). An empty list gets a
    # placeholder document, so that every run has the query.
    runs = [
        Run({"q": {docid: float(len(ranking) - rank) for rank, (docid, _) in enumerate(ranking)} or {"": 0.0}})
        for ranking in rankings
    ]
    fused: dict[str, Any] = fuse(runs, norm=None, method="rrf", params={"k": RRF_K}).to_dict()["q"]
    fused.pop("", None)
    scored = ((docid, round(float(score), 12)) for docid, score in fused.items())
    return sorted(scored, key=lambda h: (-h[1], h[0]))[:k]
