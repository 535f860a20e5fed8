"""Shared test setup: offline environment, the location of ../shared/data, small helpers."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest

# Offline and quiet before any library import reads these.
_SCRATCH = Path(tempfile.mkdtemp(prefix="retriever-tests-"))
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "IR_DATASETS_DL_TRIES": "1",
}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("IR_DATASETS_HOME", str(_SCRATCH / "ir_datasets"))
# Tests choose their MLflow stores; a developer's own tracking server must not receive their runs.
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RETRIEVER_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free just now, drawn between Ray's default worker ports (up to
    19999) and the kernel's ephemeral range, where `bind(0)` and outgoing connections get theirs: so no other
    process is handed one of them before the test's server binds it."""
    import random
    import socket

    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    candidates = random.sample(range(20000, ephemeral), k=max(0, ephemeral - 20000))
    ports: list[int] = []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    sockets = [socket.socket() for _ in range(count)]  # no such range here: the kernel's choice
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data; the calling test is skipped when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (real offline data; see ../shared/data/README.md)")
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs {SHARED_DATA} (real offline data)")
    return SHARED_DATA


TINY_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a retriever encodes queries and passages into vectors",
    "sparse vectors live in the vocabulary space of the language model",
    "dense vectors are normalised token states averaged over the text",
    "bidirectional attention lets every token see every other token",
    "low rank adapters train a small number of parameters",
    "the budget planner turns a flop budget into training steps",
    "contrastive learning pulls positives close and pushes negatives away",
    "distillation matches the margins of a cross encoder teacher",
    "ray shards the data and runs the workers on the cluster",
] * 3


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained offline on a few sentences (deterministic)."""
    from retriever.models.tokenizers import train_bpe_tokenizer

    return train_bpe_tokenizer(TINY_CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (started on first use); logical CPUs oversubscribed so that Train
    workers, Data tasks and Tune drivers never starve each other on a 2-core machine."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        log_to_driver=False,
        configure_logging=False,
    )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def write_encodings(
    directory: Path,
    batch,  # retriever.encoding.Batch
    *,
    encoder_path: str,
    encoder_sha256: str,
    prune_top_k: int | None = None,
    rows_per_file: int = 100_000,
    kind: str = "passage",
):  # -> retriever.encoding.EncodingInfo
    """An encodings folder holding ``batch``, written by the production writer (`EncodingWriter`)."""
    from retriever.encoding.store import EncodingWriter

    directory.mkdir(parents=True, exist_ok=True)
    writer = EncodingWriter(directory, batch.paradigm, rows_per_file)
    writer.write(batch)
    return writer.finish(
        size=batch.dimension,
        encoder_path=encoder_path,
        encoder_sha256=encoder_sha256,
        kind=kind,
        max_length=64,
        prune_top_k=prune_top_k,
    )


def merged(base: dict, sections: dict) -> dict:
    """``base`` with each of ``sections`` updating its section (a non-dict value replaces it)."""
    out = dict(base)
    for section, values in sections.items():
        out[section] = {**out.get(section, {}), **values} if isinstance(values, dict) else values
    return out


TINY_EXPERIMENT = {
    "backbone": {"name": "tiny-s", "tokenizer": "synthetic"},
    "encoder": {"paradigm": "sparse", "query_max_length": 16, "passage_max_length": 64},
    "loss": {"name": "cl", "num_negatives": 3},
    "budget": {"max_steps": 6},
    "train": {"batch_size": 8, "checkpoint_every": 3, "lr": 1e-3},
    "data": {"synthetic_docs": 400, "synthetic_train_queries": 200, "synthetic_test_queries": 40},
    "tracking": {"enabled": False},
}


# What the Ray sweep and job tests run: tiny-s dense CL on a small synthetic benchmark, full fine-tuning, evaluated.
SMALL_SWEEP_EXPERIMENT = {
    "backbone": {"name": "tiny-s", "tokenizer": "synthetic", "lora": {"enabled": False}},
    "encoder": {"paradigm": "dense", "query_max_length": 16, "passage_max_length": 48},
    "loss": {"name": "cl", "num_negatives": 3},
    "budget": {"max_steps": 6},
    "train": {"batch_size": 8, "lr": 1e-3, "checkpoint_every": 3, "log_every": 1},
    "data": {"synthetic_docs": 300, "synthetic_train_queries": 120, "synthetic_test_queries": 30},
    "eval": {"datasets": ["synthetic/test"], "batch_size": 64},
}


def write_experiment(path: Path, **overrides) -> Path:
    """`SMALL_SWEEP_EXPERIMENT` as YAML at ``path``, ``overrides`` setting `section.key` (or top-level) values."""
    import json

    import yaml

    data = json.loads(json.dumps(SMALL_SWEEP_EXPERIMENT))
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def make_config(output_dir, name: str, **sections):  # -> retriever.config.ExperimentConfig
    """The tests' experiment: a tiny sparse CL run on the synthetic benchmark, ``sections`` updating its sections."""
    from retriever.config import config_from_dict
    from retriever.data.catalog import resolve_references

    base = merged({**TINY_EXPERIMENT, "name": name}, {"train": {"output_dir": str(output_dir)}})
    return resolve_references(config_from_dict(merged(base, sections)))


