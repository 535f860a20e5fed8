"""Exact sparse inverted index vs scipy brute force, term pruning."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import scipy.sparse as sp

from retriever.encoding import EncodingFormatError, SparseBatch
from retriever.encoding.batches import prune_rows
from retriever.index import build_shard, open_shard
from retriever.index.sparse_kernels import invert, search_inverted


def random_sparse(n: int, vocab: int, density: float, seed: int, steps: bool) -> sp.csr_matrix:
    """Positive weights; with ``steps`` they are multiples of 1/4, so many documents tie exactly."""
    m = sp.random(n, vocab, density=density, random_state=seed, format="csr", dtype=np.float32)
    if steps:
        m.data = (np.floor(m.data * 4) + 1) / 4
    else:
        m.data = m.data + np.float32(0.01)
    return m


def brute_force(queries: sp.csr_matrix, docs: sp.csr_matrix, k: int) -> list[list[tuple[int, float]]]:
    """Reference: scipy CSR product (float32); the documents sharing a term with the query (scipy drops sums that
    cancel to 0, so sharing is taken from the product of the binary patterns), ranked by (-score, doc index)."""
    scores = (queries @ docs.T).toarray()
    shared = ((queries != 0).astype(np.int32) @ (docs != 0).astype(np.int32).T).toarray() > 0
    out = []
    for i in range(queries.shape[0]):
        idx = np.flatnonzero(shared[i])
        val = scores[i, idx]
        order = np.lexsort((idx, -val))[:k]
        out.append([(int(idx[j]), float(val[j])) for j in order])
    return out


def as_hits(scores: np.ndarray, positions: np.ndarray) -> list[list[tuple[int, float]]]:
    return [[(int(p), float(s)) for s, p in zip(rs, rp) if p >= 0] for rs, rp in zip(scores, positions)]


@pytest.mark.parametrize("steps", [True, False])
@pytest.mark.parametrize("dynamic_pruning", [True, False])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_exact_index_equals_brute_force(steps: bool, dynamic_pruning: bool, k: int) -> None:
    docs = random_sparse(2000, 300, 0.04, seed=1, steps=steps)
    queries = random_sparse(80, 300, 0.03, seed=2, steps=steps)
    doc_batch = SparseBatch.from_scipy([f"d{i:05d}" for i in range(2000)], docs)
    q_batch = SparseBatch.from_scipy([f"q{i}" for i in range(80)], queries)
    offsets, postings, weights = invert(doc_batch)
    scores, positions = search_inverted(offsets, postings, weights, 2000, q_batch, k, dynamic_pruning=dynamic_pruning)
    expected = brute_force(q_batch.to_scipy(), doc_batch.to_scipy(), k)
    got = as_hits(scores, positions)
    assert got == expected  # same documents, same order (ties by doc index), bit-identical float32 scores
    if steps:  # the data really exercises tie-breaking, at the cut-off too
        longer = brute_force(q_batch.to_scipy(), doc_batch.to_scipy(), k + 1)
        tied = sum(any(a[1] == b[1] for a, b in zip(h, h[1:])) for h in longer)
        assert tied > 10


def test_pruned_search_skips_long_lists_and_stays_exact() -> None:
    """One frequent low-weight term (in every document) plus rare high-weight terms: the pruned search must give
    the exhaustive answer, including documents reached only through the frequent term."""
    rng = np.random.default_rng(0)
    n, vocab = 5000, 400
    docs = random_sparse(n, vocab, 0.01, seed=3, steps=False).tolil()
    docs[:, 0] = rng.uniform(0.01, 0.02, size=(n, 1)).astype(np.float32)  # "the"
    docs = docs.tocsr()
    queries = random_sparse(60, vocab, 0.02, seed=4, steps=False).tolil()
    queries[:, 0] = 1.0
    queries[5] = 0
    queries[5, 0] = 1.0  # a query with only the frequent term
    queries = queries.tocsr()
    doc_batch = SparseBatch.from_scipy([f"d{i:05d}" for i in range(n)], docs)
    q_batch = SparseBatch.from_scipy([f"q{i}" for i in range(60)], queries)
    offsets, postings, weights = invert(doc_batch)
    for k in (1, 10, 1000):
        skipped = np.zeros(60, dtype=bool)
        pruned = as_hits(
            *search_inverted(offsets, postings, weights, n, q_batch, k, dynamic_pruning=True, skipped=skipped)
        )
        if k < 1000:
            assert skipped.sum() > 40  # the bound really skipped posting lists for most queries
        exhaustive = as_hits(*search_inverted(offsets, postings, weights, n, q_batch, k, dynamic_pruning=False))
        assert pruned == exhaustive == brute_force(q_batch.to_scipy(), doc_batch.to_scipy(), k)


def test_dense_like_vectors_are_searched_exhaustively() -> None:
    """Vectors sharing most terms (a quarter of the vocabulary per document, ~500 skewed query weights): the bound
    stops early, but nearly every document stays a candidate and completing them would cost more than scanning
    every posting, so the pruned search declines (no query skips) and the answer is the exhaustive one."""
    n, vocab = 2000, 4000
    rng = np.random.default_rng(0)
    docs = sp.random(n, vocab, density=0.25, random_state=1, format="csr", dtype=np.float32)
    docs.data = rng.exponential(1.0, docs.nnz).astype(np.float32) + np.float32(1e-3)
    queries = sp.random(30, vocab, density=0.13, random_state=2, format="csr", dtype=np.float32)
    queries.data = (rng.exponential(1.0, queries.nnz) ** 3).astype(np.float32) + np.float32(1e-3)
    doc_batch = SparseBatch.from_scipy([f"d{i:05d}" for i in range(n)], docs)
    q_batch = SparseBatch.from_scipy([f"q{i}" for i in range(30)], queries)
    offsets, postings, weights = invert(doc_batch)
    skipped = np.zeros(30, dtype=bool)
    pruned = as_hits(
        *search_inverted(offsets, postings, weights, n, q_batch, 10, dynamic_pruning=True, skipped=skipped)
    )
    assert not skipped.any()
    assert pruned == brute_force(q_batch.to_scipy(), doc_batch.to_scipy(), 10)


@pytest.mark.parametrize("terms", [4, 20])  # about 1.6x and 8x as many postings as documents
@pytest.mark.parametrize("k", [1, 10, 100])
def test_queries_with_more_postings_than_documents_equal_brute_force(terms: int, k: int) -> None:
    """Queries hitting most documents are scanned without a branch per posting (and, past DENSE_LIKE postings per
    document, without trying the bound first); ties (weights in steps of 1/4) are still broken by doc index."""
    n, vocab, count = 2000, 300, 40
    docs = random_sparse(n, vocab, 0.4, seed=5, steps=True)
    rng = np.random.default_rng(6)
    rows = np.repeat(np.arange(count), terms)
    cols = np.concatenate([rng.choice(vocab, terms, replace=False) for _ in range(count)])
    values = (np.floor(rng.uniform(0, 1, count * terms) * 4) + 1).astype(np.float32) / 4
    queries = sp.csr_matrix((values, (rows, cols)), shape=(count, vocab), dtype=np.float32)
    doc_batch = SparseBatch.from_scipy([f"d{i:05d}" for i in range(n)], docs)
    q_batch = SparseBatch.from_scipy([f"q{i}" for i in range(count)], queries)
    offsets, postings, weights = invert(doc_batch)
    work = [int(sum(offsets[t + 1] - offsets[t] for t in q_batch.row(i)[0])) for i in range(count)]
    assert min(work) >= n  # every query takes the marking path
    expected = brute_force(q_batch.to_scipy(), doc_batch.to_scipy(), k)
    for dynamic_pruning in (True, False):
        got = as_hits(*search_inverted(offsets, postings, weights, n, q_batch, k, dynamic_pruning=dynamic_pruning))
        assert got == expected


@pytest.mark.parametrize("k", [5, 17, 100, 700, 3000])
def test_selection_with_a_crowd_of_tied_scores(k: int) -> None:
    """3000 documents share one term with the same weight (a crowd tied at one score), a few score higher or lower:
    every k (heap and sort-key selection, cut on the crowd) must return the higher ones, then the crowd in doc
    order."""
    rng = np.random.default_rng(9)
    n, vocab = 3000, 50
    docs = sp.lil_matrix((n, vocab), dtype=np.float32)
    docs[:, 0] = 1.0
    better = rng.choice(n, 40, replace=False)
    docs[better, 1] = rng.integers(1, 5, size=40).astype(np.float32)
    worse = rng.choice(np.setdiff1d(np.arange(n), better), 300, replace=False)
    docs[worse, 0] = 0.5
    docs = docs.tocsr()
    queries = sp.csr_matrix(np.array([[1.0, 1.0] + [0.0] * (vocab - 2)], dtype=np.float32))
    doc_batch = SparseBatch.from_scipy([f"d{i:05d}" for i in range(n)], docs)
    q_batch = SparseBatch.from_scipy(["q"], queries)
    offsets, postings, weights = invert(doc_batch)
    for dynamic_pruning in (True, False):
        got = as_hits(*search_inverted(offsets, postings, weights, n, q_batch, k, dynamic_pruning=dynamic_pruning))
        assert got == brute_force(q_batch.to_scipy(), doc_batch.to_scipy(), k)


def test_negative_weights_fall_back_to_exhaustive_search() -> None:
    docs = random_sparse(500, 100, 0.05, seed=5, steps=True)
    docs.data[::3] *= -1
    queries = random_sparse(20, 100, 0.05, seed=6, steps=True)
    queries.data[::2] *= -1
    doc_batch = SparseBatch.from_scipy([f"d{i}" for i in range(500)], docs)
    q_batch = SparseBatch.from_scipy([f"q{i}" for i in range(20)], queries)
    offsets, postings, weights = invert(doc_batch)
    for k in (10, 300):  # heap selection and sort-key selection (negative and zero scores included)
        got = as_hits(*search_inverted(offsets, postings, weights, 500, q_batch, k))
        assert got == brute_force(q_batch.to_scipy(), doc_batch.to_scipy(), k)
    assert any(s == 0.0 for hits in got for _, s in hits) and any(s < 0 for hits in got for _, s in hits)


def test_edge_cases_empty_query_and_k_larger_than_matches(tmp_path) -> None:
    docs = SparseBatch.from_terms(
        ["b", "a", "c"],
        [(np.array([1, 3]), np.array([1.0, 2.0])), (np.array([3]), np.array([2.0])), (np.array([0]), np.array([5.0]))],
        vocab_size=4,
    )
    build_shard(docs, tmp_path / "s", "exact", encoder_path="enc", encoder_sha256="0" * 64)
    shard = open_shard(tmp_path / "s")
    queries = SparseBatch.from_terms(
        ["q-empty", "q3", "q13"],
        [
            (np.array([], dtype=np.int32), np.array([], dtype=np.float32)),
            (np.array([3]), np.array([1.0])),
            (np.array([1, 3]), np.array([1.0, 1.0])),
        ],
        vocab_size=4,
    )
    hits = shard.search(queries, 10)
    # q3: a and b tie at 2.0 -> doc id order; c shares no term and is not returned.
    assert hits == [[], [("a", 2.0), ("b", 2.0)], [("b", 3.0), ("a", 2.0)]]


def test_prune_rows_keeps_largest_weights_smaller_term_wins_ties() -> None:
    indptr = np.array([0, 5, 7, 7], dtype=np.int64)
    indices = np.array([1, 4, 6, 8, 9, 2, 3], dtype=np.int32)
    weights = np.array([0.5, 2.0, 0.5, 3.0, -4.0, 1.0, 1.0], dtype=np.float32)
    out_indptr, out_indices, out_weights = prune_rows(indptr, indices, weights, 3)
    # row 0: |w| = .5 2 .5 3 4 -> keep terms 9 (-4), 8 (3), 4 (2), ascending term order
    # row 1: two terms <= 3 kept; row 2 empty
    assert out_indptr.tolist() == [0, 3, 5, 5]
    assert out_indices.tolist() == [4, 8, 9, 2, 3]
    assert out_weights.tolist() == [2.0, 3.0, -4.0, 1.0, 1.0]
    _, ties, _ = prune_rows(indptr, indices, weights, 4)
    assert ties[:4].tolist() == [1, 4, 8, 9]  # 0.5 at terms 1 and 6 tie for the last place: term 1 wins


def test_doc_and_query_pruning_are_applied_and_recorded(tmp_path) -> None:
    docs = random_sparse(400, 200, 0.1, seed=7, steps=False)
    queries = random_sparse(30, 200, 0.1, seed=8, steps=False)
    doc_batch = SparseBatch.from_scipy([f"d{i:03d}" for i in range(400)], docs)
    q_batch = SparseBatch.from_scipy([f"q{i}" for i in range(30)], queries)
    manifest = build_shard(
        doc_batch,
        tmp_path / "pruned",
        "exact",
        encoder_path="enc",
        encoder_sha256="0" * 64,
        prune_doc_top_k=5,
        prune_query_top_k=3,
        encoding_prune_top_k=64,
    )
    assert manifest.pruning == {"doc_top_k": 5, "query_top_k": 3, "encoding_top_k": 64}
    shard = open_shard(tmp_path / "pruned")
    assert shard.manifest.pruning == manifest.pruning
    assert int(np.diff(shard.offsets).sum()) == int(np.minimum(np.diff(doc_batch.indptr), 5).sum())
    expected = brute_force(q_batch.prune(3).to_scipy(), doc_batch.prune(5).to_scipy(), 10)
    got = shard.search(q_batch, 10)
    assert [[(int(d[1:]), s) for d, s in hits] for hits in got] == expected
    with pytest.raises(ValueError, match="prune_doc_top_k must be a positive"):
        build_shard(doc_batch, tmp_path / "bad", "exact", encoder_path="e", encoder_sha256="0", prune_doc_top_k=0)


def test_sparse_batch_validation_errors() -> None:
    with pytest.raises(EncodingFormatError, match="strictly ascending"):
        SparseBatch.from_terms(["a"], [(np.array([3, 1]), np.array([1.0, 1.0]))], vocab_size=5)
    with pytest.raises(EncodingFormatError, match="outside the vocabulary"):
        SparseBatch.from_terms(["a"], [(np.array([5]), np.array([1.0]))], vocab_size=5)
    with pytest.raises(EncodingFormatError, match="non-zero"):
        SparseBatch.from_terms(["a", "b"], [(np.array([1]), np.array([1.0])), (np.array([2]), np.array([0.0]))], 5)
    with pytest.raises(EncodingFormatError, match="row 1 .id 'b'.: weight nan"):
        SparseBatch.from_terms(["a", "b"], [(np.array([1]), np.array([1.0])), (np.array([2]), np.array([np.nan]))], 5)


def full_postings(n_docs: int, terms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every document holds every term (weights vary by document): each query scans ``n_docs`` postings per term."""
    offsets = np.arange(terms + 1, dtype=np.int64) * n_docs
    docs = np.tile(np.arange(n_docs, dtype=np.int32), terms)
    weights = (np.arange(n_docs * terms, dtype=np.float32) % 97 + 1) / 97
    return offsets, docs, weights


