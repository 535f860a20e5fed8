"""Encoded vectors: the in-memory batch types and the on-disk format the encoding stage writes.

On disk, an encodings folder holds parquet files (read in sorted file-name order, rows in file order) and an
``encoding.json`` next to them::

    {"paradigm": "dense" | "sparse", "dimension": int (dense) | "vocab_size": int (sparse),
     "encoder": {"path": str, "sha256": str}, "count": int, "prune_top_k": int | null}

Every parquet file has a ``doc_id: string`` column (query ids when the folder holds encoded queries) and either
``vector: list<float32>`` (dense, every row ``dimension`` long) or ``term_ids: list<int32>`` (strictly ascending,
each in ``[0, vocab_size)``) plus ``weights: list<float32>`` (the non-zero weights of those terms).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

ENCODING_FILE = "encoding.json"
Paradigm = Literal["dense", "sparse"]


class EncodingFormatError(ValueError):
    """An encodings folder, file or batch that does not follow the format; the message says where and how to fix."""


# --------------------------------------------------------------------------------------------------------------
# In-memory batches


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
        _check_rows(self.ids, indptr, indices, weights, self.vocab_size, where="sparse batch")
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
            raise ValueError(f"top-k term pruning needs a positive k, got {top_k}")
        from retriever.index.sparse import prune_rows

        indptr, indices, weights = prune_rows(self.indptr, self.indices, self.weights, top_k)
        return SparseBatch(self.ids, indptr, indices, weights, self.vocab_size)

    def nbytes(self) -> int:
        return int(self.indptr.nbytes + self.indices.nbytes + self.weights.nbytes)


Batch = DenseBatch | SparseBatch


def _check_rows(
    ids: Sequence[str], indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray, vocab_size: int, where: str
) -> None:
    """Strictly ascending term ids inside each row, ids in range, finite non-zero weights (vectorised)."""

    def row_of(position: int) -> str:
        row = int(np.searchsorted(indptr, position, side="right") - 1)
        return f"{where}: row {row} (id {ids[row]!r})"

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


# --------------------------------------------------------------------------------------------------------------
# encoding.json


@dataclass(frozen=True)
class EncodingInfo:
    """The content of ``encoding.json``."""

    paradigm: Paradigm
    size: int  # dense: dimension; sparse: vocabulary size
    encoder_path: str
    encoder_sha256: str
    count: int
    prune_top_k: int | None = None

    def to_json(self) -> dict[str, object]:
        key = "dimension" if self.paradigm == "dense" else "vocab_size"
        return {
            "paradigm": self.paradigm,
            key: self.size,
            "encoder": {"path": self.encoder_path, "sha256": self.encoder_sha256},
            "count": self.count,
            "prune_top_k": self.prune_top_k,
        }

    @classmethod
    def from_json(cls, data: object, where: str) -> EncodingInfo:
        def fail(message: str) -> EncodingFormatError:
            return EncodingFormatError(f"{where}: {message} (see retriever.index.encodings for the format)")

        if not isinstance(data, dict):
            raise fail("expected a JSON object")
        paradigm = data.get("paradigm")
        if paradigm not in ("dense", "sparse"):
            raise fail(f"'paradigm' must be 'dense' or 'sparse', got {paradigm!r}")
        key = "dimension" if paradigm == "dense" else "vocab_size"
        size = data.get(key)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise fail(f"{paradigm} encodings need a positive integer {key!r}, got {size!r}")
        encoder = data.get("encoder")
        if (
            not isinstance(encoder, dict)
            or not isinstance(encoder.get("path"), str)
            or not isinstance(encoder.get("sha256"), str)
        ):
            raise fail("'encoder' must be an object with string 'path' and 'sha256'")
        count = data.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise fail(f"'count' must be a non-negative integer, got {count!r}")
        prune = data.get("prune_top_k")
        if prune is not None and (not isinstance(prune, int) or isinstance(prune, bool) or prune <= 0):
            raise fail(f"'prune_top_k' must be null or a positive integer, got {prune!r}")
        return cls(paradigm, size, encoder["path"], encoder["sha256"], count, prune)


def read_encoding_info(directory: str | Path) -> EncodingInfo:
    path = Path(directory) / ENCODING_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; an encodings folder needs {ENCODING_FILE} next to its parquet files "
            "(run the encoding stage first)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EncodingFormatError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    return EncodingInfo.from_json(data, str(path))


def parquet_files(directory: str | Path) -> list[Path]:
    folder = Path(directory)
    files = sorted(p for p in folder.glob("*.parquet") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no *.parquet files (expected the encoding stage's shards here)")
    return files


def estimate_encodings_bytes(directory: str | Path) -> int:
    """In-memory size of the vector columns, from the parquet footers (uncompressed column sizes), read cheaply."""
    import pyarrow.parquet as pq

    total = 0
    for path in parquet_files(directory):
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.split(".")[0] in ("vector", "term_ids", "weights"):
                    total += int(column.total_uncompressed_size)
    return total


def _list_column(table, name: str, value_type, path: Path):  # -> (offsets int64, values ndarray)
    import pyarrow as pa

    if name not in table.column_names:
        raise EncodingFormatError(f"{path}: missing column {name!r} (columns: {', '.join(table.column_names)})")
    column = table.column(name).combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise EncodingFormatError(f"{path}: column {name!r} must be list<{value_type}>, got {column.type}")
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise EncodingFormatError(f"{path}: row {row}: column {name!r} is null")
    values = column.flatten()
    if values.null_count:
        raise EncodingFormatError(f"{path}: column {name!r} contains null values")
    if values.type != value_type:
        try:
            values = values.cast(value_type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise EncodingFormatError(f"{path}: column {name!r} must hold {value_type}: {exc}") from None
    offsets = column.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0], values.to_numpy(zero_copy_only=False)


def _doc_ids(table, path: Path) -> list[str]:
    import pyarrow as pa

    if "doc_id" not in table.column_names:
        raise EncodingFormatError(f"{path}: missing column 'doc_id' (columns: {', '.join(table.column_names)})")
    column = table.column("doc_id")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise EncodingFormatError(f"{path}: column 'doc_id' must be string, got {column.type}")
    ids = column.to_pylist()
    for row, doc_id in enumerate(ids):
        if not doc_id:
            raise EncodingFormatError(f"{path}: row {row}: empty or null doc_id")
    return ids


def read_encodings(directory: str | Path, *, prune_top_k: int | None = None) -> tuple[EncodingInfo, Batch]:
    """Read an encodings folder into one batch, validating every row against ``encoding.json``. Sparse rows are
    cut to their ``prune_top_k`` largest weights file by file, so the full-size vectors are never all in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(directory)
    info = read_encoding_info(folder)
    ids: list[str] = []
    parts: list[tuple] = []
    for path in parquet_files(folder):
        table = pq.read_table(path)
        file_ids = _doc_ids(table, path)
        if info.paradigm == "dense":
            offsets, values = _list_column(table, "vector", pa.float32(), path)
            lengths = np.diff(offsets)
            bad = np.flatnonzero(lengths != info.size)
            if bad.size:
                row = int(bad[0])
                raise EncodingFormatError(
                    f"{path}: row {row} (id {file_ids[row]!r}): vector of length {int(lengths[row])}, but "
                    f"{ENCODING_FILE} says dimension {info.size}"
                )
            parts.append((values.reshape(len(file_ids), info.size),))
        else:
            t_off, terms = _list_column(table, "term_ids", pa.int32(), path)
            w_off, weights = _list_column(table, "weights", pa.float32(), path)
            if not np.array_equal(t_off, w_off):
                row = int(np.flatnonzero(t_off != w_off)[0]) - 1
                raise EncodingFormatError(
                    f"{path}: row {row} (id {file_ids[row]!r}): 'term_ids' and 'weights' differ in length"
                )
            _check_rows(file_ids, t_off, terms, weights, info.size, where=str(path))
            if prune_top_k is not None:
                from retriever.index.sparse import prune_rows

                t_off, terms, weights = prune_rows(t_off, terms, weights, prune_top_k)
            parts.append((t_off, terms, weights))
        ids.extend(file_ids)
    if len(ids) != info.count:
        raise EncodingFormatError(
            f"{folder}: the parquet files hold {len(ids)} rows but {ENCODING_FILE} says count {info.count}; the "
            "folder is incomplete or mixes runs: re-run the encoding stage into an empty folder"
        )
    if info.paradigm == "dense":
        vectors = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, info.size), np.float32)
        return info, DenseBatch(ids, vectors)
    indptr = np.zeros(len(ids) + 1, dtype=np.int64)
    lengths = np.concatenate([np.diff(p[0]) for p in parts]) if parts else np.zeros(0, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
    weights = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.float32)
    return info, SparseBatch(ids, indptr, indices, weights, info.size)