def check_stage_run(cfg, task: str, *, steps: int, lr: float, tokens: int) -> dict:
    """Train a pre-training stage (``task``) and check it ran on its own settings: ``steps`` steps as planned, a
    learning rate decaying linearly from ``lr`` (no warm-up), ``tokens`` tokens, finite losses. Returns the result."""
    from retriever.train.trainer import run_training

    reports: list[dict[str, float]] = []
    result = run_training(cfg, task=task, on_report=reports.append)
    logged = [m for m in reports if f"loss/{task}" in m]
    assert result["steps"] == steps == len(logged) and result["planned_steps"] == steps
    assert logged[0]["lr"] == pytest.approx(lr) and all(m["lr"] < lr for m in logged[1:])
    assert result["tokens"] == tokens
    assert all(math.isfinite(m[f"loss/{task}"]) for m in logged)
    return result


# --------------------------------------------------------------------------------------------------------------
# Serving: two tiny encoders, a small registered corpus, their indexes (1 and 3 shards) and encoded queries.

SERVE_QUERIES = [
    "sparse vectors of the language model",
    "contrastive learning with negatives",
    "ray workers on the cluster",
    "the lazy dog",
    "train low rank adapters",
    "flop budget",
]


def search_during_fault(
    post,  # (query) -> requests.Response of POST /search with k=10
    expected: dict[str, list[str]],
    fault,  # () -> None: breaks something
    recovered,  # () -> bool: the service has healed
    *,
    workers: int = 4,
    timeout_s: float = 120.0,
) -> tuple[dict[str, int], bool]:
    """Searches from ``workers`` threads before, during and after ``fault``, until ``recovered()`` (checked every
    second, at most ``timeout_s``) and 2 s more. Outcomes: ok (the expected ids), unavailable (503 with
    Retry-After), wrong (other ids, or flagged partial), other (any other answer or no answer)."""
    import threading

    import requests

    outcomes = {"ok": 0, "unavailable": 0, "wrong": 0, "other": 0}
    stop = threading.Event()

    def client(worker: int) -> None:
        i = worker
        while not stop.is_set():
            query = SERVE_QUERIES[i % len(SERVE_QUERIES)]
            i += 1
            try:
                response = post(query)
            except requests.RequestException:
                outcomes["other"] += 1
                continue
            if response.status_code == 200:
                body = response.json()
                ids = [h["docid"] for h in body["hits"]]
                outcomes["wrong" if body["partial"] or ids != expected[query] else "ok"] += 1
            elif response.status_code == 503 and response.headers.get("Retry-After"):
                outcomes["unavailable"] += 1
            else:
                outcomes["other"] += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    healed = False
    try:
        time.sleep(2)
        fault()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(1)
            if recovered():
                healed = True
                break
        time.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    return outcomes, healed


def serve_docs() -> list[tuple[str, str]]:
    """60 passages (two sentences of TINY_CORPUS each), ids d00..d59."""
    base = TINY_CORPUS[:10]
    return [(f"d{i:02d}", f"{base[i % 10]}. {base[(i * 7 + 3) % 10]} {i}") for i in range(60)]


def save_encoder(tokenizer_dir: Path, directory: Path, paradigm: str, lora_seed: int = 1, **settings) -> Path:
    """A tiny encoder with non-zero LoRA weights (fresh B matrices are zero), saved like a trained one; ``settings``
    are `EncoderConfig` fields."""
    import torch

    from retriever.config import BackboneConfig, EncoderConfig
    from retriever.models.encoders import build_encoder

    backbone = BackboneConfig(name="tiny-s", tokenizer=str(tokenizer_dir), seed=3)
    encoder = build_encoder(backbone, EncoderConfig(paradigm=paradigm, **settings))
    generator = torch.Generator().manual_seed(lora_seed)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    encoder.save(directory)
    return directory


