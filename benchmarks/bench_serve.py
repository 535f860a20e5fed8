"""Serving throughput and latency on loopback: the Ray Serve router with batching, the same with batching off, and
a plain FastAPI + uvicorn app that holds the same encoders and indexes in one process.

What is served: the quickstart sweep's champion sparse and dense encoders (MLflow registry, `@champion`) with the
indexes of its synthetic evaluation corpus (2,000 passages), exactly what `retriever serve --sweep` serves. Each
configuration is started as a user starts it (`retriever serve CONFIG`, `... --local`) in its own process tree;
requests alternate between the two models; queries are the synthetic benchmark's test queries. The load generator
is this process (asyncio + aiohttp, one connection per client); its CPU share of the machine is reported next to
every row, since it competes with the server for the same cores. So is the server's CPU per search and share of the
machine (every process of its tree: Ray's services, the replicas, HAProxy): the cost that batching removes.

Configurations (one replica per deployment; Serve's ingress is HAProxy when the `haproxy` binary is installed, as
`retriever serve` starts it by default):
  (a) serve        searches of the same model that queue while the router is busy form one batch (up to 64; one
                   batch in flight per model; the next waits up to 5 ms for the clients just answered to return):
                   one encoder call and one call per shard per batch, over gRPC (Serve's throughput mode); the
                   QueryEncoder and IndexShards batch calls again (`@serve.batch`, no wait)
  (b) serve-nobatch  the same with max_batch_size=1 at every hop (the router still runs up to 64 requests per model
                   at once)
  (c) plain        `retriever serve --local`: one uvicorn process, torch on all cores
  (c1) plain-1t    the same with one torch thread (OMP_NUM_THREADS=1), the threads a Serve encoder replica gets
  (d) serve-noop   Serve's own ceiling on this machine: a FastAPI ingress deployment answering a fixed top-10 (no
                   encoder, no shards), behind the same ingress as (a)
  (e) serve-proxy  (a) behind Serve's Python proxy actor instead (`ingress=proxy`): one more process and Ray call
                   per request

Goals at 16 clients: (a) >= 3x (b), (a) >= (c). This machine's speed drifts between minutes, so (a) and (b) are then
started again, alternately (`--pairs`), and the ratio is given per adjacent pair and as their median.

Run from the repository root after the quickstart:  PYTHONPATH=. python benchmarks/bench_serve.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 4, 16, 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


def start(config: Path, port: int, extra: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "retriever", "serve", str(config), "--set", f"port={port}", *extra]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def tree_cpu_seconds(pid: int) -> dict[tuple[int, float], float]:
    """CPU seconds (user + system) of process ``pid`` and all its descendants: with `retriever serve` that is Ray's
    services, every replica and HAProxy. Keyed by (pid, start time), so a reused pid is not mistaken for another."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for process in processes:
        try:
            times = process.cpu_times()
            out[(process.pid, process.create_time())] = times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return out


