"""Encoded texts in memory: dense vectors and sparse term weights (CSR), validated on construction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numba
import numpy as np

from retriever.errors import SettingError, UserError

Paradigm = Literal["dense", "sparse"]


class EncodingFormatError(UserError, ValueError):
    """An encodings folder, file or batch that does not follow the format; the message says where and how to fix."""


@dataclass(frozen=True)
class DenseBatch:
    """Dense vectors, one row per id: ``vectors`` is float32 ``[len(ids), dimension]``, C-contiguous."""

    ids: list[str]
    vectors: np.ndarray
    paradigm: ClassVar[Paradigm] = "dense"

    def __post_init__(self) -> None:
        vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise EncodingFormatError(f"dense vectors must be a 2-D array [n, dimension], got shape {vectors.shape}")
        if vectors.shape[0] != len(self.ids):
            raise EncodingFormatError(f"{len(self.ids)} ids but {vectors.shape[0]} dense vectors")
        if not np.isfinite(vectors).all():
            row = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
            raise EncodingFormatError(f"dense vector of id {self.ids[row]!r} (row {row}) has non-finite values")
        object.__setattr__(self, "ids", list(self.ids))
        object.__setattr__(self, "vectors", vectors)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dimension(self) -> int:
        return int(self.vectors.shape[1])

    def take(self, rows: np.ndarray) -> DenseBatch:
        """The rows at positions ``rows`` (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        return DenseBatch([self.ids[i] for i in rows.tolist()], self.vectors[rows])

    def nbytes(self) -> int:
        return int(self.vectors.nbytes)


@dataclass(frozen=True)
class SparseBatch:
    """Sparse vectors in CSR layout: row ``i`` has terms ``indices[indptr[i]:indptr[i+1]]`` (strictly ascending, in
    ``[0, vocab_size)``) with ``weights`` at the same positions. ``indptr`` int64, ``indices`` int32, ``weights``
    float32. Construction validates all of it."""

    ids: list[str]
    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray
    vocab_size: int
    paradigm: ClassVar[Paradigm] = "sparse"

    def __post_init__(self) -> None:
        indptr = np.ascontiguousarray(self.indptr, dtype=np.int64)
        indices = np.ascontiguousarray(self.indices, dtype=np.int32)
        weights = np.ascontiguousarray(self.weights, dtype=np.float32)
        n = len(self.ids)
        if self.vocab_size <= 0:
            raise EncodingFormatError(f"vocab_size must be positive, got {self.vocab_size}")
        if indptr.ndim != 1 or indptr.shape[0] != n + 1 or (n + 1 and indptr[0] != 0):
            raise EncodingFormatError(f"indptr must have {n + 1} entries starting at 0 (one more than ids)")
        if np.any(np.diff(indptr) < 0):
            raise EncodingFormatError("indptr must be non-decreasing")
        nnz = int(indptr[-1])
        if indices.shape != (nnz,) or weights.shape != (nnz,):
            raise EncodingFormatError(
                f"indptr ends at {nnz} but there are {indices.shape[0]} term ids and {weights.shape[0]} weights"
            )
        _check_rows(self.ids, indptr, indices, weights, self.vocab_size)
        object.__setattr__(self, "ids", list(self.ids))
        object.__setattr__(self, "indptr", indptr)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "weights", weights)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def dimension(self) -> int:
        return self.vocab_size

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = int(self.indptr[i]), int(self.indptr[i + 1])
        return self.indices[start:end], self.weights[start:end]

    @classmethod
    def from_terms(
        cls, ids: Sequence[str], terms: Sequence[tuple[np.ndarray, np.ndarray]], vocab_size: int
    ) -> SparseBatch:
        """From per-row ``(term ids ascending, weights)`` pairs (what ``SparseEncoder.to_terms`` returns)."""
        if len(ids) != len(terms):
            raise EncodingFormatError(f"{len(ids)} ids but {len(terms)} term vectors")
        lengths = np.array([len(t) for t, _ in terms], dtype=np.int64)
        indptr = np.zeros(len(terms) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        for i, (t, w) in enumerate(terms):
            if len(t) != len(w):
                raise EncodingFormatError(f"row {i} (id {ids[i]!r}): {len(t)} term ids but {len(w)} weights")
        indices = np.concatenate([np.asarray(t) for t, _ in terms]) if terms else np.zeros(0)
        weights = np.concatenate([np.asarray(w) for _, w in terms]) if terms else np.zeros(0)
        return cls(list(ids), indptr, indices, weights, vocab_size)

    @classmethod
    def from_scipy(cls, ids: Sequence[str], matrix) -> SparseBatch:  # matrix: scipy.sparse matrix or array
        """From a scipy sparse matrix ``[len(ids), vocab_size]``; explicit zeros are dropped, indices sorted."""
        import scipy.sparse as sp

        csr = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
        csr.eliminate_zeros()
        csr.sort_indices()
        csr.sum_duplicates()
        return cls(list(ids), csr.indptr, csr.indices, csr.data, int(csr.shape[1]))

    def to_scipy(self):  # -> scipy.sparse.csr_matrix
        import scipy.sparse as sp

        return sp.csr_matrix((self.weights, self.indices, self.indptr), shape=(len(self), self.vocab_size))

    def take(self, rows: np.ndarray) -> SparseBatch:
        """The rows at positions ``rows`` (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # Gather positions of all selected rows without a Python loop over rows.
        positions = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1], dtype=np.int64)
        return SparseBatch(
            [self.ids[i] for i in rows.tolist()],
            indptr,
            self.indices[positions],
            self.weights[positions],
            self.vocab_size,
        )

    def prune(self, top_k: int | None) -> SparseBatch:
        """Keep the ``top_k`` largest weights of every row (ties: the smaller term id wins); ``None`` keeps all."""
        if top_k is None or (len(self) and int(np.diff(self.indptr).max(initial=0)) <= top_k):
            return self
        if top_k <= 0:
            raise SettingError(f"top-k term pruning needs a positive k, got {top_k}")
        indptr, indices, weights = prune_rows(self.indptr, self.indices, self.weights, top_k)
        return SparseBatch(self.ids, indptr, indices, weights, self.vocab_size)

    def nbytes(self) -> int:
        return int(self.indptr.nbytes + self.indices.nbytes + self.weights.nbytes)


Batch = DenseBatch | SparseBatch


def _check_rows(
    ids: Sequence[str], indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray, vocab_size: int
) -> None:
    """Strictly ascending term ids inside each row, ids in range, finite non-zero weights (vectorised)."""

    def row_of(position: int) -> str:
        row = int(np.searchsorted(indptr, position, side="right") - 1)
        return f"row {row} (id {ids[row]!r})"

    if indices.size:
        bad = np.flatnonzero((indices < 0) | (indices >= vocab_size))
        if bad.size:
            p = int(bad[0])
            raise EncodingFormatError(
                f"{row_of(p)}: term id {int(indices[p])} outside the vocabulary [0, {vocab_size}); the encoder's "
                "vocabulary size must match"
            )
        step = np.diff(indices.astype(np.int64))
        row_start = np.zeros(indices.size, dtype=bool)
        starts = indptr[:-1][indptr[:-1] < indices.size]
        row_start[starts] = True
        bad = np.flatnonzero((step <= 0) & ~row_start[1:])
        if bad.size:
            p = int(bad[0]) + 1
            raise EncodingFormatError(
                f"{row_of(p)}: term ids must be strictly ascending within a row (found {int(indices[p - 1])} then "
                f"{int(indices[p])}); sort each row by term id and merge duplicates"
            )
        bad = np.flatnonzero(~np.isfinite(weights) | (weights == 0))
        if bad.size:
            p = int(bad[0])
            raise EncodingFormatError(
                f"{row_of(p)}: weight {float(weights[p])} for term {int(indices[p])}; weights must be finite and "
                "non-zero (drop zero entries)"
            )


@numba.njit(cache=True)
def _prune_rows_kernel(indptr, indices, weights, k, out_indptr, out_indices, out_weights) -> None:
    pos = 0
    for i in range(indptr.shape[0] - 1):
        lo = indptr[i]
        hi = indptr[i + 1]
        out_indptr[i] = pos
        if hi - lo <= k:
            for j in range(lo, hi):
                out_indices[pos] = indices[j]
                out_weights[pos] = weights[j]
                pos += 1
        else:
            # Stable sort on -|w|: equal magnitudes keep ascending term order, so the smaller term id wins.
            keep = np.sort(np.argsort(-np.abs(weights[lo:hi]), kind="mergesort")[:k])
            for j in keep:
                out_indices[pos] = indices[lo + j]
                out_weights[pos] = weights[lo + j]
                pos += 1
    out_indptr[indptr.shape[0] - 1] = pos


def prune_rows(
    indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR rows cut to their ``top_k`` largest-magnitude weights (ties: smaller term id), terms kept ascending."""
    kept = int(np.minimum(np.diff(indptr), top_k).sum())
    out_indptr = np.empty_like(indptr, dtype=np.int64)
    out_indices = np.empty(kept, dtype=np.int32)
    out_weights = np.empty(kept, dtype=np.float32)
    _prune_rows_kernel(indptr, indices, weights, top_k, out_indptr, out_indices, out_weights)
    return out_indptr, out_indices, out_weights


def make_batch(ids: Sequence[str], encoded: np.ndarray | Sequence[tuple[np.ndarray, np.ndarray]], size: int) -> Batch:
    """The batch of `encode_texts` output: a float array [n, size] (dense) or (term ids, weights) per row (sparse,
    ``size`` is the vocabulary size)."""
    if isinstance(encoded, np.ndarray):
        return DenseBatch(list(ids), encoded)
    return SparseBatch.from_terms(ids, encoded, size)