def write_encodings(
    directory: str | Path,
    batch: Batch,
    *,
    encoder_path: str,
    encoder_sha256: str,
    prune_top_k: int | None = None,
    rows_per_file: int = 100_000,
) -> EncodingInfo:
    """Write ``batch`` in the encodings format (``part-00000.parquet``, ... and ``encoding.json``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.glob("*.parquet")) or (folder / ENCODING_FILE).exists():
        raise FileExistsError(f"{folder}: already holds encodings; write into an empty folder")
    n = len(batch)
    for part, start in enumerate(range(0, max(n, 1), rows_per_file)):
        end = min(start + rows_per_file, n)
        ids = pa.array(batch.ids[start:end], pa.string())
        if isinstance(batch, DenseBatch):
            offsets = pa.array(np.arange(end - start + 1, dtype=np.int32) * batch.dimension, pa.int32())
            flat = pa.array(batch.vectors[start:end].reshape(-1), pa.float32())
            table = pa.table({"doc_id": ids, "vector": pa.ListArray.from_arrays(offsets, flat)})
        else:
            lo, hi = int(batch.indptr[start]), int(batch.indptr[end])
            offsets = pa.array((batch.indptr[start : end + 1] - lo).astype(np.int32), pa.int32())
            terms = pa.ListArray.from_arrays(offsets, pa.array(batch.indices[lo:hi], pa.int32()))
            weights = pa.ListArray.from_arrays(offsets, pa.array(batch.weights[lo:hi], pa.float32()))
            table = pa.table({"doc_id": ids, "term_ids": terms, "weights": weights})
        pq.write_table(table, folder / f"part-{part:05d}.parquet")
    info = EncodingInfo(batch.paradigm, batch.dimension, encoder_path, encoder_sha256, n, prune_top_k)
    (folder / ENCODING_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n", encoding="utf-8")
    return info
