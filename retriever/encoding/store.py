"""The encodings folder: the one writer and the one reader of the format the index builders consume.

- ``part-00000.parquet``, ``part-00001.parquet``, ... (Ray Data writes its own file names; every ``*.parquet`` is
  read in name order, rows in file order) with a ``doc_id: string`` column (query ids for encoded queries) and
  either ``vector: list<float32>`` (dense, ``dimension`` long) or ``term_ids: list<int32>`` (strictly ascending,
  in ``[0, vocab_size)``) + ``weights: list<float32>`` (finite, non-zero; optionally pruned to the
  ``prune_top_k`` largest per text, ties to the smaller term id).
- ``encoding.json`` (written last, so its presence marks a complete folder)::

    {"format_version": 1, "paradigm": "dense" | "sparse", "dimension": int | "vocab_size": int,
     "encoder": {"path": str, "sha256": str}, "count": int, "prune_top_k": int | null,
     "kind": "passage" | "query", "max_length": int, "files": [str, ...], "sha256": {file: hex digest}}

  The reader verifies every parquet file against its sha256 before it parses it (a flipped byte is an error, not
  a silently different vector).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retriever.checksums import sha256_bytes, sha256_file
from retriever.encoding.batches import Batch, DenseBatch, EncodingFormatError, Paradigm, SparseBatch
from retriever.errors import IntegrityError, SettingError
from retriever.outputs import write_text_atomic

ENCODING_FILE = "encoding.json"
FORMAT_VERSION = 2
KINDS = ("query", "passage")
VECTOR_COLUMNS = ("vector", "term_ids", "weights")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_settings(kind: str, paradigm: str, prune_top_k: int | None, encoder: str = "this encoder") -> None:
    """The text kind must be 'query' or 'passage'; ``prune_top_k``, when given, a positive count for a sparse
    encoder (``encoder`` names it in the error)."""
    if kind not in KINDS:
        raise SettingError(f"kind must be 'query' or 'passage', got {kind!r}")
    if prune_top_k is not None and paradigm != "sparse":
        raise SettingError(f"prune_top_k applies to sparse encoders; {encoder} is {paradigm}")
    if prune_top_k is not None and prune_top_k <= 0:
        raise SettingError(f"prune_top_k must be a positive number of terms, got {prune_top_k}")


# --------------------------------------------------------------------------------------------------- encoding.json


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class EncodingInfo:
    """The content of ``encoding.json``."""

    paradigm: Paradigm
    size: int  # dense: dimension; sparse: vocabulary size
    encoder_path: str
    encoder_sha256: str
    count: int
    kind: str
    max_length: int
    files: tuple[str, ...]
    sha256: Mapping[str, str]
    prune_top_k: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "paradigm": self.paradigm,
            "dimension" if self.paradigm == "dense" else "vocab_size": self.size,
            "encoder": {"path": self.encoder_path, "sha256": self.encoder_sha256},
            "count": self.count,
            "prune_top_k": self.prune_top_k,
            "kind": self.kind,
            "max_length": self.max_length,
            "files": sorted(self.files),
            "sha256": {name: self.sha256[name] for name in sorted(self.files)},
        }

    @classmethod
    def from_json(cls, data: object, where: str) -> EncodingInfo:
        def fail(message: str) -> EncodingFormatError:
            return EncodingFormatError(f"{where}: {message} (the format: retriever.encoding.store)")

        if not isinstance(data, dict):
            raise fail("expected a JSON object")
        if data.get("format_version") != FORMAT_VERSION:
            raise fail(f"format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}; re-encode")
        paradigm = data.get("paradigm")
        if paradigm not in ("dense", "sparse"):
            raise fail(f"'paradigm' must be 'dense' or 'sparse', got {paradigm!r}")
        key = "dimension" if paradigm == "dense" else "vocab_size"
        if not _positive_int(size := data.get(key)):
            raise fail(f"{paradigm} encodings need a positive integer {key!r}, got {size!r}")
        encoder = data.get("encoder")
        if not isinstance(encoder, dict) or not all(isinstance(encoder.get(k), str) for k in ("path", "sha256")):
            raise fail("'encoder' must be an object with string 'path' and 'sha256'")
        count = data.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise fail(f"'count' must be a non-negative integer, got {count!r}")
        prune = data.get("prune_top_k")
        if prune is not None and not _positive_int(prune):
            raise fail(f"'prune_top_k' must be null or a positive integer, got {prune!r}")
        if (kind := data.get("kind")) not in KINDS:
            raise fail(f"'kind' must be 'query' or 'passage', got {kind!r}")
        if not _positive_int(max_length := data.get("max_length")):
            raise fail(f"'max_length' must be a positive integer, got {max_length!r}")
        files = data.get("files")
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise fail(f"'files' must be a non-empty list of parquet file names, got {files!r}")
        digests = data.get("sha256")
        if (
            not isinstance(digests, dict)
            or set(digests) != set(files)
            or not all(isinstance(v, str) and _SHA256.fullmatch(v) for v in digests.values())
        ):
            raise fail("'sha256' must map every file of 'files' to its sha256 (64 hex digits)")
        return cls(
            paradigm, size, encoder["path"], encoder["sha256"], count, kind, max_length, tuple(files), digests, prune
        )


def read_encoding_info(directory: str | Path) -> EncodingInfo:
    """The ``encoding.json`` of a finished encodings folder (missing or malformed: a clear error)."""
    path = Path(directory) / ENCODING_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; an encodings folder needs {ENCODING_FILE} next to its parquet files "
            "(the folder is not a finished encoding run: encode it first)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EncodingFormatError(
            f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); re-encode into an empty folder"
        ) from None
    except UnicodeDecodeError as exc:
        raise EncodingFormatError(f"{path}: not UTF-8 text ({exc}); re-encode into an empty folder") from None
    return EncodingInfo.from_json(data, str(path))


def finished_encoding(directory: str | Path) -> EncodingInfo | None:
    """The folder's `EncodingInfo` when it holds a finished encoding run, else None (absent or unreadable)."""
    try:
        return read_encoding_info(directory)
    except (FileNotFoundError, EncodingFormatError):
        return None


