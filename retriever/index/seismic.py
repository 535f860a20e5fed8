"""Approximate sparse shards on seismic (``pip install 'retriever[seismic]'``, package pyseismic-lsr).

``SeismicIndexLV`` is used because its u32 component ids cover vocabularies above 65,535 (Llama-3: 128,256).
Documents enter through ``SeismicDatasetLV.add_documents_by_id`` in CSR form; seismic's string document ids are the
index ids written as decimal strings (so doc ids of any length work), and query components are term ids as strings.
``batch_search`` returns its result lists in no particular order: they are keyed back by the query id each hit
carries. The index file is written by seismic's own ``save`` and covered by the manifest like every other file.
Documents without terms are not indexed by seismic (they cannot score above zero anyway).

seismic's Rust core prints progress to the process's stdout; builds, saves and loads send it to stderr instead,
so stdout stays clean for machine-readable output.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from retriever.encoding.batches import Batch, SparseBatch
from retriever.index.base import SHARD_KINDS, Device, IndexShard
from retriever.index.manifest import IndexFormatError, Manifest

INDEX_BASENAME = "seismic"
INDEX_FILE = INDEX_BASENAME + ".index.seismic"  # seismic's save() appends ".index.seismic"


def import_seismic():  # -> module
    try:
        import seismic
    except ImportError as exc:
        raise ImportError(
            f"the 'seismic' index kind needs pyseismic-lsr: pip install 'retriever[seismic]' ({exc}); or use the "
            "exact sparse index (kind 'exact')"
        ) from None
    return seismic


@contextlib.contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr for the duration (native code writes there directly)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _strings(values: list[str] | np.ndarray, seismic_module) -> np.ndarray:
    return np.asarray(values).astype(seismic_module.get_seismic_string())


@SHARD_KINDS.register("seismic")
class SeismicShard(IndexShard):
    """seismic ``SeismicIndexLV``: approximate; measure recall against ``exact`` for your data and settings."""

    kind = "seismic"
    paradigm = "sparse"
    # seismic's own defaults (tuned on MS MARCO SPLADE); num_threads 0 = all cores.
    build_defaults = {
        "n_postings": 3500,
        "centroid_fraction": 0.1,
        "min_cluster_size": 2,
        "summary_energy": 0.4,
        "max_fraction": 1.5,
        "doc_cut": 15,
        "build_threads": 0,
    }
    search_defaults = {"query_cut": 10, "heap_factor": 0.7, "search_threads": 0}

    def __init__(self, directory: Path, manifest: Manifest, doc_ids: list[str], index: Any) -> None:
        super().__init__(directory, manifest, doc_ids)
        self.index = index

    @classmethod
    def estimate_build_bytes(cls, n_docs: int, size: int, nnz: int, params: Mapping[str, Any]) -> int:
        # Measured with seismic 0.5.4 (random and tf-idf data): the dataset copy (12 bytes per entry), postings and
        # block summaries (up to ~150 bytes per entry on unclustered data), ~400 bytes per vocabulary entry.
        return nnz * 160 + size * 400 + n_docs * 64

    @classmethod
    def write(cls, batch: Batch, directory: Path, params: Mapping[str, Any], device: Device) -> None:
        assert isinstance(batch, SparseBatch)
        seismic = import_seismic()
        dataset = seismic.SeismicDatasetLV(dim=batch.vocab_size)
        ids = _strings([str(i) for i in range(len(batch))], seismic)
        with native_stdout_to_stderr():
            dataset.add_documents_by_id(
                ids, batch.indices.astype(np.int64), batch.weights, batch.indptr.astype(np.int64)
            )
            index = seismic.SeismicIndexLV.build_from_dataset(
                dataset,
                n_postings=int(params["n_postings"]),
                centroid_fraction=float(params["centroid_fraction"]),
                min_cluster_size=int(params["min_cluster_size"]),
                summary_energy=float(params["summary_energy"]),
                max_fraction=float(params["max_fraction"]),
                doc_cut=int(params["doc_cut"]),
                num_threads=int(params["build_threads"]),
            )
            index.save(str(directory / INDEX_BASENAME))
        if not (directory / INDEX_FILE).is_file():
            raise RuntimeError(f"seismic did not write {directory / INDEX_FILE}")

    @classmethod
    def load(cls, directory: Path, manifest: Manifest, doc_ids: list[str], device: Device) -> SeismicShard:
        seismic = import_seismic()
        try:
            with native_stdout_to_stderr():
                index = seismic.SeismicIndexLV.load(str(directory / INDEX_FILE))
        except (OSError, ValueError, RuntimeError) as exc:
            raise IndexFormatError(f"{directory / INDEX_FILE}: seismic cannot load it ({exc}); rebuild") from None
        if index.len > manifest.doc_count or index.dim != manifest.vocab_size:
            raise IndexFormatError(
                f"{directory / INDEX_FILE}: {index.len} documents over {index.dim} terms, but the manifest says "
                f"{manifest.doc_count} over {manifest.vocab_size}; rebuild the index"
            )
        return cls(directory, manifest, doc_ids, index)

    def search_positions(self, queries: Batch, k: int) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(queries, SparseBatch)
        seismic = import_seismic()
        nq = len(queries)
        out_s = np.full((nq, k), -np.inf, dtype=np.float32)
        out_p = np.full((nq, k), -1, dtype=np.int64)
        # Positional query ids: results come back out of order and are put back in place by these.
        components = [_strings(queries.row(i)[0].astype(str), seismic) for i in range(nq)]
        values = [np.ascontiguousarray(queries.row(i)[1]) for i in range(nq)]
        results = self.index.batch_search(
            _strings([str(i) for i in range(nq)], seismic),
            components,
            values,
            k=k,
            query_cut=int(self.params["query_cut"]),
            heap_factor=float(self.params["heap_factor"]),
            num_threads=int(self.params["search_threads"]),
        )
        for hits in results:
            if not hits:
                continue
            q = int(hits[0][0])
            ranked = sorted(((-float(score), int(doc)) for _, score, doc in hits))[:k]
            for j, (neg, doc) in enumerate(ranked):
                out_s[q, j] = -neg
                out_p[q, j] = doc
        return out_s, out_p