def server_cpu_seconds(before: dict[tuple[int, float], float], after: dict[tuple[int, float], float]) -> float:
    """CPU the server's processes spent between two `tree_cpu_seconds` samples (one started in between counts from
    its start; one that ended in between is not counted)."""
    return sum(seconds - before.get(key, 0.0) for key, seconds in after.items())


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def load(url: str, queries: list[str], clients: int, duration_s: float, max_requests: int, k: int) -> dict:
    """`clients` connections sending back-to-back searches for `duration_s` (or `max_requests` in all)."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    deadline = time.perf_counter() + duration_s

    async def client(worker: int, session: aiohttp.ClientSession) -> None:
        nonlocal sent
        i = worker
        while time.perf_counter() < deadline and sent < max_requests:
            sent += 1
            body = {"query": queries[i % len(queries)], "k": k, "model": ("sparse", "dense")[i % 2]}
            i += clients
            began = time.perf_counter()
            try:
                async with session.post(url + "/search", json=body) as response:
                    payload = await response.json()
                    if response.status != 200 or payload.get("partial") or len(payload["hits"]) != k:
                        errors[str(response.status)] = errors.get(str(response.status), 0) + 1
                        continue
            except (TimeoutError, aiohttp.ClientError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - began)

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        await asyncio.gather(*(client(w, session) for w in range(clients)))
        cpu1, wall1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    wall = wall1 - wall0
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    lat = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "qps": len(latencies) / wall,
        "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p95": float(np.percentile(lat, 95)) if len(lat) else float("nan"),
        "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "loadgen_cpu": cpu / wall / (os.cpu_count() or 1),
    }


def noop_server(port: int) -> None:
    """(d): the cheapest FastAPI app Serve can host, shaped like /search; runs until SIGTERM."""
    import ray
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()
    hits = [{"docid": f"doc-{i:06d}", "score": 1.0 - i / 10} for i in range(10)]

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
    @serve.ingress(app)
    class Noop:
        @app.post("/search")
        async def search(self, body: dict) -> dict:
            return {"hits": hits[: body.get("k", 10)], "model": body.get("model"), "took_ms": 0.0, "partial": False}

        @app.get("/healthz")
        async def healthz(self) -> dict:
            return {"status": "ok"}

    from retriever.serving.launch import ingress_environment

    os.environ.update(ingress_environment("auto")[1])  # the ingress of (a)
    ray.init(configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Noop.bind(), name="noop", route_prefix="/", logging_config={"enable_access_log": False})
    signal.signal(signal.SIGTERM, lambda *_: (serve.shutdown(), ray.shutdown(), sys.exit(0)))
    while True:
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, default=ROOT / "runs" / "sweeps" / "quickstart")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of load per row")
    parser.add_argument("--max-requests", type=int, default=5000, help="requests per row at most")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument(
        "--only", nargs="+", default=["serve", "serve-nobatch", "plain", "plain-1t", "serve-noop", "serve-proxy"]
    )
    parser.add_argument(
        "--pairs", type=int, default=3, help="(a)/(b) pairs at 16 clients, started alternately (the first: main rows)"
    )
    parser.add_argument("--noop-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1 (the first pair is the main rows)")
    if args.noop_server:
        noop_server(args.noop_server)
        return 0

    from retriever.data.sources import load_source
    from retriever.serving.champions import champion_config

    if not (args.sweep / "sweep.json").is_file():
        print(f"{args.sweep}: no sweep there; run `retriever quickstart` first", file=sys.stderr)
        return 2
    settings, tracking = champion_config(args.sweep)
    queries = [text for _, text in load_source(settings.models[0].corpus).queries()][:500]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    config = work / "serve.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "RAY_USAGE_STATS_ENABLED": "0"}
    nobatch = [part for hop in ("router", "encoder", "shards") for part in ("--set", f"{hop}.max_batch_size=1")]
    nobatch += ["--set", "router.max_concurrent_batches=64"]  # requests still run concurrently, one per call
    variants = {
        "serve": ([], env),
        "serve-nobatch": (nobatch, env),
        "serve-proxy": (["--set", "ingress=proxy"], env),
        "plain": (["--local"], env),
        "plain-1t": (["--local"], {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
        "serve-noop": ([], env),
    }
    print(
        f"machine: {os.cpu_count()} cores; models: sparse + dense champions of {args.sweep}; k={args.k}; "
        f"{args.duration:.0f} s or {args.max_requests} requests per row; requests alternate sparse/dense"
    )
    from retriever.serving.launch import ingress_environment

    print(f"Serve ingress of (a), (b), (d): {ingress_environment('auto')[0]}")
    print(
        "threads: Serve replicas get OMP_NUM_THREADS=1 from Ray (fractional CPUs); plain: torch on all cores; "
        "plain-1t: one torch thread"
    )

    def run(name: str, concurrency: list[int], label: str = "") -> list[tuple[str, int, dict]]:
        """Start configuration ``name`` as a user would, warm it up, measure each concurrency, stop it; rows and
        log are named ``label`` (default: the name)."""
        label = label or name
        extra, variant_env = variants[name]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if name == "serve-noop":
            command = [sys.executable, __file__, "--noop-server", str(port)]
            log = (work / f"{label}.log").open("w")
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        else:
            process = start(config, port, extra, variant_env, work / f"{label}.log")
        measured = []
        try:
            began = time.perf_counter()
            wait_healthy(url, process, 600)
            ready = time.perf_counter() - began
            asyncio.run(load(url, queries, 4, 3.0, 200, args.k))  # warm-up: models loaded, kernels compiled
            for clients in concurrency:
                cpu_before, wall_before = tree_cpu_seconds(process.pid), time.perf_counter()
                result = asyncio.run(load(url, queries, clients, args.duration, args.max_requests, args.k))
                cpu = server_cpu_seconds(cpu_before, tree_cpu_seconds(process.pid))
                result["server_cpu_ms"] = 1000 * cpu / max(result["requests"], 1)
                result["server_cpu"] = cpu / (time.perf_counter() - wall_before) / (os.cpu_count() or 1)
                measured.append((label, clients, result))
                failed = sum(result["errors"].values())
                print(
                    f"{label:<14} clients {clients:>3}  {result['qps']:8.1f} QPS  p50 {result['p50']:7.1f} ms  "
                    f"p95 {result['p95']:7.1f} ms  p99 {result['p99']:7.1f} ms  errors {failed}"
                    f"  server CPU {result['server_cpu_ms']:.2f} ms/search, {100 * result['server_cpu']:.0f}%"
                    f"  load generator {100 * result['loadgen_cpu']:.0f}%  (ready in {ready:.0f} s)",
                    flush=True,
                )
        finally:
            stop(process)
        return measured

    rows = [row for name in args.only for row in run(name, args.concurrency)]
    by = {(name, clients): result for name, clients, result in rows}
    if ("serve", 16) in by and ("serve-nobatch", 16) in by:
        # This machine's speed drifts between minutes, so one (a) and one (b) row minutes apart can be off by a third:
        # (a) and (b) are measured again, alternately, and the ratio is taken per adjacent pair.
        pairs = [(by[("serve", 16)], by[("serve-nobatch", 16)])]
        for pair in range(2, args.pairs + 1):
            again = {name: run(name, [16], f"{name} (pair {pair})")[0] for name in ("serve", "serve-nobatch")}
            rows.extend(again.values())
            pairs.append((again["serve"][2], again["serve-nobatch"][2]))
        ratios = [a["qps"] / b["qps"] for a, b in pairs]
        listed = ", ".join(f"{a['qps']:.0f}/{b['qps']:.0f} = {a['qps'] / b['qps']:.2f}x" for a, b in pairs)
        print(f"\nat 16 clients, (a) batched / (b) unbatched, pair by pair: {listed}")
        print(f"median of {len(ratios)} pairs: {float(np.median(ratios)):.2f}x (goal >= 3x)")
        # Server CPU per search is the cost that batching removes.
        costs = ", ".join(f"{b['server_cpu_ms']:.2f}/{a['server_cpu_ms']:.2f} ms" for a, b in pairs)
        cost_ratios = [b["server_cpu_ms"] / a["server_cpu_ms"] for a, b in pairs]
        print(
            f"server CPU per search, (b) unbatched / (a) batched, pair by pair: {costs}; "
            f"median {float(np.median(cost_ratios)):.2f}x"
        )
        if ("plain", 16) in by:
            a, c = by[("serve", 16)]["qps"], by[("plain", 16)]["qps"]
            print(f"at 16 clients: serve / plain {a / c:.2f} (goal >= 1)")
    print(
        "\n| configuration | clients | QPS | p50 ms | p95 ms | p99 ms | errors | server CPU ms/search | server CPU "
        "| load generator CPU |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, clients, r in rows:
        print(
            f"| {name} | {clients} | {r['qps']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
            f"{sum(r['errors'].values())} | {r['server_cpu_ms']:.2f} | {100 * r['server_cpu']:.0f}% | "
            f"{100 * r['loadgen_cpu']:.0f}% |"
        )
    total_errors = sum(sum(r["errors"].values()) for _, _, r in rows)
    print(f"errors in all rows: {total_errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
