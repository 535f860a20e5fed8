"""Ray Serve: a batched, multiplexed `QueryEncoder`, one `IndexShard` deployment per shard of every served index,
and the `Router` (FastAPI ingress) that runs the `SearchService` over their handles.

Batching happens at every hop: the router gathers concurrent searches into one encoder call and one call per
shard; the encoder and each shard batch the calls of all router replicas again. Metrics go through
`ray.util.metrics` (see README, "Serving").
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from retriever.config import DeploymentConfig, ServeConfig
from retriever.serving.batching import KeyedCoalescer
from retriever.serving.catalog import ServedModel, build_catalog, read_token
from retriever.serving.encoder import Encoded, ServedEncoder
from retriever.serving.http import create_app
from retriever.serving.schema import ModelInfo, SearchRequest, SearchResponse
from retriever.serving.service import SearchService, fuse_rrf
from retriever.serving.shard import ServedShard, ShardHit
from retriever.telemetry import SERVE_BATCH_SIZE, SERVE_REQUESTS, SERVE_STAGE_SECONDS, record

ENCODER_NAME = "QueryEncoder"
ROUTER_NAME = "Router"
REACH_TIMEOUT_S = 120.0  # how long a starting router waits for its first answer from every shard and encoder

log = logging.getLogger(__name__)


def shard_deployment_name(model: str, shard: str) -> str:
    return f"{model}--{shard}"


class BatchStats:
    """Batches served by one replica (what `stats()` reports; `telemetry.SERVE_BATCH_SIZE` is for dashboards)."""

    def __init__(self, deployment: str) -> None:
        self.deployment = deployment
        self.batches = 0
        self.items = 0
        self.largest = 0

    def observe(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.largest = max(self.largest, size)
        record(SERVE_BATCH_SIZE, size, deployment=self.deployment)

    def summary(self) -> dict[str, Any]:
        return {"batches": self.batches, "requests": self.items, "largest_batch": self.largest}


class RayObserver:
    """Stage latencies (encode, shard search, merge) as `telemetry.SERVE_STAGE_SECONDS`."""

    def stage(self, name: str, seconds: float, model: str) -> None:
        record(SERVE_STAGE_SECONDS, seconds, stage=name, model=model)


@serve.deployment(name=ENCODER_NAME)
class QueryEncoder:
    """Encoders by model name (`@serve.multiplexed`: the first `max_models` loaded at start, others on first use, the
    least recently used unloaded), requests of one model batched together (`@serve.batch`)."""

    async def __init__(self, encoders: dict[str, dict[str, Any]], batching: dict[str, Any], max_models: int) -> None:
        self.encoders = encoders
        self._encode_batch.set_max_batch_size(batching["max_batch_size"])
        self._encode_batch.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])

        async def load(model_id: str) -> ServedEncoder:  # a plain function: Serve keeps its model cache on it
            return await self._load(model_id)

        self._model = serve.multiplexed(max_num_models_per_replica=max_models)(load)
        self.loaded: list[str] = []  # most recently loaded last
        self.loads = 0
        # Load the first models now (the replica is ready only then), so no first query waits for a cold load.
        for name in list(encoders)[:max_models]:
            await self._model(name)
        self.batch_stats = BatchStats(ENCODER_NAME)

    async def _load(self, model_id: str) -> ServedEncoder:
        spec = self.encoders.get(model_id)
        if spec is None:
            raise KeyError(f"QueryEncoder serves no model {model_id!r}; known: {', '.join(sorted(self.encoders))}")
        encoder = await asyncio.to_thread(ServedEncoder.load, model_id, spec["encoder_dir"], spec["query_max_length"])
        self.loads += 1
        self.loaded = [*[m for m in self.loaded if m != model_id], model_id]
        return encoder

    async def encode(self, texts: list[str], kind: str) -> Encoded:
        """Call through ``handle.options(multiplexed_model_id=<model>)``."""
        return await self._encode_batch((list(texts), kind))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, items: list[tuple[list[str], str]]) -> list[Encoded]:
        self.batch_stats.observe(len(items))
        encoder = await self._model(serve.get_multiplexed_model_id())
        results: list[Any] = [None] * len(items)
        for kind in {kind for _, kind in items}:
            positions = [i for i, (_, k) in enumerate(items) if k == kind]
            texts = [text for i in positions for text in items[i][0]]
            encoded = await asyncio.to_thread(encoder.encode, texts, kind)
            start = 0
            for i in positions:
                count = len(items[i][0])
                results[i] = encoded[start : start + count]
                start += count
        return results

    async def term_texts(self, term_ids: list[int]) -> list[str]:
        encoder = await self._model(serve.get_multiplexed_model_id())
        return encoder.term_texts(term_ids)

    def stats(self) -> dict[str, Any]:
        """Batches served and the models this replica has loaded (in load order)."""
        return {**self.batch_stats.summary(), "models_loaded": list(self.loaded), "model_loads": self.loads}


@serve.deployment
class IndexShard:
    """One shard folder (opened through its manifest checks); concurrent searches batched into one."""

    def __init__(self, name: str, folder: str, fingerprint: str, corpus: str | None, batching: dict[str, Any]) -> None:
        self.name = name
        self.shard = ServedShard(name, folder, expected_encoder_sha256=fingerprint, corpus=corpus)
        self._search_batch.set_max_batch_size(batching["max_batch_size"])
        self._search_batch.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])
        self.batch_stats = BatchStats("IndexShard")

    def stats(self) -> dict[str, Any]:
        return {**self.batch_stats.summary(), "documents": self.shard.index.doc_count}

    async def search(self, encoded: Encoded, k: int, explain: bool, text: bool) -> list[list[ShardHit]]:
        return await self._search_batch((encoded, k, explain, text))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _search_batch(self, items: list[tuple[Encoded, int, bool, bool]]) -> list[list[list[ShardHit]]]:
        self.batch_stats.observe(len(items))
        if isinstance(items[0][0], np.ndarray):
            queries: Encoded = np.concatenate([np.asarray(item[0]) for item in items])
        else:
            queries = [row for item in items for row in item[0]]
        depth = max(item[1] for item in items)
        explain = any(item[2] for item in items)
        text = any(item[3] for item in items)
        hits = await asyncio.to_thread(self.shard.search, queries, depth, explain=explain, text=text)
        out, start = [], 0
        for encoded, k, item_explain, item_text in items:
            rows = hits[start : start + len(encoded)]
            start += len(encoded)
            out.append([[_trim(hit, item_explain, item_text) for hit in row[:k]] for row in rows])
        return out


def _trim(hit: ShardHit, explain: bool, text: bool) -> ShardHit:
    if (explain or "terms" not in hit) and (text or "text" not in hit):
        return hit
    return {key: value for key, value in hit.items() if (key != "terms" or explain) and (key != "text" or text)}


def handle_transport() -> dict[str, Any]:
    """Handle options for the calls of this replica: over gRPC when Serve runs in its throughput mode (less CPU
    per call than Ray's actor calls), else Ray's default. Serve gives that default only to handles made in a
    process started with the mode's environment, and the handles a router receives were made where the application
    was built (`retriever serve`'s own process, before its Ray existed), so the router decides from its replica's
    environment, as Serve does: RAY_SERVE_USE_GRPC_BY_DEFAULT, else RAY_SERVE_THROUGHPUT_OPTIMIZED."""
    grpc = os.environ.get("RAY_SERVE_USE_GRPC_BY_DEFAULT", os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0"))
    return {"_by_reference": grpc != "1"}


class RayBackend:
    """The service's backend over deployment handles."""

    def __init__(
        self, encoder: DeploymentHandle, shards: dict[str, dict[str, DeploymentHandle]], models: Sequence[ServedModel]
    ) -> None:
        transport = handle_transport()
        self.shards = {
            model: {shard: handle.options(**transport) for shard, handle in per_model.items()}
            for model, per_model in shards.items()
        }
        self.models = {model.name: model for model in models}
        # One handle per model, made once: the multiplexed model id routes each call to a replica holding it.
        self.encoders = {model.name: encoder.options(multiplexed_model_id=model.name, **transport) for model in models}

    def catalog(self) -> dict[str, ModelInfo]:
        return {name: model.info() for name, model in self.models.items()}

    async def encode(self, model: str, texts: list[str], kind: str) -> Encoded:
        return await self.encoders[model].encode.remote(texts, kind)

    async def search_shard(
        self, model: str, shard: str, encoded: Encoded, k: int, explain: bool, text: bool
    ) -> list[list[ShardHit]]:
        return await self.shards[model][shard].search.remote(encoded, k, explain, text)

    async def term_texts(self, model: str, term_ids: list[int]) -> list[str]:
        return await self.encoders[model].term_texts.remote(term_ids)


@serve.deployment(name=ROUTER_NAME)
@serve.ingress()
class Router:
    """The HTTP ingress: the API of `retriever.serving.http` over a `SearchService` on Ray handles; concurrent
    searches of the same models are answered together (`search_many`, batched by a `KeyedCoalescer`)."""

    async def __init__(
        self,
        encoder: DeploymentHandle,
        shards: dict[str, dict[str, DeploymentHandle]],
        models: list[ServedModel],
        settings: dict[str, Any],
    ) -> None:
        self.settings = ServeConfig.model_validate(settings)
        backend = RayBackend(encoder, shards, models)
        self.service = SearchService(backend, self.settings, RayObserver())
        self.batch_stats = BatchStats(ROUTER_NAME)
        batching = self.settings.router
        self.batcher = KeyedCoalescer(
            self._batch_key,
            handler=self.service.search_many,
            max_batch_size=batching.max_batch_size,
            max_concurrent=batching.max_concurrent_batches,
            wait_s=batching.batch_wait_timeout_s,
            on_batch=self.batch_stats.observe,
        )
        self.token = read_token(self.settings)
        fuse_rrf([[("a", 1.0)], [("b", 1.0)]], 1)  # compile ranx's fusion now, not on the first hybrid query
        await _reach_every_replica(backend)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.service, self.token, search=self.search, on_response=self._count)

    def _count(self, route: str, status: int) -> None:
        record(SERVE_REQUESTS, 1, route=route, status=str(status))

    async def search(self, request: SearchRequest) -> SearchResponse:
        return await self.batcher.submit(request)

    def _batch_key(self, request: SearchRequest) -> tuple[str, ...]:
        """Searches of the same models share batches: a dense search does not wait for the sparse model's longer
        encoding and search. Names that are not served share one key (their batch only reports the error), so the
        keys stay bounded whatever clients send."""
        names = request.model_names
        return tuple(sorted(set(names))) if names and all(n in self.service.models for n in names) else ()

    def stats(self) -> dict[str, Any]:
        return self.batch_stats.summary()

    def check_health(self) -> None:
        if not self.service.models:
            raise RuntimeError("no models served")


async def _reach_every_replica(backend: RayBackend, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """One call to every shard and to the encoder of every model before the router takes traffic: a handle's first
    call waits for the Serve controller to tell it the deployment's replicas (seconds on a busy machine), which must
    not happen inside a search's shard or encoder time limit. A deployment still unreachable after `timeout_s` is
    logged and left to the requests' own time limits."""
    handles = [handle for per_model in backend.shards.values() for handle in per_model.values()]
    handles += list(backend.encoders.values())
    try:
        await asyncio.wait_for(asyncio.gather(*(handle.stats.remote() for handle in handles)), timeout_s)
    except TimeoutError:
        log.warning("router: not every shard and encoder answered within %.0f s of starting", timeout_s)


def deployment_options(settings: DeploymentConfig, *, gpu_default: float = 0.0) -> dict[str, Any]:
    """`.options(...)` of one deployment from its config section."""
    gpus = settings.num_gpus if settings.num_gpus is not None else gpu_default
    actor: dict[str, Any] = {"num_cpus": settings.num_cpus}
    if gpus:
        actor["num_gpus"] = gpus
    scaling = settings.autoscaling
    return {
        "ray_actor_options": actor,
        "max_ongoing_requests": settings.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": scaling.min_replicas,
            "initial_replicas": max(1, scaling.min_replicas),
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
        },
    }


def _batching(settings: DeploymentConfig) -> dict[str, Any]:
    return {"max_batch_size": settings.max_batch_size, "batch_wait_timeout_s": settings.batch_wait_timeout_s}


def cluster_has_gpu() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(settings: ServeConfig, models: Sequence[ServedModel]) -> Any:
    """The Serve application: QueryEncoder, one IndexShard deployment per shard, the Router."""
    encoder = QueryEncoder.options(
        **deployment_options(settings.encoder, gpu_default=1.0 if cluster_has_gpu() else 0.0)
    ).bind(
        {m.name: {"encoder_dir": m.encoder_dir, "query_max_length": m.config.query_max_length} for m in models},
        _batching(settings.encoder),
        settings.max_models_per_replica,
    )
    shards = {
        model.name: {
            shard: IndexShard.options(
                name=shard_deployment_name(model.name, shard), **deployment_options(settings.shards)
            ).bind(shard, folder, model.fingerprint, model.config.corpus, _batching(settings.shards))
            for shard, folder in model.shards.items()
        }
        for model in models
    }
    router_options = deployment_options(settings.router)
    if settings.auth_token_env and os.environ.get(settings.auth_token_env):
        # The router reads the token from its environment; a local deployment passes this process's value on.
        env = {settings.auth_token_env: os.environ[settings.auth_token_env]}
        router_options["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    return Router.options(**router_options).bind(encoder, shards, list(models), settings.model_dump(mode="json"))


def app_builder(args: dict[str, Any]) -> Any:
    """The `import_path` target of a `serve deploy` config: ``args`` is a serve config (see `ServeConfig`) plus
    optional ``tracking_uri`` and ``cache_dir`` for models given as MLflow URIs."""
    from retriever.config import config_from_dict

    args = dict(args)
    tracking_uri = args.pop("tracking_uri", None)
    cache_dir = args.pop("cache_dir", ".")
    settings = config_from_dict(args, "serve application args", model=ServeConfig)
    return build_app(settings, build_catalog(settings, tracking_uri=tracking_uri, cache_dir=cache_dir))


def wait_until_running(app_name: str, timeout_s: float) -> None:
    """Block until the application is RUNNING; a deployment that fails to start raises with Serve's message."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"Serve application {app_name!r} {status.status}: {status.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve application {app_name!r} not running after {timeout_s} s")
        time.sleep(0.5)
