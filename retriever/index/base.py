"""The index-shard contract shared by every kind (exact, seismic, flat, hnsw), and building/opening one shard.

A shard indexes its documents in doc-id order (Python ``str`` order, i.e. by code point): a document's index id is
its position in that order. Every kind breaks score ties by the smaller index id, i.e. the smaller doc id, so results
do not depend on how documents were split into shards (``merge_topk`` breaks ties the same way).
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypedDict

import numpy as np

from retriever.encoding.batches import Batch, DenseBatch, EncodingFormatError, Paradigm, SparseBatch
from retriever.errors import SettingError
from retriever.index.manifest import (
    DOC_IDS_FILE,
    IndexFormatError,
    IndexMismatchError,
    Manifest,
    read_doc_ids,
    read_manifest,
    write_doc_ids,
    write_manifest,
)
from retriever.index.memory import check_memory
from retriever.registry import Registry

Device = Literal["auto", "cpu", "gpu"]
Hits = list[tuple[str, float]]


class IndexShard(ABC):
    """One loaded shard. Subclasses set ``kind``, ``paradigm``, ``build_defaults`` and ``search_defaults``."""

    kind: ClassVar[str]
    paradigm: ClassVar[Paradigm]
    build_defaults: ClassVar[dict[str, Any]] = {}
    search_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, directory: Path, manifest: Manifest, doc_ids: list[str]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.doc_ids = doc_ids
        self.params: dict[str, Any] = dict(manifest.params)

    # ---- per kind -------------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def estimate_build_bytes(cls, n_docs: int, size: int, nnz: int, params: Mapping[str, Any]) -> int:
        """Peak memory a build of this kind adds on top of the (already loaded) input batch."""

    @classmethod
    @abstractmethod
    def write(cls, batch: Batch, directory: Path, params: Mapping[str, Any], device: Device) -> None:
        """Build the index over ``batch`` (sorted by doc id) and write its files into ``directory``."""

    @classmethod
    @abstractmethod
    def load(cls, directory: Path, manifest: Manifest, doc_ids: list[str], device: Device) -> IndexShard:
        """Load a verified shard."""

    @abstractmethod
    def search_positions(self, queries: Batch, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` per query as (scores float32 [nq, k'], index ids int64 [nq, k']), best first, ties by smaller
        index id; ``k' <= k`` and missing hits are -1 with score -inf."""

    # ---- shared ---------------------------------------------------------------------------------------------
    @classmethod
    def resolve_params(cls, params: Mapping[str, Any] | None) -> dict[str, Any]:
        merged = {**cls.build_defaults, **cls.search_defaults}
        for name, value in (params or {}).items():
            if name not in merged:
                raise SettingError(
                    f"unknown parameter {name!r} for index kind {cls.kind!r}; known: {', '.join(sorted(merged))}"
                )
            merged[name] = value
        return merged

    def set_search_params(self, params: Mapping[str, Any] | None) -> None:
        """Override search-time parameters (e.g. HNSW ``ef_search``, seismic ``heap_factor``) for this process."""
        for name, value in (params or {}).items():
            if name not in self.search_defaults:
                raise SettingError(
                    f"{name!r} is not a search parameter of index kind {self.kind!r}; known: "
                    f"{', '.join(sorted(self.search_defaults)) or 'none'}"
                )
            self.params[name] = value

    @property
    def doc_count(self) -> int:
        return len(self.doc_ids)

    def check_queries(self, queries: Batch) -> Batch:
        where = f"index shard {self.directory}"
        if queries.paradigm != self.paradigm:
            raise IndexMismatchError(
                f"{where} is a {self.paradigm} index ({self.kind}) but the queries are {queries.paradigm} vectors; "
                "encode the queries with the encoder the index was built from"
            )
        if isinstance(queries, DenseBatch) and queries.dimension != self.manifest.dimension:
            raise IndexMismatchError(
                f"{where} holds {self.manifest.dimension}-dimensional vectors but the queries have dimension "
                f"{queries.dimension}; encode the queries with the same encoder, or rebuild the index"
            )
        if isinstance(queries, SparseBatch):
            if queries.vocab_size != self.manifest.vocab_size:
                raise IndexMismatchError(
                    f"{where} has a vocabulary of {self.manifest.vocab_size} terms but the queries have "
                    f"{queries.vocab_size}; encode the queries with the same encoder, or rebuild the index"
                )
            queries = queries.prune(self.manifest.pruning.get("query_top_k"))
        return queries

    def search(self, queries: Batch, k: int) -> list[Hits]:
        """Top-``k`` ``(doc id, score)`` per query, in query order, best first (ties: smaller doc id first)."""
        if k <= 0:
            raise SettingError(f"k must be positive, got {k}")
        queries = self.check_queries(queries)
        if len(queries) == 0 or self.doc_count == 0:
            return [[] for _ in range(len(queries))]
        scores, positions = self.search_positions(queries, min(k, self.doc_count))
        ids = self.doc_ids
        out: list[Hits] = []
        for row_scores, row_positions in zip(scores.tolist(), positions.tolist()):
            out.append([(ids[p], s) for s, p in zip(row_scores, row_positions) if p >= 0])
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r}, docs={self.doc_count})"


SHARD_KINDS: Registry[type[IndexShard]] = Registry("index kind")


def default_kind(paradigm: Paradigm) -> str:
    """``exact`` for sparse encodings, ``flat`` for dense ones."""
    return "exact" if paradigm == "sparse" else "flat"


