"""Starting a service from a serve config: on Ray Serve (local Ray or a cluster), in one process under uvicorn, or
as the config YAML that `serve deploy` takes."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retriever.config import ServeConfig
from retriever.errors import UserError
from retriever.serving.catalog import ServedModel, read_token

HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"


def ingress_environment(choice: str) -> tuple[str, dict[str, str]]:
    """The ingress a Ray started here gets (``choice``, a `ServeConfig.ingress`, with "auto" resolved) and the
    environment that selects it. Serve reads these variables when its controller and replicas start, so they must be
    set before the local Ray is."""
    binary = os.environ.get(HAPROXY_BINARY_ENV) or shutil.which("haproxy")
    ingress = choice if choice != "auto" else ("haproxy" if binary else "proxy")
    if ingress == "proxy":
        return ingress, {}
    if not binary:
        raise UserError(
            "serve: ingress=haproxy needs the `haproxy` binary (apt-get install haproxy, or set "
            f"{HAPROXY_BINARY_ENV}); or set ingress=proxy (Serve's Python proxy, slower)"
        )
    return ingress, {
        # Serve's throughput mode: the router replica serves HTTP itself (direct ingress) behind HAProxy, handle
        # calls go over gRPC, user code runs on the replica's event loop.
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        HAPROXY_BINARY_ENV: binary,
        # A replica that stops waits this long for load balancers to forget it (30 s by default, for cloud load
        # balancers); the HAProxy on this machine is told at once.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


def haproxy_instance_environment() -> dict[str, str]:
    """Serve's HAProxy files and ports for this service alone. Ray's defaults (`/tmp/haproxy-serve`, stats on 8404,
    metrics on 9101) are the same for every HAProxy ingress on a machine, so a second service would take over the
    first one's config and fail to bind its ports. The folder is removed when this process exits. (The router
    replicas' direct-ingress ports still come from Ray's one range per machine.)"""
    import atexit
    import socket
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="haproxy-serve-"))  # short: HAProxy's admin socket path has a length limit
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    sockets = [socket.socket() for _ in range(2)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        stats_port, metrics_port = (sock.getsockname()[1] for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
    }


def serve_deploy_config(
    settings: ServeConfig, models: Sequence[ServedModel], *, tracking_uri: str | None, cache_dir: str | Path
) -> dict[str, Any]:
    """The `serve deploy` config of this service: one application built by `deployments.app_builder` from the serve
    config (its ``args``), with the options of every deployment spelled out so that they can be edited in place."""
    from retriever.serving.deployments import (
        ENCODER_NAME,
        ROUTER_NAME,
        deployment_options,
        shard_deployment_name,
    )

    args: dict[str, Any] = settings.model_dump(mode="json", exclude_defaults=False)
    args["tracking_uri"] = tracking_uri
    args["cache_dir"] = str(Path(cache_dir).resolve())
    for entry, model in zip(args["models"], models):  # the cluster builds the app elsewhere: no relative paths
        if not entry["encoder"].startswith("models:/"):
            entry["encoder"] = model.encoder_dir
        entry["index"] = str(Path(entry["index"]).resolve())
    encoder = {"name": ENCODER_NAME, **deployment_options(settings.encoder)}
    if settings.encoder.num_gpus is None:
        # Options in the YAML replace the code's: leave the encoder's resources to `build_app`, which gives it a GPU
        # when the cluster has one.
        del encoder["ray_actor_options"]
    deployments = [encoder]
    for model in models:
        for shard in model.shards:
            deployments.append(
                {"name": shard_deployment_name(model.name, shard), **deployment_options(settings.shards)}
            )
    deployments.append({"name": ROUTER_NAME, **deployment_options(settings.router)})
    return {
        "proxy_location": "EveryNode",
        "http_options": {
            "host": settings.host,
            "port": settings.port,
            "request_timeout_s": settings.request_timeout_s,
        },
        "applications": [
            {
                "name": settings.app_name,
                "route_prefix": "/",
                "import_path": "retriever.serving.deployments:app_builder",
                "args": args,
                "logging_config": logging_config(settings),
                "deployments": deployments,
            }
        ],
    }


def logging_config(settings: ServeConfig) -> dict[str, Any]:
    return {"enable_access_log": settings.access_log}


def base_url(settings: ServeConfig) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def serve_in_process(settings: ServeConfig, models: Sequence[ServedModel]) -> None:
    """The API in this process (uvicorn, no Ray): every model and shard loaded here; blocks until interrupted."""
    import uvicorn

    from retriever.serving.http import create_app
    from retriever.serving.local import LocalBackend
    from retriever.serving.service import SearchService

    token = read_token(settings)
    app = create_app(SearchService(LocalBackend(models), settings), token)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


def serve_on_ray(
    settings: ServeConfig, models: Sequence[ServedModel], *, address: str | None, startup_timeout_s: float = 600
) -> str | None:
    """Deploy on Ray Serve and wait until the application runs. Returns the ingress when this process started Ray
    itself (then the caller keeps it alive), None on a running cluster (the application outlives this process)."""
    import ray
    from ray import serve

    from retriever.serving.deployments import build_app, wait_until_running

    read_token(settings)  # fail here, not in a replica, when the token is missing
    address = address or os.environ.get("RAY_ADDRESS")
    ingress = None
    if address is None:
        ingress, environment = ingress_environment(settings.ingress)
        if ingress == "haproxy":
            environment |= haproxy_instance_environment()
        for name, value in environment.items():
            os.environ.setdefault(name, value)  # the user's own setting wins
    elif settings.ingress != "auto":
        raise UserError(
            f"serve: ingress={settings.ingress} applies to the Ray that `retriever serve` starts; a running cluster's "
            "ingress is set where the cluster starts (README, Serving: RAY_SERVE_THROUGHPUT_OPTIMIZED and "
            "RAY_SERVE_ENABLE_HA_PROXY); leave ingress=auto with --address"
        )
    if not ray.is_initialized():
        # "local": a new Ray of this process's own, never one that happens to run on this machine already.
        ray.init(address=address or "local", configure_logging=False, log_to_driver=False)
    serve.start(
        http_options={"host": settings.host, "port": settings.port, "request_timeout_s": settings.request_timeout_s}
    )
    serve.run(
        build_app(settings, models),
        name=settings.app_name,
        route_prefix="/",
        blocking=False,
        logging_config=logging_config(settings),
    )
    wait_until_running(settings.app_name, startup_timeout_s)
    return ingress


def block_until_interrupted() -> None:
    """Keep the local service up until Ctrl-C or SIGTERM, then shut Serve and the local Ray down."""
    import signal

    import ray
    from ray import serve

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