@pytest.fixture(scope="session")
def serving_world(tmp_path_factory, tiny_tokenizer_dir) -> dict:
    """Paths of everything a serve config needs, for a sparse and a dense model: ``{paradigm: {"encoder",
    "index" (1 shard), "index3" (3 shards), "queries" (encoded with `encode_corpus`)}}`` and ``"corpus"`` (a
    registered dataset id holding the passages' texts)."""
    from retriever.data.local import register_trec
    from retriever.encoding import encode_corpus
    from retriever.index import build_shards

    root = tmp_path_factory.mktemp("serving")
    docs = serve_docs()
    docs_file = root / "docs.tsv"
    docs_file.write_text("".join(f"{docid}\t{text}\n" for docid, text in docs), encoding="utf-8")
    corpus = register_trec("serve-docs", docs=docs_file)
    world: dict = {"corpus": corpus, "docs": dict(docs), "root": root}
    for paradigm, seed in (("sparse", 1), ("dense", 2)):
        encoder = save_encoder(
            tiny_tokenizer_dir, root / paradigm / "encoder", paradigm, seed, passage_max_length=48, query_max_length=24
        )
        encode_corpus(encoder, docs, root / paradigm / "encodings", progress=False)
        queries = [(f"q{i}", text) for i, text in enumerate(SERVE_QUERIES)]
        encode_corpus(encoder, queries, root / paradigm / "queries", kind="query", progress=False)
        build_shards(root / paradigm / "encodings", root / paradigm / "index", 1)
        build_shards(root / paradigm / "encodings", root / paradigm / "index3", 3, partition="hash")
        world[paradigm] = {
            "encoder": encoder,
            "index": root / paradigm / "index",
            "index3": root / paradigm / "index3",
            "queries": root / paradigm / "queries",
        }
    return world


class RecordedMetrics:
    """In-memory stand-ins for Ray's metric objects: the values each metric received, by tags."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))

    def instrument(self, metric):  # -> a stand-in with Ray's inc/set/observe
        values = self.values[metric.name]

        class Instrument:
            def _add(self, value, tags):
                values[tuple(sorted(tags.items()))].append(value)

            inc = set = observe = _add

        return Instrument()


@pytest.fixture
def recorded_metrics(monkeypatch) -> RecordedMetrics:
    """Every metric recorded through `retriever.telemetry` during the test, as if the process ran on Ray."""
    from retriever import telemetry

    store = RecordedMetrics()
    monkeypatch.setattr(telemetry, "_instrument", store.instrument)
    return store


def mining_world(root: Path):  # -> SimpleNamespace
    """What the mining tests mine: the tests' synthetic benchmark (`make_config`'s) as a local dataset, and a tiny
    random cross-encoder teacher; the BM25 index is built at ``root / "bm25"`` by the first job."""
    from types import SimpleNamespace

    from retriever.data.catalog import resolve_dataset, synthetic_benchmark
    from retriever.mining.teacher import build_tiny_cross_encoder

    experiment = make_config(root, "mining")
    bench = synthetic_benchmark(experiment)
    docs = bench.docs()
    return SimpleNamespace(
        root=root,
        experiment=experiment,
        bench=bench,
        docs=docs,
        dataset=resolve_dataset("synthetic/train", experiment),
        teacher=build_tiny_cross_encoder(root / "teacher", list(docs.values())),
        bm25=root / "bm25",
    )


def mine_settings(world, out: Path, **values):  # -> retriever.config.MineConfig
    """Mining settings over ``world``: BM25 top 8, the tiny teacher, 64 queries per shard, one process; ``values``
    replace top-level keys (dicts update their section)."""
    from retriever.config import MineConfig, config_from_dict

    base = {
        "dataset": world.dataset,
        "out": str(out),
        "pool_size": 8,
        "queries_per_shard": 64,
        "max_queries": 150,
        "workers": 0,
        "first_stage": {"kind": "bm25", "index": str(world.bm25)},
        "teacher": {"model": str(world.teacher), "max_length": 96, "batch_size": 16},
    }
    for key, value in values.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return config_from_dict(base, "test", model=MineConfig)


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of the group remains."""
    import psutil

    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group of ``process`` (started with ``start_new_session``: the command and every
    daemon it started), SIGKILL what is left after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            process.poll()
            if not group_alive(process.pid):
                return
            time.sleep(0.5)