def test_a_search_lets_other_python_threads_run() -> None:
    """A server searches in a worker thread so that its event loop keeps serving, which needs a search that does not
    hold the GIL: while one long search runs, this thread's longest stall is far shorter than the search (with the
    GIL held it would be the whole search)."""
    n_docs, terms = 200_000, 16
    offsets, docs, weights = full_postings(n_docs, terms)

    def all_terms(count: int) -> SparseBatch:
        rows = sp.csr_matrix(np.ones((count, terms), dtype=np.float32))
        return SparseBatch.from_scipy([str(i) for i in range(count)], rows)

    probe = all_terms(8)
    search_inverted(offsets, docs, weights, n_docs, probe, 10, dynamic_pruning=False)  # compiled before timing
    start = time.perf_counter()
    search_inverted(offsets, docs, weights, n_docs, probe, 10, dynamic_pruning=False)
    per_query = (time.perf_counter() - start) / 8
    queries = all_terms(max(8, int(0.5 / per_query)))  # about half a second of search on any machine
    took: list[float] = []

    def search() -> None:
        start = time.perf_counter()
        search_inverted(offsets, docs, weights, n_docs, queries, 10, dynamic_pruning=False)
        took.append(time.perf_counter() - start)

    worker = threading.Thread(target=search)
    last = time.perf_counter()
    worker.start()
    stall = 0.0
    while worker.is_alive():
        now = time.perf_counter()
        stall, last = max(stall, now - last), now
    stall = max(stall, time.perf_counter() - last)
    worker.join()
    assert took[0] > 0.2, "the search must be long enough to tell a held GIL from scheduling noise"
    assert stall < took[0] / 2, (stall, took[0])