def kind_class(kind: str, paradigm: Paradigm | None = None) -> type[IndexShard]:
    cls = SHARD_KINDS.get(kind)
    if paradigm is not None and cls.paradigm != paradigm:
        options = ", ".join(sorted(name for name, c in SHARD_KINDS.items() if c.paradigm == paradigm))
        raise SettingError(
            f"index kind {kind!r} indexes {cls.paradigm} vectors, but these are {paradigm}; use {options}"
        )
    return cls


def sort_by_doc_id(batch: Batch) -> Batch:
    """The batch in doc-id order; duplicate ids are refused (an index id must name one document)."""
    order = sorted(range(len(batch)), key=batch.ids.__getitem__)
    for a, b in zip(order, order[1:]):
        if batch.ids[a] == batch.ids[b]:
            raise EncodingFormatError(
                f"document id {batch.ids[a]!r} occurs more than once; document ids must be unique"
            )
    if order == list(range(len(batch))):
        return batch
    return batch.take(np.asarray(order, dtype=np.int64))


def _prepare_directory(directory: Path) -> None:
    if directory.exists():
        if not directory.is_dir() or any(directory.iterdir()):
            raise FileExistsError(f"{directory}: exists and is not empty; build each shard into a new folder")
    directory.mkdir(parents=True, exist_ok=True)


def build_shard(
    batch: Batch,
    directory: str | Path,
    kind: str | None = None,
    *,
    encoder_path: str,
    encoder_sha256: str,
    params: Mapping[str, Any] | None = None,
    prune_doc_top_k: int | None = None,
    prune_query_top_k: int | None = None,
    encoding_prune_top_k: int | None = None,
    device: Device = "auto",
    memory_budget_bytes: int | None = None,
) -> Manifest:
    """Index ``batch`` into the (new or empty) ``directory`` and write its manifest.

    ``prune_doc_top_k`` keeps each document's largest weights before indexing and ``prune_query_top_k`` is applied
    to every query at search time (sparse only; both recorded in the manifest). The memory estimate is checked
    against ``memory_budget_bytes`` (default: the memory available now) before anything is built.
    """
    cls = kind_class(kind or default_kind(batch.paradigm), batch.paradigm)
    resolved = cls.resolve_params(params)
    if batch.paradigm == "dense" and (prune_doc_top_k or prune_query_top_k):
        raise SettingError(
            "term pruning applies to sparse vectors only; leave prune_doc_top_k/prune_query_top_k unset"
        )
    for name, value in (("prune_doc_top_k", prune_doc_top_k), ("prune_query_top_k", prune_query_top_k)):
        if value is not None and value <= 0:
            raise SettingError(f"{name} must be a positive number of terms, got {value}")
    directory = Path(directory)
    nnz = batch.nnz if isinstance(batch, SparseBatch) else 0
    if isinstance(batch, SparseBatch) and prune_doc_top_k is not None:
        nnz = int(np.minimum(np.diff(batch.indptr), prune_doc_top_k).sum())
    # The sorted copy of the input plus the kind's own build memory.
    estimate = batch.nbytes() + cls.estimate_build_bytes(len(batch), batch.dimension, nnz, resolved)
    check_memory(
        estimate,
        f"building a {cls.kind!r} index shard over {len(batch)} documents",
        "prune terms per document (prune_doc_top_k) or split the corpus into more shards (num_shards)"
        if batch.paradigm == "sparse"
        else "split the corpus into more shards (num_shards) or use a machine with more memory",
        memory_budget_bytes,
    )
    _prepare_directory(directory)
    try:
        if isinstance(batch, SparseBatch):
            batch = batch.prune(prune_doc_top_k)
        batch = sort_by_doc_id(batch)
        write_doc_ids(directory / DOC_IDS_FILE, batch.ids)
        cls.write(batch, directory, resolved, device)
        manifest = Manifest(
            kind=cls.kind,
            paradigm=cls.paradigm,
            encoder={"path": encoder_path, "sha256": encoder_sha256},
            doc_count=len(batch),
            dimension=batch.dimension if batch.paradigm == "dense" else None,
            vocab_size=batch.dimension if batch.paradigm == "sparse" else None,
            params=resolved,
            pruning={
                "doc_top_k": prune_doc_top_k,
                "query_top_k": prune_query_top_k,
                "encoding_top_k": encoding_prune_top_k,
            },
        )
        return write_manifest(directory, manifest)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)  # never leave a half-built shard that looks like one
        raise


class OpenOptions(TypedDict, total=False):
    """Keyword arguments of `open_shard` (its signature has their defaults), for functions that pass them on."""

    expected_encoder_sha256: str | None
    verify_hashes: bool
    device: Device
    search_params: Mapping[str, Any] | None


def open_shard(
    directory: str | Path,
    *,
    expected_encoder_sha256: str | None = None,
    verify_hashes: bool = True,
    device: Device = "auto",
    search_params: Mapping[str, Any] | None = None,
) -> IndexShard:
    """Verify a shard's manifest and files, then load it."""
    directory = Path(directory)
    manifest = read_manifest(directory, verify_hashes=verify_hashes, expected_encoder_sha256=expected_encoder_sha256)
    try:
        cls = kind_class(manifest.kind)
    except KeyError as exc:
        raise IndexFormatError(f"{directory}: {exc.args[0]}; rebuild the index with this version") from None
    if cls.paradigm != manifest.paradigm:
        raise IndexFormatError(f"{directory}: kind {manifest.kind!r} with paradigm {manifest.paradigm!r}; rebuild")
    doc_ids = read_doc_ids(directory / manifest.doc_ids_file, manifest.doc_count)
    shard = cls.load(directory, manifest, doc_ids, device)
    shard.set_search_params(search_params)
    return shard
