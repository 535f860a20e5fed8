"""Corpus input for encoding: (doc_id, text) pairs or parquet files with columns doc_id and text, in windows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retriever.errors import DataFormatError, SettingError
from retriever.outputs import atomic_file

DocsInput = Iterable[tuple[str, str]] | str | Path


def _check_doc(position: int, doc: Any) -> tuple[str, str]:
    if not isinstance(doc, tuple | list) or len(doc) != 2:
        raise TypeError(f"document {position}: expected a (doc_id, text) pair, got {type(doc).__name__}")
    doc_id, text = doc
    if isinstance(doc_id, int | np.integer) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id:
        raise TypeError(f"document {position}: doc_id must be a non-empty string, got {doc_id!r}")
    if not isinstance(text, str):
        raise TypeError(f"document {position} (id {doc_id!r}): text is {type(text).__name__}, expected str")
    return doc_id, text


def corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if files:
            return files
        raise FileNotFoundError(f"{path}: no *.parquet files (expected columns doc_id, text; see docs_to_parquet)")
    raise FileNotFoundError(f"{path}: no such parquet file or folder")


def parquet_rows(files: list[Path]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def parquet_bytes(files: list[Path]) -> int:
    """Uncompressed size of the data, from the footers."""
    total = 0
    for path in files:
        meta = pq.ParquetFile(path).metadata
        total += sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    return total


def check_corpus_columns(path: Path, names: list[str]) -> None:
    missing = [c for c in ("doc_id", "text") if c not in names]
    if missing:
        raise DataFormatError(
            f"{path}: missing column(s) {missing} (found: {names}); a corpus parquet needs columns doc_id and "
            "text (write one with retriever.encoding.docs_to_parquet)"
        )


def parquet_windows(files: list[Path], window: int) -> Iterator[tuple[list[str], list[str]]]:
    """(doc ids, texts) in windows of ``window`` rows from parquet files with columns doc_id and text."""
    for path in files:
        handle = pq.ParquetFile(path)
        check_corpus_columns(path, handle.schema_arrow.names)
        row = 0
        for batch in handle.iter_batches(batch_size=window, columns=["doc_id", "text"]):
            ids = batch.column("doc_id")
            if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
                ids = ids.cast(pa.string())
            texts = batch.column("text")
            for name, column in (("doc_id", ids), ("text", texts)):
                if column.null_count:
                    bad = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                    raise DataFormatError(
                        f"{path}: row {row + bad}: {name} is null; every row needs a doc_id and a text"
                    )
            yield ids.to_pylist(), texts.to_pylist()
            row += batch.num_rows


def pair_windows(docs: Iterable[tuple[str, str]], window: int) -> Iterator[tuple[list[str], list[str]]]:
    ids: list[str] = []
    texts: list[str] = []
    for position, doc in enumerate(docs):
        doc_id, text = _check_doc(position, doc)
        ids.append(doc_id)
        texts.append(text)
        if len(ids) == window:
            yield ids, texts
            ids, texts = [], []
    if ids:
        yield ids, texts


def unique_ids(windows: Iterable[tuple[list[str], list[str]]]) -> Iterator[tuple[list[str], list[str]]]:
    """Pass windows through, failing on the first doc id seen before (ids must be unique in an index)."""
    seen: set[str] = set()
    count = 0
    for ids, texts in windows:
        for offset, doc_id in enumerate(ids):
            if doc_id in seen:
                raise DataFormatError(f"document {count + offset}: duplicate doc_id {doc_id!r}")
            seen.add(doc_id)
        count += len(ids)
        yield ids, texts


def docs_to_parquet(
    docs: Iterable[tuple[str, str]], path: str | Path, *, rows_per_group: int = 50_000, check_unique: bool = True
) -> int:
    """Stage a corpus (e.g. ``load_source(id).docs()``) as one parquet file with columns doc_id, text (strings),
    streamed in row groups; returns the number of rows. Duplicate doc ids are an error when ``check_unique``."""
    schema = pa.schema([("doc_id", pa.string()), ("text", pa.string())])
    count = 0
    windows = pair_windows(docs, rows_per_group)
    with atomic_file(path, overwrite=True, what="the staged corpus") as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for ids, texts in unique_ids(windows) if check_unique else windows:
            writer.write_table(pa.table({"doc_id": ids, "text": texts}, schema=schema))
            count += len(ids)
    return count


def text_windows(docs: DocsInput, window: int) -> tuple[int | None, Iterator[tuple[list[str], list[str]]]]:
    """(number of texts when known, (doc ids, texts) windows of ``window`` rows with unique ids) of ``docs``:
    (doc_id, text) pairs, or a parquet file / folder with columns doc_id and text."""
    if window <= 0:
        raise SettingError(f"window must be positive, got {window}")
    if isinstance(docs, str | Path):
        files = corpus_files(Path(docs))
        return parquet_rows(files), unique_ids(parquet_windows(files, window))
    total = len(docs) if hasattr(docs, "__len__") else None  # type: ignore[arg-type]
    return total, unique_ids(pair_windows(docs, window))
