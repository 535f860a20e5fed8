"""The ``exact`` sparse index kind: an inverted index (CSC posting lists) searched exactly, see `sparse_kernels`.

Layout (``.npy`` files, loaded with ``allow_pickle=False``): ``term_offsets`` int64 ``[vocab_size + 1]``,
``doc_indices`` int32 ``[nnz]`` (ascending within each term) and ``weights`` float32 ``[nnz]``; the postings of term
``t`` are ``[term_offsets[t], term_offsets[t + 1])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from retriever.encoding.batches import Batch, SparseBatch
from retriever.index.base import SHARD_KINDS, Device, IndexShard
from retriever.index.manifest import IndexFormatError, Manifest
from retriever.index.sparse_kernels import invert, search_inverted, term_maxima

OFFSETS_FILE = "term_offsets.npy"
DOCS_FILE = "doc_indices.npy"
WEIGHTS_FILE = "weights.npy"


@SHARD_KINDS.register("exact")
class ExactSparseShard(IndexShard):
    """Exact inverted index: the default sparse index and the reference the approximate one is measured against."""

    kind = "exact"
    paradigm = "sparse"
    search_defaults = {"dynamic_pruning": True}

    def __init__(self, directory: Path, manifest: Manifest, doc_ids: list[str], arrays: dict[str, np.ndarray]):
        super().__init__(directory, manifest, doc_ids)
        self.offsets = arrays["offsets"]
        self.docs = arrays["docs"]
        self.weights = arrays["weights"]
        self.term_max = term_maxima(self.offsets, self.weights)
        self.nonnegative = self.weights.size == 0 or float(self.weights.min()) >= 0.0

    @classmethod
    def estimate_build_bytes(cls, n_docs: int, size: int, nnz: int, params: Mapping[str, Any]) -> int:
        # The CSC copy (scipy, int32/int64 indices + float32) and its int32/float32 cast, plus term offsets;
        # the loaded index later needs nnz*8 + vocab*12 bytes and n_docs*21 bytes of scratch per search thread.
        return 3 * nnz * 8 + (size + 1) * 16 + n_docs * 8

    @classmethod
    def write(cls, batch: Batch, directory: Path, params: Mapping[str, Any], device: Device) -> None:
        assert isinstance(batch, SparseBatch)
        offsets, docs, weights = invert(batch)
        np.save(directory / OFFSETS_FILE, offsets, allow_pickle=False)
        np.save(directory / DOCS_FILE, docs, allow_pickle=False)
        np.save(directory / WEIGHTS_FILE, weights, allow_pickle=False)

    @classmethod
    def load(cls, directory: Path, manifest: Manifest, doc_ids: list[str], device: Device) -> ExactSparseShard:
        arrays = {
            "offsets": _load_array(directory / OFFSETS_FILE, np.int64),
            "docs": _load_array(directory / DOCS_FILE, np.int32),
            "weights": _load_array(directory / WEIGHTS_FILE, np.float32),
        }
        offsets, docs, weights = arrays["offsets"], arrays["docs"], arrays["weights"]
        vocab = manifest.vocab_size or 0
        problem = None
        if offsets.shape != (vocab + 1,):
            problem = f"{OFFSETS_FILE} has {offsets.shape[0]} entries for a vocabulary of {vocab}"
        elif docs.shape != weights.shape or offsets[0] != 0 or offsets[-1] != docs.shape[0]:
            problem = "posting arrays disagree in length with the term offsets"
        elif docs.size and (docs.min() < 0 or docs.max() >= manifest.doc_count):
            problem = f"posting doc indices outside [0, {manifest.doc_count})"
        if problem:
            raise IndexFormatError(f"{directory}: {problem}; rebuild the index")
        return cls(directory, manifest, doc_ids, arrays)

    def search_positions(self, queries: Batch, k: int) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(queries, SparseBatch)
        return search_inverted(
            self.offsets,
            self.docs,
            self.weights,
            self.doc_count,
            queries,
            k,
            term_max=self.term_max,
            nonnegative=self.nonnegative,
            dynamic_pruning=bool(self.params.get("dynamic_pruning", True)),
        )


def _load_array(path: Path, dtype: type) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:  # includes "Object arrays cannot be loaded when allow_pickle=False"
        raise IndexFormatError(f"{path}: not a plain numpy array file ({exc}); rebuild the index") from None
    if array.dtype != dtype or array.ndim != 1:
        raise IndexFormatError(
            f"{path}: expected a 1-D {np.dtype(dtype).name} array, got {array.dtype} {array.shape}; rebuild the index"
        )
    return array