# --------------------------------------------------------------------------------------------------------- writer


def schema(paradigm: str) -> pa.Schema:
    if paradigm == "dense":
        return pa.schema([("doc_id", pa.string()), ("vector", pa.list_(pa.float32()))])
    return pa.schema(
        [("doc_id", pa.string()), ("term_ids", pa.list_(pa.int32())), ("weights", pa.list_(pa.float32()))]
    )


def batch_table(batch: Batch) -> pa.Table:
    """One table in the encodings format (the rows of ``batch``, validated when it was built)."""
    ids = pa.array(batch.ids, pa.string())
    if isinstance(batch, DenseBatch):
        offsets = pa.array(np.arange(len(batch) + 1, dtype=np.int32) * batch.dimension, pa.int32())
        column = pa.ListArray.from_arrays(offsets, pa.array(batch.vectors.reshape(-1), pa.float32()))
        return pa.Table.from_arrays([ids, column], schema=schema("dense"))
    offsets = pa.array(batch.indptr.astype(np.int32), pa.int32())
    return pa.Table.from_arrays(
        [
            ids,
            pa.ListArray.from_arrays(offsets, pa.array(batch.indices, pa.int32())),
            pa.ListArray.from_arrays(offsets, pa.array(batch.weights, pa.float32())),
        ],
        schema=schema("sparse"),
    )


def is_encodings_folder(directory: Path) -> bool:
    """Whether ``directory`` holds only what an encoding run writes (an earlier run, which may be replaced)."""
    return all(p.is_file() and (p.suffix == ".parquet" or p.name == ENCODING_FILE) for p in directory.iterdir())


