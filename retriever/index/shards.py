"""A sharded index: build N shards from an encodings folder, open them, search them all and merge the top-k.

Layout of an index folder::

    <out_dir>/shards.json          the set: kind, paradigm, encoder, partition scheme, shard folders, doc counts
    <out_dir>/shard-00000/         one shard (manifest.json, doc_ids.txt, the kind's files), see base.py
    ...

Partitions (``partition=``): ``contiguous`` splits the encoded rows (files in name order, rows in file order) into N
consecutive ranges of near-equal size; ``hash`` sends a document to shard ``blake2b-64(doc_id UTF-8) mod N``
(stable across runs and machines, independent of row order). Results do not depend on the partition: every shard
breaks ties by doc id and ``merge_topk`` does too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Unpack

import numpy as np

from retriever import telemetry
from retriever.encoding.batches import Batch, EncodingFormatError
from retriever.encoding.store import EncodingInfo, estimate_encodings_bytes, read_encoding_info, read_encodings
from retriever.errors import SettingError
from retriever.index.base import (
    Device,
    Hits,
    IndexShard,
    OpenOptions,
    build_shard,
    default_kind,
    kind_class,
    open_shard,
)
from retriever.index.manifest import MANIFEST_FILE, REBUILD, IndexFormatError, IndexMismatchError, content_checksum
from retriever.index.memory import check_memory
from retriever.outputs import atomic_directory, atomic_file, write_text_atomic
from retriever.trec import write_run

SHARDS_FILE = "shards.json"
SET_FORMAT = "retriever-index"
SET_FORMAT_VERSION = 1
Partition = Literal["contiguous", "hash"]


# --------------------------------------------------------------------------------------------------------------
# Merging


def merge_topk(per_shard: Sequence[Sequence[Sequence[tuple[str, float]]]], k: int) -> list[Hits]:
    """Global top-``k`` per query from per-shard top-k lists: ``per_shard[s][q]`` is shard ``s``'s ranked
    ``(doc id, score)`` list for query ``q``. Result per query: score descending, ties by doc id ascending.
    Every shard must answer every query (same number of query lists)."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if not per_shard:
        return []
    nq = len(per_shard[0])
    for s, lists in enumerate(per_shard):
        if len(lists) != nq:
            raise ValueError(f"shard {s} answered {len(lists)} queries, shard 0 answered {nq}")
    merged: list[Hits] = []
    for q in range(nq):
        hits = [hit for lists in per_shard for hit in lists[q]]
        hits.sort(key=lambda hit: (-hit[1], hit[0]))
        merged.append(hits[:k])
    return merged


# --------------------------------------------------------------------------------------------------------------
# Building


def shard_assignment(doc_ids: Sequence[str], num_shards: int, partition: Partition) -> np.ndarray:
    """Shard number of every row (int64), see the module docstring."""
    n = len(doc_ids)
    if partition == "contiguous":
        # Row i goes to floor(i * N / n): consecutive ranges whose sizes differ by at most one.
        return (np.arange(n, dtype=np.int64) * num_shards) // max(n, 1)
    if partition == "hash":
        digests = [hashlib.blake2b(d.encode("utf-8"), digest_size=8).digest() for d in doc_ids]
        values = np.frombuffer(b"".join(digests), dtype="<u8") if digests else np.zeros(0, dtype="<u8")
        return (values % np.uint64(num_shards)).astype(np.int64)
    raise SettingError(f"unknown partition {partition!r}; use 'contiguous' or 'hash'")


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def _is_index_folder(directory: Path) -> bool:
    """Whether ``directory`` holds only what an index build writes (an earlier build, which may be replaced)."""
    return all(p.name.startswith((SHARDS_FILE, "shard-")) for p in directory.iterdir())


