"""BM25, the project's lexical retriever (and the one BM25 implementation the project uses), over ``bm25s``: index,
tokenize, search. Evaluating it on a sweep's datasets is the report's job (`retriever.report.baselines`).

Settings: Lucene's BM25 (``bm25s.BM25(method="lucene")``) with k1 = 0.9 and b = 0.4, as Anserini's MS MARCO
baselines and the synthetic benchmark's candidates use them. The score of document d for query q is

    sum over query tokens t in d of  idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

(Lucene drops the constant (k1 + 1) factor of Robertson's BM25; rankings are unchanged). A query token repeated in
the query counts once per occurrence, as in Anserini's bag-of-words queries; tokens absent from the corpus are
ignored.

**Tokens.** A text is split on whitespace (``str.split()``), nothing else: no lowercasing, no punctuation removal,
no stemming, no stopwords. Documents are indexed with the text the project's sources give them
(``load_source(id).docs()``: BEIR's ``title + " " + text``, just ``text`` without a title), so a word ending a
sentence keeps its period (``"word."`` and ``"word"`` are different tokens). This is what reproduces the reference
numbers of the default synthetic benchmark (seed 0, 2,000 docs, 200 test queries): nDCG@10 0.7261, MRR@10 0.9577,
R@100 0.7888 (``retriever.data.synthetic``'s own candidate generator strips periods first and ranks differently).

**Build.** Token ids are streamed in int32 chunks reduced to (document, term, count) triples, and the score matrix
is computed with numpy: bm25s's own matrix bit for bit, faster and in less memory than ``bm25s.BM25.index`` on
Python lists of token ids (``benchmarks/bench_bm25_build.py``). bm25s searches it.

**Saved indexes.** ``Bm25Index.save`` writes bm25s's arrays, the vocabulary, the document ids (a fixed-width numpy
array) and ``bm25.json`` (settings, document count, sha256 of every file; written last, so a folder without it is
incomplete); ``Bm25Index.load`` checks them and memory-maps the arrays (a corpus-sized index is not read whole).

**Ranking.** Only documents with a positive score are retrieved (those sharing a token with the query); a query's
top k follows trec_eval's order (score descending, then document id descending, `retriever.evaluation.trec_order`),
ties at the k-th place included in that order, so a run does not depend on the library's tie handling.
"""

from __future__ import annotations

import json
import math
from array import array
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numba
import numpy as np

from retriever.checksums import sha256_file
from retriever.errors import DataFormatError, IntegrityError, SettingError
from retriever.trec import RunDict, trec_order

K1 = 0.9
B = 0.4
RUN_TAG = "bm25"
INDEX_FILE = "bm25.json"
INDEX_FORMAT = 1
_DOC_IDS_FILE = "doc_ids.npy"


def tokenize(text: str) -> list[str]:
    """The tokens BM25 indexes and searches: ``text.split()`` (see the module docstring)."""
    return text.split()