class EncodingWriter:
    """Writes batches into ``part-NNNNN.parquet`` files of at most ``shard_rows`` rows, then ``encoding.json``
    (last). Other writers of parquet files (Ray Data) hand their files to `finish`."""

    def __init__(self, out_dir: Path, paradigm: Paradigm, shard_rows: int = 100_000) -> None:
        if shard_rows <= 0:
            raise ValueError(f"shard_rows must be positive, got {shard_rows}")
        self.out_dir, self.paradigm, self.shard_rows = Path(out_dir), paradigm, shard_rows
        self.files: list[Path] = []
        self.count = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0

    def _open(self) -> None:
        path = self.out_dir / f"part-{len(self.files):05d}.parquet"
        self.files.append(path)
        self._writer = pq.ParquetWriter(path, schema(self.paradigm))
        self._in_shard = 0

    def write(self, batch: Batch) -> None:
        if batch.paradigm != self.paradigm:
            raise EncodingFormatError(f"{self.out_dir}: a {batch.paradigm} batch in a {self.paradigm} encoding")
        table = batch_table(batch)
        start = 0
        while start < table.num_rows:
            if self._writer is None or self._in_shard == self.shard_rows:
                self.close()
                self._open()
            take = min(self.shard_rows - self._in_shard, table.num_rows - start)
            self._writer.write_table(table.slice(start, take))  # type: ignore[union-attr]
            self._in_shard += take
            start += take
        self.count += len(batch)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(
        self,
        *,
        size: int,
        encoder_path: str | Path,
        encoder_sha256: str,
        kind: str,
        max_length: int,
        prune_top_k: int | None = None,
        files: Sequence[Path] | None = None,
    ) -> EncodingInfo:
        """Close the parquet files (an empty corpus still gets one, with the schema) and write ``encoding.json``.
        ``files``: parquet files another writer put in the folder instead (their rows are counted)."""
        if files is None:
            if not self.files:
                self._open()
            self.close()
            files, count = self.files, self.count
        else:
            files = list(files) or [self.out_dir / "part-00000.parquet"]
            if not files[0].exists():
                pq.write_table(schema(self.paradigm).empty_table(), files[0])
            count = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        info = EncodingInfo(
            self.paradigm,
            int(size),
            str(encoder_path),
            encoder_sha256,
            int(count),
            kind,
            int(max_length),
            tuple(sorted(p.name for p in files)),
            {p.name: sha256_file(p) for p in files},
            prune_top_k,
        )
        write_text_atomic(self.out_dir / ENCODING_FILE, json.dumps(info.to_json(), indent=2) + "\n")
        return info


# --------------------------------------------------------------------------------------------------------- reader