def _check_build_memory(
    encodings_dir: Path,
    info: EncodingInfo,
    num_shards: int,
    kind: str,
    params: Mapping[str, Any],
    prune_doc_top_k: int | None,
    memory_budget_bytes: int | None,
) -> None:
    """Before anything is read: the input (parquet footers' uncompressed sizes) plus one shard's build must fit."""
    input_bytes = estimate_encodings_bytes(encodings_dir)
    per_shard_docs = -(-info.count // num_shards)
    nnz = input_bytes // 8 if info.paradigm == "sparse" else 0  # int32 term id + float32 weight per entry
    if prune_doc_top_k is not None:  # pruned while reading, file by file
        nnz = min(nnz, info.count * prune_doc_top_k)
        input_bytes = min(input_bytes, nnz * 8 + info.count * 8)
    per_shard_nnz = -(-nnz // num_shards)
    estimate = (
        input_bytes
        + info.count * 64  # the doc-id strings
        + 2 * input_bytes // num_shards  # the shard's slice and its sorted copy
        + kind_class(kind).estimate_build_bytes(per_shard_docs, info.size, per_shard_nnz, params)
    )
    check_memory(
        estimate,
        f"indexing {info.count} {info.paradigm} vectors from {encodings_dir} as {num_shards} {kind!r} shard(s)",
        f"use more shards (num_shards > {num_shards}) or prune terms per document (prune_doc_top_k)"
        if info.paradigm == "sparse"
        else f"use more shards (num_shards > {num_shards}) or a machine with more memory",
        memory_budget_bytes,
    )


def _write_shard_set(
    out_dir: Path, kind: str, info: EncodingInfo, doc_count: int, partition: Partition, entries: list[dict[str, Any]]
) -> None:
    """``shards.json``, written last (atomically): its presence marks a finished build."""
    content: dict[str, Any] = {
        "format": SET_FORMAT,
        "format_version": SET_FORMAT_VERSION,
        "kind": kind,
        "paradigm": info.paradigm,
        "encoder": {"path": info.encoder_path, "sha256": info.encoder_sha256},
        "doc_count": doc_count,
        "partition": partition,
        "num_shards": len(entries),
        "shards": entries,
    }
    content["checksum"] = content_checksum(content)
    write_text_atomic(out_dir / SHARDS_FILE, json.dumps(content, indent=2) + "\n")


def build_shards(
    encodings_dir: str | Path,
    out_dir: str | Path,
    num_shards: int = 1,
    kind: str | None = None,
    *,
    partition: Partition = "contiguous",
    params: Mapping[str, Any] | None = None,
    prune_doc_top_k: int | None = None,
    prune_query_top_k: int | None = None,
    device: Device = "auto",
    memory_budget_bytes: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Index the encodings in ``encodings_dir`` as ``num_shards`` shards of ``kind`` under ``out_dir``.

    ``kind``: ``exact`` (default for sparse) or ``seismic``; ``flat`` (default for dense) or ``hnsw``. ``params``
    are the kind's build/search parameters (see each kind's ``build_defaults``/``search_defaults``). The memory of
    the input and of one shard's build is estimated and checked before anything is read or built. Returns the shard
    folders. The build runs in a temporary sibling of ``out_dir`` (under its writer lock) and is renamed into place
    once ``shards.json`` (written last) is there; ``overwrite`` replaces an earlier index only then.
    """
    encodings_dir, out_dir = Path(encodings_dir), Path(out_dir)
    info = read_encoding_info(encodings_dir)
    kind = kind or default_kind(info.paradigm)
    cls = kind_class(kind, info.paradigm)
    resolved = cls.resolve_params(params)
    if num_shards < 1:
        raise SettingError(f"num_shards must be at least 1, got {num_shards}")
    if info.count < num_shards:
        raise SettingError(f"{encodings_dir} holds {info.count} documents, fewer than num_shards={num_shards}")

    _check_build_memory(encodings_dir, info, num_shards, kind, resolved, prune_doc_top_k, memory_budget_bytes)
    with atomic_directory(out_dir, overwrite=overwrite, what="an index folder", ours=_is_index_folder) as work:
        info, batch = read_encodings(encodings_dir, prune_top_k=prune_doc_top_k)
        assignment = shard_assignment(batch.ids, num_shards, partition)
        counts = np.bincount(assignment, minlength=num_shards)
        if (counts == 0).any():
            raise SettingError(
                f"shard(s) {np.flatnonzero(counts == 0).tolist()} would be empty ({partition} partition of "
                f"{len(batch)} documents); use fewer shards"
            )
        entries: list[dict[str, Any]] = []
        for i in range(num_shards):
            rows = np.flatnonzero(assignment == i)
            started = time.perf_counter()
            manifest = build_shard(
                batch.take(rows),
                work / _shard_name(i),
                kind,
                encoder_path=info.encoder_path,
                encoder_sha256=info.encoder_sha256,
                params=resolved,
                prune_doc_top_k=prune_doc_top_k,
                prune_query_top_k=prune_query_top_k,
                encoding_prune_top_k=info.prune_top_k,
                device=device,
                memory_budget_bytes=memory_budget_bytes,
            )
            telemetry.record(telemetry.INDEX_SHARD_SECONDS, time.perf_counter() - started, backend=kind)
            telemetry.record(telemetry.INDEX_PASSAGES, manifest.doc_count, backend=kind)
            entries.append({"dir": _shard_name(i), "doc_count": manifest.doc_count})
        _write_shard_set(work, kind, info, len(batch), partition, entries)
    return [out_dir / entry["dir"] for entry in entries]


def index_complete(directory: str | Path) -> bool:
    """Whether ``directory`` holds a finished index build (its ``shards.json``, written last, exists)."""
    return (Path(directory) / SHARDS_FILE).is_file()


# --------------------------------------------------------------------------------------------------------------
# Opening


def read_shard_set(directory: str | Path) -> dict[str, Any]:
    """The verified content of ``shards.json``."""
    path = Path(directory) / SHARDS_FILE
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFormatError(
            f"{path}: missing; {Path(directory)} is neither an index folder nor a shard (or its build did not "
            f"finish); {REBUILD}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{path}: not valid JSON ({exc}); {REBUILD}") from None
    if not isinstance(content, dict) or content.get("format") != SET_FORMAT:
        raise IndexFormatError(f"{path}: not a {SET_FORMAT} file; {REBUILD}")
    if content.get("format_version") != SET_FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: index format version {content.get('format_version')!r}, this version of retriever reads "
            f"{SET_FORMAT_VERSION}; {REBUILD}"
        )
    if content.get("checksum") != content_checksum(content):
        raise IndexFormatError(f"{path}: checksum does not match the content (edited or corrupted); {REBUILD}")
    return content


def open_shards(directory: str | Path, **options: Unpack[OpenOptions]) -> list[IndexShard]:
    """Open every shard of an index folder (or a single shard folder), verifying each against its manifest and
    the set against ``shards.json`` (same kind, paradigm, encoder and size everywhere; no shard missing).
    ``options`` are `open_shard`'s, for every shard; ``search_params`` overrides search-time parameters (e.g.
    ``{"ef_search": 256}``)."""
    directory = Path(directory)
    open_one = functools.partial(open_shard, **options)
    if (directory / MANIFEST_FILE).is_file() and not (directory / SHARDS_FILE).is_file():
        return [open_one(directory)]
    content = read_shard_set(directory)
    entries = content["shards"]
    if len(entries) != content["num_shards"]:
        raise IndexFormatError(f"{directory / SHARDS_FILE}: lists {len(entries)} of {content['num_shards']} shards")
    on_disk = {p.name for p in directory.iterdir() if p.is_dir()}
    listed = {entry["dir"] for entry in entries}
    if on_disk - listed:
        raise IndexFormatError(
            f"{directory}: unexpected folder(s) {', '.join(sorted(on_disk - listed))} not listed in {SHARDS_FILE}; "
            f"remove them or {REBUILD}"
        )
    shards: list[IndexShard] = []
    for entry in entries:
        folder = directory / entry["dir"]
        if not folder.is_dir():
            raise IndexFormatError(f"{folder}: shard listed in {SHARDS_FILE} is missing; {REBUILD}")
        shard = open_one(folder)
        m = shard.manifest
        expected = (content["kind"], content["paradigm"], content["encoder"], entry["doc_count"])
        if (m.kind, m.paradigm, m.encoder, m.doc_count) != expected:
            raise IndexFormatError(
                f"{folder}: shard ({m.kind}, {m.paradigm}, encoder {m.encoder.get('sha256', '')[:16]}…, "
                f"{m.doc_count} docs) does not belong to the set in {directory / SHARDS_FILE}; {REBUILD}"
            )
        shards.append(shard)
    check_compatible(shards)
    return shards


def check_compatible(shards: Sequence[IndexShard]) -> None:
    """All shards must search the same vector space with the same encoder and query pruning."""
    if not shards:
        raise ValueError("no shards to search")
    first = shards[0].manifest
    for shard in shards[1:]:
        m = shard.manifest
        if (m.paradigm, m.size, m.encoder.get("sha256"), m.pruning.get("query_top_k")) != (
            first.paradigm,
            first.size,
            first.encoder.get("sha256"),
            first.pruning.get("query_top_k"),
        ):
            raise IndexMismatchError(
                f"shards {shards[0].directory} and {shard.directory} differ in paradigm, size, encoder or query "
                "pruning; search shards of one index together"
            )


# --------------------------------------------------------------------------------------------------------------
# Searching


def search_shards(
    shards: Sequence[IndexShard], queries: Batch, k: int, *, batch_size: int = 4096
) -> dict[str, dict[str, float]]:
    """Global top-``k`` of every query over all shards: ``{query id: {doc id: score}}``, each inner dict in rank
    order (score descending, ties by doc id ascending). Queries go to the shards ``batch_size`` at a time."""
    if k <= 0:
        raise SettingError(f"k must be positive, got {k}")
    if batch_size <= 0:
        raise SettingError(f"batch_size must be positive, got {batch_size}")
    check_compatible(shards)
    if len(set(queries.ids)) != len(queries.ids):
        raise EncodingFormatError("query ids must be unique; encode each query once")
    run: dict[str, dict[str, float]] = {}
    for start in range(0, len(queries), batch_size):
        rows = np.arange(start, min(start + batch_size, len(queries)))
        batch = queries if len(rows) == len(queries) else queries.take(rows)
        merged = merge_topk([shard.search(batch, k) for shard in shards], k)
        for qid, hits in zip(batch.ids, merged):
            run[qid] = dict(hits)
    return run


def search_to_run(
    index_dir: str | Path,
    queries_dir: str | Path,
    k: int,
    *,
    output: str | Path | None = None,
    tag: str = "retriever",
    batch_size: int = 4096,
    device: Device = "auto",
    search_params: Mapping[str, Any] | None = None,
    verify_hashes: bool = True,
    check_encoder: bool = True,
    overwrite: bool = False,
) -> dict[str, dict[str, float]]:
    """Search an index folder with encoded queries (an encodings folder of ``kind: query``) and optionally write a
    TREC run (an existing one is replaced only with ``overwrite``; the file is checked before the search and
    written whole).

    With ``check_encoder`` the queries' encoder sha256 (their ``encoding.json``) must match the index's."""
    if k <= 0:
        raise IndexMismatchError(f"k must be a positive number of hits per query, got {k}")
    info, queries = read_encodings(queries_dir)
    if info.kind != "query":
        raise IndexMismatchError(
            f"{queries_dir}: holds {info.kind} encodings, not queries; encode the queries with `--kind query` "
            "(queries and passages differ in length and, for some encoders, in how they are encoded)"
        )
    try:
        shards = open_shards(
            index_dir,
            expected_encoder_sha256=info.encoder_sha256 if check_encoder else None,
            verify_hashes=verify_hashes,
            device=device,
            search_params=search_params,
        )
    except IndexMismatchError as exc:
        raise IndexMismatchError(f"queries {queries_dir} (encoder {info.encoder_path!r}) do not fit: {exc}") from None
    if output is None:
        return search_shards(shards, queries, k, batch_size=batch_size)
    with atomic_file(output, overwrite=overwrite, what="the run file") as tmp:
        run = search_shards(shards, queries, k, batch_size=batch_size)
        write_run(run, tmp, tag)
    return run


def index_summary(shards: Sequence[IndexShard]) -> dict[str, Any]:
    """A JSON-able description of opened shards (for CLIs and logs)."""
    first = shards[0].manifest
    return {
        "kind": first.kind,
        "paradigm": first.paradigm,
        "encoder": first.encoder,
        "num_shards": len(shards),
        "doc_count": sum(s.doc_count for s in shards),
        "dimension" if first.paradigm == "dense" else "vocab_size": first.size,
        "params": shards[0].params,
        "pruning": first.pruning,
        "shards": [str(s.directory) for s in shards],
    }
