"""Corpus and query encoding: texts → dense vectors or sparse term weights, in process or on Ray Data.

Output format (an encodings folder, read by the index builders):

- ``part-00000.parquet``, ``part-00001.parquet``, ... (Ray Data writes its own file names; read every ``*.parquet``
  in name order) with columns ``doc_id: string`` and either ``vector: list<float32>`` (dense, ``dimension`` long)
  or ``term_ids: list<int32>`` (strictly ascending) + ``weights: list<float32>`` (the non-zero weights, optionally
  pruned to the ``prune_top_k`` largest per text; ties go to the smaller term id).
- ``encoding.json`` (written last, so its presence marks a complete folder)::

    {"format_version": 1, "paradigm": "dense" | "sparse", "dimension": int | "vocab_size": int,
     "encoder": {"path": str, "sha256": str}, "count": int, "prune_top_k": int | null,
     "kind": "passage" | "query", "max_length": int, "files": [str, ...]}

Speed on CPU comes from the batching, not from approximations (vectors match ``encoder.encode`` to float rounding):
texts are tokenized once per window (the next window on a background thread while the current one is encoded),
sorted by exact token length (descending) so batches carry almost no padding, cut into batches by a row limit and an
optional padded-token budget, run under ``torch.inference_mode`` without the decoder's KV cache, with LoRA adapters
merged into the base weights when the encoder is loaded for encoding only, and, on CPU, as two concurrent streams of
batches with half the threads each (small matrices scale poorly across threads; independent batches do not, and
they do not stall on each other's thread barriers when the machine is busy). Rows come back in input order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from retriever.models.encoders import RetrievalEncoder, TextKind, load_encoder, read_encoder_meta

ENCODING_FILE = "encoding.json"
ENCODING_FORMAT_VERSION = 1
# Files of an encoder directory that decide its outputs (what `load_encoder` reads).
FINGERPRINT_ENTRIES = ("encoder.json", "tokenizer", "adapter", "backbone")
# Texts per length-sorted window, in batches: long enough to sort well, short enough to overlap tokenization.
DEFAULT_WINDOW_BATCHES = 16
# Ray inputs up to this size are repartitioned so that every actor gets work.
SMALL_INPUT_BYTES = 256 * 2**20
DocsInput = Iterable[tuple[str, str]] | str | Path
Terms = list[tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------------------------------- fingerprint


def encoder_fingerprint(encoder_dir: str | Path) -> str:
    """sha256 over an encoder directory's files that decide its outputs: encoder.json, tokenizer/, adapter/ and
    backbone/ (relative path, size and bytes of every file, in sorted path order). Other files are ignored."""
    root = Path(encoder_dir)
    if not (root / "encoder.json").is_file():
        raise FileNotFoundError(f"{root}: not an encoder directory (encoder.json missing)")
    files: list[Path] = []
    for entry in FINGERPRINT_ENTRIES:
        path = root / entry
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix().encode()
        digest.update(len(rel).to_bytes(8, "little") + rel + path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ sparse terms


def sparse_terms(reps: torch.Tensor, top_k: int | None = None) -> Terms:
    """Per row of a [n, vocab] batch: (term ids int32 ascending, weights float32) of the non-zero entries.

    With ``top_k`` only the ``top_k`` largest weights are kept (ties: the smaller term id wins); without it the
    result equals ``SparseEncoder.to_terms``. Vectorised over the batch (one ``nonzero`` call).
    """
    if top_k is not None and top_k <= 0:
        raise ValueError(f"prune_top_k must be a positive number of terms, got {top_k}")
    reps = reps.detach().float().cpu()
    if reps.shape[0] == 0:
        return []
    keep = reps != 0
    if top_k is not None and top_k < reps.shape[1]:
        kth = torch.topk(reps, top_k, dim=1).values[:, -1:]
        above = keep & (reps > kth)
        tied = keep & (reps == kth)
        # Fill the remaining places with tied entries in ascending term order.
        room = top_k - above.sum(dim=1, keepdim=True)
        keep = above | (tied & (tied.cumsum(dim=1) <= room))
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: term ids ascend within each row
    weights = reps[rows, cols].numpy().astype(np.float32, copy=False)
    ids = cols.numpy().astype(np.int32)
    bounds = np.cumsum(keep.sum(dim=1).numpy())[:-1]
    return list(zip(np.split(ids, bounds), np.split(weights, bounds)))


# --------------------------------------------------------------------------------------------- batched encoding


def length_batches(lengths: np.ndarray, batch_size: int, max_batch_tokens: int | None = None) -> list[np.ndarray]:
    """Group positions into batches of similar token length: longest first, at most ``batch_size`` rows and, with a
    budget, at most ``max_batch_tokens`` padded tokens (rows x longest row) per batch; a row longer than the budget
    gets a batch of its own."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens <= 0:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, start = [], 0
    while start < len(order):
        rows = batch_size
        if max_batch_tokens is not None:
            rows = min(rows, max(1, max_batch_tokens // max(1, int(lengths[order[start]]))))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def _check_settings(kind: str, paradigm: str, prune_top_k: int | None, encoder: str = "this encoder") -> None:
    """The text kind must be 'query' or 'passage'; ``prune_top_k``, when given, a positive count for a sparse
    encoder (``encoder`` names it in the error)."""
    if kind not in ("query", "passage"):
        raise ValueError(f"kind must be 'query' or 'passage', got {kind!r}")
    if prune_top_k is not None and paradigm != "sparse":
        raise ValueError(f"prune_top_k applies to sparse encoders; {encoder} is {paradigm}")
    if prune_top_k is not None and prune_top_k <= 0:
        raise ValueError(f"prune_top_k must be a positive number of terms, got {prune_top_k}")


def default_streams(device: torch.device) -> int:
    """Concurrent batches: on a CPU with >= 2 torch threads, two streams with half the threads each; else one."""
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


@contextlib.contextmanager
def _inference(encoder: RetrievalEncoder) -> Iterator[None]:
    """Eval mode for the duration, restored afterwards."""
    was_training = encoder.training
    encoder.eval()
    try:
        yield
    finally:
        encoder.train(was_training)


@dataclass
class _Prepared:
    """A tokenized window: left-padded ids/mask of every text, token lengths and the length-sorted batches."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: np.ndarray
    batches: list[np.ndarray]


class _Runner:
    """Encodes windows of texts with one encoder: tokenize once, sort by length, batch, run, restore order.

    Inside ``session()`` the next window is tokenized on a background thread while the current one is encoded
    (tokenizers run in Rust without the GIL), and on CPU the batches of a window run as ``streams`` concurrent
    batches, each on a pool thread with its share of the torch threads (PyTorch kernels release the GIL; small
    matrices scale poorly across threads, independent batches do not). A window of a single batch runs in the
    calling thread with all threads, so a lone query batch keeps its latency.
    """

    def __init__(
        self,
        encoder: RetrievalEncoder,
        kind: TextKind,
        *,
        batch_size: int,
        max_length: int | None,
        max_batch_tokens: int | None,
        prune_top_k: int | None,
        num_streams: int | None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        _check_settings(kind, encoder.paradigm, prune_top_k)
        if num_streams is not None and num_streams <= 0:
            raise ValueError(f"num_streams must be positive, got {num_streams}")
        length_batches(np.zeros(0), batch_size, max_batch_tokens)  # validates both limits
        self.encoder = encoder
        self.kind = kind
        self.batch_size = batch_size
        self.max_length = max_length or encoder.max_length(kind)
        self.max_batch_tokens = max_batch_tokens
        self.prune_top_k = prune_top_k
        self.on_batch = on_batch
        self.device = next(encoder.parameters()).device
        self.streams = num_streams or default_streams(self.device)
        self.sparse = encoder.paradigm == "sparse"
        self._pool: ThreadPoolExecutor | None = None

    # -- steps ---------------------------------------------------------------------------------------------
    def prepare(self, texts: Sequence[str]) -> _Prepared:
        if not texts:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return _Prepared(empty, empty, np.zeros(0, np.int64), [])
        tokens = self.encoder.tokenize(texts, self.kind, self.max_length)
        lengths = tokens["attention_mask"].sum(dim=1).numpy()
        batches = length_batches(lengths, self.batch_size, self.max_batch_tokens)
        return _Prepared(tokens["input_ids"], tokens["attention_mask"], lengths, batches)

    def _batch(self, prepared: _Prepared, rows: np.ndarray) -> Any:
        cut = prepared.input_ids.shape[1] - int(prepared.lengths[rows].max())  # left padding: tokens end last
        index = torch.from_numpy(rows)
        with torch.inference_mode():  # thread-local: entered in the thread that runs the batch
            reps = self.encoder(
                prepared.input_ids[index, cut:].to(self.device), prepared.attention_mask[index, cut:].to(self.device)
            )
            out = sparse_terms(reps, self.prune_top_k) if self.sparse else reps.float().cpu().numpy()
        if self.on_batch is not None:
            self.on_batch(len(rows))
        return out

    def run(self, prepared: _Prepared) -> np.ndarray | Terms:
        """Dense: float32 [texts, dimension]; sparse: one (term ids, weights) pair per text; input order."""
        count = len(prepared.lengths)
        if len(prepared.batches) > 1 and self.streams > 1:
            outputs = list(self._stream_pool().map(lambda rows: self._batch(prepared, rows), prepared.batches))
        else:
            outputs = [self._batch(prepared, rows) for rows in prepared.batches]
        if self.sparse:
            terms: list[Any] = [None] * count
            for rows, out in zip(prepared.batches, outputs):
                for row, item in zip(rows.tolist(), out):
                    terms[row] = item
            return terms
        vectors = np.empty((count, self.encoder.dimension), dtype=np.float32)
        for rows, out in zip(prepared.batches, outputs):
            vectors[rows] = out
        return vectors

    def __call__(self, texts: Sequence[str]) -> np.ndarray | Terms:
        with self.session():
            return self.run(self.prepare(texts))

    # -- threads -------------------------------------------------------------------------------------------
    def _stream_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            raise RuntimeError("_Runner: concurrent streams need an open session()")
        return self._pool

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Holds the stream threads; torch's thread setting is per thread, the global default is restored."""
        if self._pool is not None or self.streams <= 1:
            yield
            return
        saved = torch.get_num_threads()
        per_stream = max(1, saved // self.streams)
        self._pool = ThreadPoolExecutor(
            self.streams, thread_name_prefix="encode", initializer=torch.set_num_threads, initargs=(per_stream,)
        )
        try:
            yield
        finally:
            self._pool.shutdown(wait=True)
            self._pool = None
            torch.set_num_threads(saved)  # the pool threads changed the default that new threads start with

    def encode(self, texts: Sequence[str], window: int) -> np.ndarray | Terms:
        """All texts in windows of ``window`` (overlapping tokenization and encoding); input order."""
        if len(texts) <= window:
            return self(texts)
        chunks = ((start, texts[start : start + window]) for start in range(0, len(texts), window))
        parts = [out for _, out in self.windows(chunks)]
        if self.sparse:
            return [item for part in parts for item in part]
        return np.concatenate(parts)

    def windows(self, windows: Iterable[tuple[Any, Sequence[str]]]) -> Iterator[tuple[Any, np.ndarray | Terms]]:
        """(key, texts) windows → (key, outputs), tokenizing window k+1 while window k is encoded."""
        with self.session(), ThreadPoolExecutor(1, thread_name_prefix="tokenize") as tokenizer:
            pending: deque[tuple[Any, Future[_Prepared]]] = deque()
            for key, texts in windows:
                pending.append((key, tokenizer.submit(self.prepare, texts)))
                if len(pending) > 1:
                    done_key, prepared = pending.popleft()
                    yield done_key, self.run(prepared.result())
            while pending:
                done_key, prepared = pending.popleft()
                yield done_key, self.run(prepared.result())


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def encode_texts(
    encoder: RetrievalEncoder,
    texts: Sequence[str],
    kind: TextKind = "query",
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    prune_top_k: int | None = None,
    max_batch_tokens: int | None = None,
    num_streams: int | None = None,
    window: int | None = None,
) -> np.ndarray | Terms:
    """Encode texts with a loaded encoder (e.g. queries at search time), on the encoder's device.

    Dense: float32 ``[len(texts), dimension]``; sparse: per text ``(term ids int32 ascending, weights float32)``,
    pruned to ``prune_top_k`` terms when given. Rows follow the input order; values equal ``encoder.encode`` up to
    float rounding. Texts are processed in windows of ``window`` texts (default ``batch_size`` x 16), each sorted by
    token length; ``num_streams`` batches run concurrently (default: 2 on a CPU with >= 2 threads, else 1).
    """
    if isinstance(texts, str):
        raise TypeError("encode_texts takes a sequence of texts, not one string; wrap it in a list")
    texts = list(texts)
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"encode_texts: text {position} is {type(text).__name__}, expected str")
    window = window or batch_size * DEFAULT_WINDOW_BATCHES
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    with _inference(encoder):
        runner = _Runner(
            encoder,
            kind,
            batch_size=batch_size,
            max_length=max_length,
            max_batch_tokens=max_batch_tokens,
            prune_top_k=prune_top_k,
            num_streams=num_streams,
        )
        return runner.encode(texts, window)


def load_inference_encoder(encoder_dir: str | Path, device: str | torch.device | None = None) -> RetrievalEncoder:
    """`load_encoder` for encoding only: LoRA adapters merged into the base weights (no adapter matmuls per layer,
    same outputs up to float rounding), eval mode, moved to ``device`` (default: CUDA when available)."""
    from peft import PeftModel

    encoder = load_encoder(encoder_dir, trainable=False)
    if isinstance(encoder.model, PeftModel):
        merged = encoder.model.merge_and_unload()
        # The encoder reaches the decoder through `lm`; both must now be the plain, merged model.
        encoder.model = merged
        encoder.lm = merged
    encoder.to(_device(device))
    return encoder.eval()


# ------------------------------------------------------------------------------------------------- docs input


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


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if files:
            return files
        raise FileNotFoundError(f"{path}: no *.parquet files (expected columns doc_id, text; see docs_to_parquet)")
    raise FileNotFoundError(f"{path}: no such parquet file or folder")


def _parquet_rows(files: list[Path]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _parquet_bytes(files: list[Path]) -> int:
    """Uncompressed size of the data, from the footers."""
    total = 0
    for path in files:
        meta = pq.ParquetFile(path).metadata
        total += sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    return total


def _check_corpus_columns(path: Path, names: list[str]) -> None:
    missing = [c for c in ("doc_id", "text") if c not in names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing} (found: {names}); a corpus parquet needs columns doc_id and "
            "text (write one with retriever.encoding.docs_to_parquet)"
        )


def _parquet_windows(files: list[Path], window: int) -> Iterator[tuple[list[str], list[str]]]:
    """(doc ids, texts) in windows of ``window`` rows from parquet files with columns doc_id and text."""
    for path in files:
        handle = pq.ParquetFile(path)
        _check_corpus_columns(path, handle.schema_arrow.names)
        row = 0
        for batch in handle.iter_batches(batch_size=window, columns=["doc_id", "text"]):
            ids = batch.column("doc_id")
            if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
                ids = ids.cast(pa.string())
            texts = batch.column("text")
            for name, column in (("doc_id", ids), ("text", texts)):
                if column.null_count:
                    bad = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                    raise ValueError(f"{path}: row {row + bad}: {name} is null; every row needs a doc_id and a text")
            yield ids.to_pylist(), texts.to_pylist()
            row += batch.num_rows


def _iter_windows(docs: Iterable[tuple[str, str]], window: int) -> Iterator[tuple[list[str], list[str]]]:
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


def _unique_ids(windows: Iterable[tuple[list[str], list[str]]]) -> Iterator[tuple[list[str], list[str]]]:
    """Pass windows through, failing on the first doc id seen before (ids must be unique in an index)."""
    seen: set[str] = set()
    count = 0
    for ids, texts in windows:
        for offset, doc_id in enumerate(ids):
            if doc_id in seen:
                raise ValueError(f"document {count + offset}: duplicate doc_id {doc_id!r}")
            seen.add(doc_id)
        count += len(ids)
        yield ids, texts


def docs_to_parquet(
    docs: Iterable[tuple[str, str]], path: str | Path, *, rows_per_group: int = 50_000, check_unique: bool = True
) -> int:
    """Stage a corpus (e.g. ``load_source(id).docs()``) as one parquet file with columns doc_id, text (strings),
    streamed in row groups; returns the number of rows. Duplicate doc ids are an error when ``check_unique``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("doc_id", pa.string()), ("text", pa.string())])
    count = 0
    tmp = path.with_name(path.name + ".tmp")
    windows = _iter_windows(docs, rows_per_group)
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for ids, texts in _unique_ids(windows) if check_unique else windows:
                writer.write_table(pa.table({"doc_id": ids, "text": texts}, schema=schema))
                count += len(ids)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return count


# --------------------------------------------------------------------------------------------------- output


def output_schema(paradigm: str) -> pa.Schema:
    if paradigm == "dense":
        return pa.schema([("doc_id", pa.string()), ("vector", pa.list_(pa.float32()))])
    return pa.schema(
        [("doc_id", pa.string()), ("term_ids", pa.list_(pa.int32())), ("weights", pa.list_(pa.float32()))]
    )


def encoded_table(doc_ids: Sequence[str], encoded: np.ndarray | Terms, paradigm: str) -> pa.Table:
    """One table in the encodings format from doc ids and the output of `encode_texts`."""
    ids = pa.array(list(doc_ids), pa.string())
    if paradigm == "dense":
        vectors = np.ascontiguousarray(encoded, dtype=np.float32)
        offsets = pa.array(np.arange(len(vectors) + 1, dtype=np.int32) * vectors.shape[1], pa.int32())
        column = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), pa.float32()))
        return pa.Table.from_arrays([ids, column], schema=output_schema(paradigm))
    lengths = np.fromiter((len(t) for t, _ in encoded), dtype=np.int64, count=len(encoded))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), pa.int32())
    terms = np.concatenate([t for t, _ in encoded]) if len(encoded) else np.zeros(0, np.int32)
    weights = np.concatenate([w for _, w in encoded]) if len(encoded) else np.zeros(0, np.float32)
    return pa.Table.from_arrays(
        [
            ids,
            pa.ListArray.from_arrays(offsets, pa.array(terms, pa.int32())),
            pa.ListArray.from_arrays(offsets, pa.array(weights, pa.float32())),
        ],
        schema=output_schema(paradigm),
    )


class _ShardWriter:
    """Appends tables to part-NNNNN.parquet files of at most ``shard_rows`` rows each."""

    def __init__(self, out_dir: Path, schema: pa.Schema, shard_rows: int) -> None:
        if shard_rows <= 0:
            raise ValueError(f"shard_rows must be positive, got {shard_rows}")
        self.out_dir, self.schema, self.shard_rows = out_dir, schema, shard_rows
        self.files: list[Path] = []
        self.writer: pq.ParquetWriter | None = None
        self.in_shard = 0

    def _open(self) -> None:
        path = self.out_dir / f"part-{len(self.files):05d}.parquet"
        self.files.append(path)
        self.writer = pq.ParquetWriter(path, self.schema)
        self.in_shard = 0

    def write(self, table: pa.Table) -> None:
        start = 0
        while start < table.num_rows:
            if self.writer is None or self.in_shard == self.shard_rows:
                self.close()
                self._open()
            take = min(self.shard_rows - self.in_shard, table.num_rows - start)
            self.writer.write_table(table.slice(start, take))  # type: ignore[union-attr]
            self.in_shard += take
            start += take

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def finish(self) -> list[Path]:
        if not self.files:  # an empty corpus still gets one (empty) file with the schema
            self._open()
        self.close()
        return self.files


def prepare_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Create ``out_dir``; an existing encodings folder (parquet files or encoding.json) is an error unless
    ``overwrite``, which removes exactly those files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("*.parquet")) + ([out / ENCODING_FILE] if (out / ENCODING_FILE).exists() else [])
    if old and not overwrite:
        raise FileExistsError(
            f"{out}: already holds encodings ({old[0].name}, ...); choose an empty folder or pass overwrite=True"
        )
    for path in old:
        path.unlink()
    return out


def encoder_summary(encoder_dir: str | Path) -> dict[str, Any]:
    """Paradigm, output dimension and default max lengths of a saved encoder, from its encoder.json (no weights)."""
    path = Path(encoder_dir) / "encoder.json"
    meta = read_encoder_meta(encoder_dir)
    try:
        paradigm = meta["paradigm"]
        settings = meta["encoder"]
        return {
            "paradigm": paradigm,
            "dimension": int(meta["hidden_size"] if paradigm == "dense" else meta["vocab_size"]),
            "max_length": {"query": int(settings["query_max_length"]), "passage": int(settings["passage_max_length"])},
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable encoder metadata ({exc!r}); re-save the encoder") from None


def write_encoding_metadata(
    out_dir: Path,
    *,
    paradigm: str,
    dimension: int,
    encoder_dir: str | Path,
    fingerprint: str,
    count: int,
    kind: TextKind,
    max_length: int,
    prune_top_k: int | None,
    files: Sequence[Path],
) -> dict[str, Any]:
    size_key = "dimension" if paradigm == "dense" else "vocab_size"
    meta = {
        "format_version": ENCODING_FORMAT_VERSION,
        "paradigm": paradigm,
        size_key: int(dimension),
        "encoder": {"path": str(Path(encoder_dir).resolve()), "sha256": fingerprint},
        "count": int(count),
        "prune_top_k": prune_top_k,
        "kind": kind,
        "max_length": int(max_length),
        "files": sorted(p.name for p in files),
    }
    tmp = out_dir / (ENCODING_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / ENCODING_FILE)
    return meta


def read_encoding_metadata(out_dir: str | Path) -> dict[str, Any]:
    """The ``encoding.json`` of an encodings folder (a missing or unreadable file is a clear error)."""
    path = Path(out_dir) / ENCODING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the folder is not a finished encoding run (encode it first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None


@dataclass
class EncodingResult:
    """What an encoding run wrote: the folder, its parquet files, row count, encoding.json content, wall time."""

    out_dir: Path
    files: list[Path]
    count: int
    metadata: dict[str, Any]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def texts_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else math.inf


@dataclass
class _Run:
    """An encoding run in progress: its output folder and what ``encoding.json`` records of the encoder and the
    settings, whichever way (in process or on Ray) the texts are encoded."""

    out: Path
    encoder_dir: str | Path
    summary: dict[str, Any]
    fingerprint: str
    kind: TextKind
    max_length: int
    prune_top_k: int | None
    started: float

    @classmethod
    def start(
        cls,
        encoder_dir: str | Path,
        out_dir: str | Path,
        kind: TextKind,
        max_length: int | None,
        prune_top_k: int | None,
        overwrite: bool,
        started: float,
    ) -> _Run:
        """Check the settings against the encoder's metadata and fingerprint it, then prepare the output folder:
        bad settings or a missing encoder fail before anything in ``out_dir`` is touched."""
        summary = encoder_summary(encoder_dir)
        _check_settings(kind, summary["paradigm"], prune_top_k, encoder=str(encoder_dir))
        fingerprint = encoder_fingerprint(encoder_dir)
        out = prepare_out_dir(out_dir, overwrite)
        resolved_length = max_length or summary["max_length"][kind]
        return cls(out, encoder_dir, summary, fingerprint, kind, resolved_length, prune_top_k, started)

    @property
    def paradigm(self) -> str:
        return self.summary["paradigm"]

    def finish(self, files: list[Path], count: int) -> EncodingResult:
        """Write ``encoding.json`` (last: it marks the folder complete) and describe the run."""
        meta = write_encoding_metadata(
            self.out,
            paradigm=self.paradigm,
            encoder_dir=self.encoder_dir,
            fingerprint=self.fingerprint,
            dimension=self.summary["dimension"],
            count=count,
            kind=self.kind,
            max_length=self.max_length,
            prune_top_k=self.prune_top_k,
            files=files,
        )
        return EncodingResult(self.out, files, count, meta, time.perf_counter() - self.started)


# ---------------------------------------------------------------------------------------------- in process


def encode_corpus(
    encoder_dir: str | Path,
    docs: DocsInput,
    out_dir: str | Path,
    *,
    kind: TextKind = "passage",
    batch_size: int = 32,
    max_length: int | None = None,
    prune_top_k: int | None = None,
    shard_rows: int = 100_000,
    max_batch_tokens: int | None = None,
    window: int | None = None,
    num_streams: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> EncodingResult:
    """Encode a corpus in this process and write an encodings folder (see the module docstring).

    ``docs``: (doc_id, text) pairs (e.g. ``load_source(id).docs()``) or a parquet file / folder with columns doc_id
    and text. Texts are read in windows of ``window`` rows (default ``batch_size`` x 16), each sorted by token
    length and cut into batches of at most ``batch_size`` texts and ``max_batch_tokens`` padded tokens; the next
    window is read and tokenized while the current one is encoded; output rows keep the input order.
    ``max_length`` defaults to the encoder's setting for ``kind``.
    """
    started = time.perf_counter()
    window = window or batch_size * DEFAULT_WINDOW_BATCHES
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    if isinstance(docs, str | Path):
        files = _parquet_files(Path(docs))
        total: int | None = _parquet_rows(files)
        windows = _parquet_windows(files, window)
    else:
        total = len(docs) if hasattr(docs, "__len__") else None  # type: ignore[arg-type]
        windows = _iter_windows(docs, window)
    run = _Run.start(encoder_dir, out_dir, kind, max_length, prune_top_k, overwrite, started)
    encoder = load_inference_encoder(encoder_dir, device)
    writer = _ShardWriter(run.out, output_schema(run.paradigm), shard_rows)
    count = 0
    from tqdm.auto import tqdm

    with (
        tqdm(
            total=total,
            unit="text",
            desc={"query": "encode queries", "passage": "encode passages"}[kind],
            disable=not progress,
        ) as bar,
        _inference(encoder),
    ):
        runner = _Runner(
            encoder,
            kind,
            batch_size=batch_size,
            max_length=run.max_length,
            max_batch_tokens=max_batch_tokens,
            prune_top_k=prune_top_k,
            num_streams=num_streams,
            on_batch=bar.update,
        )
        try:
            for ids, encoded in runner.windows(_unique_ids(windows)):
                writer.write(encoded_table(ids, encoded, run.paradigm))
                count += len(ids)
        finally:
            writer.close()
    return run.finish(writer.finish(), count)


# -------------------------------------------------------------------------------------------------- Ray Data


class EncoderActor:
    """Ray Data ``map_batches`` callable: loads the encoder once per actor and encodes batches of rows
    (``doc_id``, ``text``) into the encodings format (a pyarrow table, so list columns keep their exact types).

    ``settings`` are the keyword arguments of `encode_texts` (batch_size, max_length, prune_top_k,
    max_batch_tokens, num_streams); ``use_gpu`` puts the encoder on CUDA when the actor has it."""

    def __init__(
        self, encoder_dir: str, kind: TextKind = "passage", *, use_gpu: bool = False, **settings: Any
    ) -> None:
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.encoder = load_inference_encoder(encoder_dir, device)
        self.kind = kind
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = [str(x) for x in batch["doc_id"].tolist()]
        texts = batch["text"].tolist()
        for position, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"document {ids[position]!r}: text is {type(text).__name__}, expected str")
        return encoded_table(ids, encode_texts(self.encoder, texts, self.kind, **self.settings), self.encoder.paradigm)


def encode_corpus_ray(
    encoder_dir: str | Path,
    input_parquet: str | Path,
    out_dir: str | Path,
    *,
    kind: TextKind = "passage",
    max_length: int | None = None,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    batch_size: int = 32,
    prune_top_k: int | None = None,
    max_batch_tokens: int | None = None,
    rows_per_call: int = 2048,
    num_blocks: int | None = None,
    shard_rows: int = 100_000,
    num_streams: int | None = None,
    overwrite: bool = False,
) -> EncodingResult:
    """Encode a parquet corpus (columns doc_id, text; see `docs_to_parquet`) on Ray Data and write an encodings
    folder: ``read_parquet`` → ``map_batches(EncoderActor, ActorPoolStrategy(size=num_actors))`` →
    ``write_parquet`` (files of at most ``shard_rows`` rows) → ``encoding.json``.

    Each actor reserves ``cpus_per_actor`` (fractional is fine) and ``gpus_per_actor``; it receives
    ``rows_per_call`` rows at a time and sorts them by token length before batching. ``num_blocks`` (default: enough
    for every actor to get work) splits the input. Uses the current Ray cluster (or starts a local one).
    """
    import ray

    started = time.perf_counter()
    files = _parquet_files(Path(input_parquet))
    rows = _parquet_rows(files)
    for path in files:
        _check_corpus_columns(path, pq.ParquetFile(path).schema_arrow.names)
    if num_actors <= 0 or cpus_per_actor < 0 or gpus_per_actor < 0:
        raise ValueError(
            f"need num_actors >= 1 and non-negative resources, got num_actors={num_actors}, "
            f"cpus_per_actor={cpus_per_actor}, gpus_per_actor={gpus_per_actor}"
        )
    # The driver reads encoder.json only; the weights are loaded by the actors.
    run = _Run.start(encoder_dir, out_dir, kind, max_length, prune_top_k, overwrite, started)
    out = run.out
    blocks = num_blocks or max(2 * num_actors, math.ceil(rows / max(1, rows_per_call * 4)))
    dataset = ray.data.read_parquet([str(f) for f in files], columns=["doc_id", "text"], override_num_blocks=blocks)
    if len(files) < blocks and _parquet_bytes(files) <= SMALL_INPUT_BYTES:
        # read_parquet makes one block per file below Ray's block size, which would leave all but one actor idle;
        # a small input is cheap to split (a large one is split into ~128 MB blocks while it is read).
        dataset = dataset.repartition(blocks)
    encoded = dataset.map_batches(
        EncoderActor,
        batch_size=rows_per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
        fn_constructor_kwargs={
            "encoder_dir": str(Path(encoder_dir).resolve()),
            "kind": kind,
            "batch_size": batch_size,
            "max_length": run.max_length,
            "prune_top_k": prune_top_k,
            "max_batch_tokens": max_batch_tokens,
            "num_streams": num_streams,
            "use_gpu": gpus_per_actor > 0,
        },
    )
    if rows:
        encoded.write_parquet(str(out), max_rows_per_file=shard_rows)
        written = sorted(out.glob("*.parquet"))
    else:
        written = _ShardWriter(out, output_schema(run.paradigm), shard_rows).finish()
    count = _parquet_rows(written) if written else 0
    if count != rows:
        raise RuntimeError(f"{out}: Ray wrote {count} encoded rows for {rows} input rows; the run is incomplete")
    return run.finish(written, count)


def encode_corpus_auto(
    encoder_dir: str | Path,
    docs: DocsInput,
    out_dir: str | Path,
    *,
    num_actors: int = 0,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    **settings: Any,
) -> EncodingResult:
    """`encode_corpus` in this process when ``num_actors`` is 0, else `encode_corpus_ray` on ``num_actors`` Ray Data
    actors with the given resources. ``settings`` are keyword arguments of the chosen function (those both take:
    kind, batch_size, max_length, prune_top_k, max_batch_tokens, num_streams, shard_rows, overwrite). For Ray,
    ``docs`` that are not a parquet path are first staged (`docs_to_parquet`) as ``<out_dir>-input.parquet`` beside
    ``out_dir``."""
    if num_actors <= 0:
        return encode_corpus(encoder_dir, docs, out_dir, **settings)
    if not isinstance(docs, str | Path):
        out_dir = Path(out_dir)
        staged = out_dir.parent / f"{out_dir.name}-input.parquet"
        docs_to_parquet(docs, staged)
        docs = staged
    return encode_corpus_ray(
        encoder_dir,
        docs,
        out_dir,
        num_actors=num_actors,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        **settings,
    )