CONCURRENT_SEARCHES = """
import threading
import numpy as np
import scipy.sparse as sp
from retriever.encoding import SparseBatch
from retriever.index.sparse_kernels import invert, search_inverted

docs = sp.random(3000, 400, density=0.05, random_state=1, format="csr", dtype=np.float32)
queries = sp.random(64, 400, density=0.05, random_state=2, format="csr", dtype=np.float32)
doc_batch = SparseBatch.from_scipy([str(i) for i in range(3000)], docs)
q_batch = SparseBatch.from_scipy([str(i) for i in range(64)], queries)
offsets, postings, weights = invert(doc_batch)
expected = search_inverted(offsets, postings, weights, 3000, q_batch, 10)
results = [None] * 8

def search(i):
    for _ in range(20):
        results[i] = search_inverted(offsets, postings, weights, 3000, q_batch, 10)

threads = [threading.Thread(target=search, args=(i,)) for i in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
assert all(np.array_equal(r[0], expected[0]) and np.array_equal(r[1], expected[1]) for r in results)
import numba
print(numba.threading_layer())
"""


@pytest.mark.parametrize("layer", ["workqueue", "omp"])
def test_searches_from_several_threads_at_once(layer: str) -> None:
    """Numba's `workqueue` layer (the one every installation has) aborts the process when two threads launch a
    parallel kernel at once; searches there take turns, and with a threadsafe layer they run side by side."""
    if layer == "omp":
        pytest.importorskip("numba.np.ufunc.omppool", reason="no OpenMP threading layer in this Numba")
    env = {**os.environ, "NUMBA_THREADING_LAYER": layer}
    done = subprocess.run(
        [sys.executable, "-c", CONCURRENT_SEARCHES], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == layer