def parquet_files(directory: str | Path) -> list[Path]:
    folder = Path(directory)
    files = sorted(p for p in folder.glob("*.parquet") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no *.parquet files (expected the encoding stage's shards here)")
    return files


def estimate_encodings_bytes(directory: str | Path) -> int:
    """In-memory size of the vector columns, from the parquet footers (uncompressed column sizes), read cheaply."""
    total = 0
    for path in parquet_files(directory):
        try:
            meta = pq.ParquetFile(path).metadata
        except pa.ArrowException as exc:
            raise IntegrityError(
                f"{path}: not a readable parquet file ({exc}); it was cut short or corrupted after it was written: "
                "re-encode into a new folder"
            ) from None
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.split(".")[0] in VECTOR_COLUMNS:
                    total += int(column.total_uncompressed_size)
    return total


def _list_column(table: pa.Table, name: str, value_type: pa.DataType, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 from 0, values) of a list column."""
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


def _doc_ids(table: pa.Table, path: Path) -> list[str]:
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


def _read_file(path: Path, info: EncodingInfo, prune_top_k: int | None) -> Batch:
    data = path.read_bytes()  # read once: hashed, then parsed from memory
    if (digest := sha256_bytes(data)) != info.sha256[path.name]:
        raise IntegrityError(
            f"{path}: sha256 {digest[:16]}… does not match {ENCODING_FILE}'s {info.sha256[path.name][:16]}… (the "
            "file was corrupted or modified after it was written); re-encode into a new folder"
        )
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as exc:
        raise EncodingFormatError(f"{path}: not a readable parquet file ({exc}); re-encode") from None
    ids = _doc_ids(table, path)
    try:
        if info.paradigm == "dense":
            offsets, values = _list_column(table, "vector", pa.float32(), path)
            bad = np.flatnonzero(np.diff(offsets) != info.size)
            if bad.size:
                row = int(bad[0])
                raise EncodingFormatError(
                    f"row {row} (id {ids[row]!r}): vector of length {int(offsets[row + 1] - offsets[row])}, but "
                    f"{ENCODING_FILE} says dimension {info.size}"
                )
            return DenseBatch(ids, values.reshape(len(ids), info.size))
        t_off, terms = _list_column(table, "term_ids", pa.int32(), path)
        w_off, weights = _list_column(table, "weights", pa.float32(), path)
        if not np.array_equal(t_off, w_off):
            row = int(np.flatnonzero(t_off != w_off)[0]) - 1
            raise EncodingFormatError(f"row {row} (id {ids[row]!r}): 'term_ids' and 'weights' differ in length")
        # Pruned file by file, so the full-size vectors are never all in memory.
        return SparseBatch(ids, t_off, terms, weights, info.size).prune(prune_top_k)
    except EncodingFormatError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise EncodingFormatError(f"{path}: {exc}") from None


def concatenate(parts: Sequence[Batch], info: EncodingInfo) -> Batch:
    """One batch of the rows of ``parts`` in order (all of ``info``'s paradigm and size)."""
    if len(parts) == 1:
        return parts[0]  # already validated: most folders hold one file
    ids = [doc_id for part in parts for doc_id in part.ids]
    if info.paradigm == "dense":
        vectors = [p.vectors for p in parts if isinstance(p, DenseBatch)]
        return DenseBatch(ids, np.concatenate(vectors) if vectors else np.zeros((0, info.size), np.float32))
    sparse = [p for p in parts if isinstance(p, SparseBatch)]
    indptr = np.zeros(len(ids) + 1, dtype=np.int64)
    if sparse:
        np.cumsum(np.concatenate([np.diff(p.indptr) for p in sparse]), out=indptr[1:])
    indices = np.concatenate([p.indices for p in sparse]) if sparse else np.zeros(0, np.int32)
    weights = np.concatenate([p.weights for p in sparse]) if sparse else np.zeros(0, np.float32)
    return SparseBatch(ids, indptr, indices, weights, info.size)


def read_encodings(directory: str | Path, *, prune_top_k: int | None = None) -> tuple[EncodingInfo, Batch]:
    """Read a finished encodings folder into one batch, every row validated against ``encoding.json``; sparse rows
    cut to their ``prune_top_k`` largest weights when given."""
    folder = Path(directory)
    info = read_encoding_info(folder)
    files = parquet_files(folder)
    if sorted(p.name for p in files) != sorted(info.files):
        raise EncodingFormatError(
            f"{folder}: the parquet files ({', '.join(p.name for p in files)}) are not the ones {ENCODING_FILE} "
            f"lists ({', '.join(info.files)}); the folder mixes runs: re-encode into an empty folder"
        )
    batch = concatenate([_read_file(path, info, prune_top_k) for path in files], info)
    if len(batch) != info.count:
        raise EncodingFormatError(
            f"{folder}: the parquet files hold {len(batch)} rows but {ENCODING_FILE} says count {info.count}; the "
            "folder is incomplete or mixes runs: re-encode into an empty folder"
        )
    return info, batch