class Bm25Index:
    """A BM25 index over ``(doc_id, text)`` pairs: the score matrix built here with numpy, searched with ``bm25s``
    (Lucene idf, k1, b)."""

    def __init__(
        self, docs: Iterable[tuple[str, str]], *, k1: float = K1, b: float = B, dtype: str = "float32"
    ) -> None:
        import bm25s

        if k1 < 0 or not 0.0 <= b <= 1.0:
            raise SettingError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.k1, self.b = float(k1), float(b)
        self.doc_ids: list[str] = []
        seen: set[str] = set()
        vocab: dict[str, int] = {}
        counts = _TermCounts()
        for i, pair in enumerate(docs):
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise TypeError(f"document {i}: expected a (doc_id, text) pair, got {pair!r:.80}")
            doc_id, text = pair
            if not isinstance(doc_id, str) or not doc_id or not isinstance(text, str):
                raise TypeError(f"document {i}: doc_id must be a non-empty str and text a str, got {pair!r:.80}")
            if doc_id in seen:
                raise DataFormatError(f"document {i}: duplicate doc_id {doc_id!r}")
            seen.add(doc_id)
            self.doc_ids.append(doc_id)
            counts.add([vocab.setdefault(token, len(vocab)) for token in tokenize(text)])
        if not self.doc_ids:
            raise DataFormatError("BM25 needs at least one document (the corpus is empty)")
        self._model = bm25s.BM25(k1=self.k1, b=self.b, method="lucene", dtype=dtype)
        self._model.scores = counts.score_matrix(len(vocab), self.k1, self.b, np.dtype(dtype))
        self._model.nonoccurrence_array = None
        # bm25s's own index() adds the empty token (it scores nothing; `tokenize` never yields it)
        self._model.vocab_dict = {**vocab, "": len(vocab)} if "" not in vocab else vocab
        self._model.unique_token_ids_set = set(self._model.vocab_dict.values())
        self._vocab = self._model.vocab_dict

    def save(self, directory: str | Path) -> Path:
        """Write the index into the empty or new folder ``directory`` (see the module docstring)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / INDEX_FILE).exists():
            raise SettingError(f"{directory}: already holds a BM25 index; save into a new folder")
        self._model.save(str(directory), show_progress=False)
        np.save(directory / _DOC_IDS_FILE, np.asarray(self.doc_ids, dtype=str), allow_pickle=False)
        files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != INDEX_FILE)
        meta = {
            "format": INDEX_FORMAT,
            "k1": self.k1,
            "b": self.b,
            "num_docs": self.num_docs,
            "sha256": {name: sha256_file(directory / name) for name in files},
        }
        (directory / INDEX_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = True, verify: bool = True) -> Bm25Index:
        """Open a saved index; ``mmap`` maps its arrays instead of reading them, ``verify`` checks every sha256."""
        import bm25s

        directory = Path(directory)
        meta = verify_index(directory) if verify else read_index_meta(directory)
        index = cls.__new__(cls)
        index.k1, index.b = float(meta["k1"]), float(meta["b"])
        index._model = bm25s.BM25.load(str(directory), mmap=mmap, show_progress=False)
        doc_ids = np.load(directory / _DOC_IDS_FILE, mmap_mode="r" if mmap else None, allow_pickle=False)
        index.doc_ids = doc_ids  # type: ignore[assignment]  # a (mapped) array of str: indexable like the list
        index._vocab = index._model.vocab_dict
        if len(doc_ids) != int(meta["num_docs"]):
            raise IntegrityError(f"{directory}: {len(doc_ids)} document ids, {meta['num_docs']} in {INDEX_FILE}")
        return index

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)

    def scores(self, query: str) -> np.ndarray:
        """The BM25 score of every document (in ``doc_ids`` order) for one query text."""
        ids = [self._vocab[t] for t in tokenize(query) if t in self._vocab]
        if not ids:
            return np.zeros(self.num_docs, dtype=np.float64)
        return np.asarray(self._model.get_scores(ids), dtype=np.float64)

    def top_k(self, query: str, k: int) -> dict[str, float]:
        """The top ``k`` documents with a positive score, in trec_eval order (dicts keep that order)."""
        if k < 1:
            raise SettingError(f"k must be >= 1, got {k}")
        scores = self.scores(query)
        hits = np.flatnonzero(scores > 0)
        if hits.size > k:
            # everything tied with the k-th score stays in, then trec_order decides who makes the cut
            kth = np.partition(scores[hits], hits.size - k)[hits.size - k]
            hits = hits[scores[hits] >= kth]
        ranked = trec_order({str(self.doc_ids[i]): float(scores[i]) for i in hits})
        return dict(ranked[:k])

    def search(self, queries: Mapping[str, str], k: int) -> RunDict:
        """``{qid: {doc_id: score}}``: the top ``k`` of every query (queries without a hit map to ``{}``)."""
        for qid, text in queries.items():
            if not isinstance(qid, str) or not isinstance(text, str):
                raise TypeError(f"queries must map str query id -> str text, got {qid!r}: {text!r:.80}")
        return {qid: self.top_k(text, k) for qid, text in queries.items()}


class _TermCounts:
    """Per-document term counts of a corpus streamed in: the token ids of ``CHUNK_DOCS`` documents at a time (int32),
    reduced to (document, term, count) triples per chunk, so a corpus-sized build holds compact arrays, not Python
    lists of token ids."""

    CHUNK_DOCS = 65_536

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self._pending = array("i")
        self._pending_docs = 0
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (documents, terms, counts)

    def add(self, token_ids: list[int]) -> None:
        self._pending.extend(token_ids)
        self.lengths.append(len(token_ids))
        self._pending_docs += 1
        if self._pending_docs == self.CHUNK_DOCS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending_docs:
            return
        first = len(self.lengths) - self._pending_docs
        lengths = np.asarray(self.lengths[first:], dtype=np.int64)
        docs = np.repeat(np.arange(first, len(self.lengths), dtype=np.int64), lengths)
        keys = (docs << 32) | np.frombuffer(self._pending, dtype=np.int32).astype(np.int64)
        pairs, tf = np.unique(keys, return_counts=True)  # sorted by (document, term)
        tf = tf.astype(np.uint16 if tf.max(initial=0) < 2**16 else np.int32)
        self._chunks.append(((pairs >> 32).astype(np.int32), (pairs & 0xFFFFFFFF).astype(np.int32), tf))
        self._pending = array("i")
        self._pending_docs = 0

    def score_matrix(self, n_terms: int, k1: float, b: float, dtype: np.dtype) -> dict[str, Any]:
        """bm25s's score matrix (CSC over terms: ``data``, ``indices`` = documents, ``indptr``, ``num_docs``) for
        Lucene BM25, value for value what ``bm25s.BM25(method="lucene").index`` computes: the same float64 operations
        in the same order, rounded to ``dtype`` at the end."""
        self._flush()
        lengths = np.asarray(self.lengths, dtype=np.int64)
        n_docs = len(lengths)
        if not lengths.any():
            raise DataFormatError(f"BM25 needs at least one token; all {n_docs} documents are empty or whitespace")
        df = np.zeros(n_terms, dtype=np.int64)
        for _, terms, _ in self._chunks:
            df += np.bincount(terms, minlength=n_terms)
        values, where = np.unique(df, return_inverse=True)
        # math.log per distinct document frequency, as bm25s (np.log may differ from it in the last bit)
        idf = np.array([math.log(1 + (n_docs - v + 0.5) / (v + 0.5)) if v else 0.0 for v in values.tolist()])
        idf = idf.astype(dtype)[where]
        norm = k1 * ((1 - b) + b * lengths / lengths.mean())
        indptr = np.zeros(n_terms + 1, dtype=np.int64)
        np.cumsum(df, out=indptr[1:])
        data = np.empty(int(indptr[-1]), dtype=dtype)
        indices = np.empty(int(indptr[-1]), dtype=np.int32)
        fill = indptr[:-1].copy()
        while self._chunks:  # chunk by chunk: the float64 intermediates stay chunk-sized
            docs, terms, counts = self._chunks.pop(0)
            tf = counts.astype(dtype)
            scores = (idf[terms] * (tf / (norm[docs] + tf))).astype(dtype)
            _scatter_by_term(docs, terms, scores, fill, indices, data)
        return {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}


@numba.njit(cache=True)
def _scatter_by_term(docs, terms, scores, fill, indices, data) -> None:
    """Append each (document, term, score) to its term's column (``fill``: the next free slot of every column).
    Documents arrive in ascending order, so each column's documents stay ascending, as in bm25s's matrix."""
    for i in range(terms.shape[0]):
        slot = fill[terms[i]]
        indices[slot] = docs[i]
        data[slot] = scores[i]
        fill[terms[i]] = slot + 1


def verify_index(directory: str | Path) -> dict[str, Any]:
    """``bm25.json`` of a saved index, after checking every file against its sha256 (nothing is loaded)."""
    directory = Path(directory)
    meta = read_index_meta(directory)
    for name, expected in meta["sha256"].items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != expected:
            raise IntegrityError(
                f"{path}: missing or changed since the BM25 index was saved ({directory / INDEX_FILE}); delete the "
                "folder and build the index again"
            )
    return meta


def read_index_meta(directory: str | Path) -> dict[str, Any]:
    """``bm25.json`` of a saved index (its settings and file checksums); a folder without it is not a whole index."""
    path = Path(directory) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no BM25 index here (it is written last: the save did not finish)")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != INDEX_FORMAT:
        raise IntegrityError(f"{path}: BM25 index format {meta.get('format')!r}, this version reads {INDEX_FORMAT}")
    return meta


__all__ = ["B", "K1", "RUN_TAG", "Bm25Index", "read_index_meta", "tokenize", "verify_index"]
