"""The batching engine: texts → dense vectors or sparse term weights with a loaded encoder, in input order.

Speed on CPU comes from the batching, not from approximations (vectors match ``encoder.encode`` to float rounding):
texts are tokenized once per window (the next window on a background thread while the current one is encoded),
sorted by exact token length (descending) so batches carry almost no padding, cut into batches by a row limit and an
optional padded-token budget, run under ``torch.inference_mode`` without the decoder's KV cache, and, on CPU, as two
concurrent streams of batches with half the threads each (small matrices scale poorly across threads; independent
batches do not, and they do not stall on each other's thread barriers when the machine is busy).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from retriever import telemetry
from retriever.encoding.store import check_settings
from retriever.errors import SettingError
from retriever.models.encoders import RetrievalEncoder, TextKind

# Texts per length-sorted window, in batches: long enough to sort well, short enough to overlap tokenization.
DEFAULT_WINDOW_BATCHES = 16
Terms = list[tuple[np.ndarray, np.ndarray]]


def sparse_terms(reps: torch.Tensor, top_k: int | None = None) -> Terms:
    """Per row of a [n, vocab] batch: (term ids int32 ascending, weights float32) of the non-zero entries.

    With ``top_k`` only the ``top_k`` largest weights are kept (ties: the smaller term id wins); without it the
    result equals ``SparseEncoder.to_terms``. Vectorised over the batch (one ``nonzero`` call).
    """
    if top_k is not None and top_k <= 0:
        raise SettingError(f"prune_top_k must be a positive number of terms, got {top_k}")
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


def length_batches(lengths: np.ndarray, batch_size: int, max_batch_tokens: int | None = None) -> list[np.ndarray]:
    """Group positions into batches of similar token length: longest first, at most ``batch_size`` rows and, with a
    budget, at most ``max_batch_tokens`` padded tokens (rows x longest row) per batch; a row longer than the budget
    gets a batch of its own."""
    if batch_size <= 0:
        raise SettingError(f"batch_size must be positive, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens <= 0:
        raise SettingError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, start = [], 0
    while start < len(order):
        rows = batch_size
        if max_batch_tokens is not None:
            rows = min(rows, max(1, max_batch_tokens // max(1, int(lengths[order[start]]))))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def check_batching(batch_size: int, max_batch_tokens: int | None, num_streams: int | None) -> None:
    if num_streams is not None and num_streams <= 0:
        raise SettingError(f"num_streams must be positive, got {num_streams}")
    length_batches(np.zeros(0), batch_size, max_batch_tokens)  # validates both limits


def default_streams(device: torch.device) -> int:
    """Concurrent batches: on a CPU with >= 2 torch threads, two streams with half the threads each; else one."""
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


@contextlib.contextmanager
def inference(encoder: RetrievalEncoder) -> Iterator[None]:
    """Eval mode for the duration, restored afterwards (switching walks every submodule: only when training)."""
    was_training = encoder.training
    if was_training:
        encoder.eval()
    try:
        yield
    finally:
        if was_training:
            encoder.train()


@dataclass
class _Prepared:
    """A tokenized window: left-padded ids/mask of every text, token lengths and the length-sorted batches."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: np.ndarray
    batches: list[np.ndarray]


class Runner:
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
        check_settings(kind, encoder.paradigm, prune_top_k)
        check_batching(batch_size, max_batch_tokens, num_streams)
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
            raise RuntimeError("Runner: concurrent streams need an open session()")
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
    started = time.perf_counter()
    with inference(encoder):
        runner = Runner(
            encoder,
            kind,
            batch_size=batch_size,
            max_length=max_length,
            max_batch_tokens=max_batch_tokens,
            prune_top_k=prune_top_k,
            num_streams=num_streams,
        )
        encoded = runner.encode(texts, window)
    telemetry.record(telemetry.ENCODE_TEXTS, len(texts), kind=kind)
    telemetry.record(telemetry.ENCODE_SECONDS, time.perf_counter() - started, kind=kind)
    return encoded
