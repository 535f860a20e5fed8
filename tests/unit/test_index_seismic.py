"""seismic shards: recall against the exact index, results keyed back to the right query, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import write_encodings

from retriever.encoding import SparseBatch
from retriever.index import build_shard, build_shards, open_shard, open_shards, search_shards

pytest.importorskip("seismic")

VOCAB = 70_000  # above 65,535: needs the u32 ("LV") variant


def clustered_docs(n: int, seed: int) -> sp.csr_matrix:
    """Documents drawn around 40 topics (an easy case for seismic's clustered posting lists)."""
    rng = np.random.default_rng(seed)
    topics = [np.sort(rng.choice(VOCAB, 60, replace=False)) for _ in range(40)]
    rows, cols, vals = [], [], []
    for i in range(n):
        terms = np.unique(np.concatenate([rng.choice(topics[i % 40], 20, replace=False), rng.choice(VOCAB, 5)]))
        rows += [i] * len(terms)
        cols += terms.tolist()
        vals += rng.uniform(0.1, 2.0, len(terms)).tolist()
    return sp.csr_matrix((np.array(vals, np.float32), (rows, cols)), shape=(n, VOCAB))


def test_seismic_recall_and_query_keying(tmp_path) -> None:
    docs = clustered_docs(2000, seed=0)
    ids = [f"doc{i:04d}" for i in range(2000)]
    batch = SparseBatch.from_scipy(ids, docs)
    # Queries are noisy copies of documents, listed in a shuffled order with non-numeric ids.
    rng = np.random.default_rng(1)
    sources = rng.choice(2000, 60, replace=False)
    qmat = docs[sources].tocsr()
    qmat.data = qmat.data * rng.uniform(0.8, 1.2, qmat.nnz).astype(np.float32)
    qids = [f"query-{s}" for s in sources]
    queries = SparseBatch.from_scipy(qids, qmat)

    build_shard(batch, tmp_path / "exact", "exact", encoder_path="enc", encoder_sha256="0" * 64)
    build_shard(
        batch,
        tmp_path / "seismic",
        "seismic",
        encoder_path="enc",
        encoder_sha256="0" * 64,
        params={"n_postings": 400, "query_cut": 20, "heap_factor": 0.9},
    )
    exact = open_shard(tmp_path / "exact").search(queries, 10)
    shard = open_shard(tmp_path / "seismic")  # loaded back through seismic's own load
    assert shard.index.len == 2000 and shard.index.dim == VOCAB
    approx = shard.search(queries, 10)
    recalls = [len({d for d, _ in a} & {d for d, _ in e}) / 10 for a, e in zip(approx, exact)]
    assert np.mean(recalls) >= 0.9
    # Each result list belongs to its own query: its top hit is the query's source document, with the exact score.
    for qid, a, e in zip(qids, approx, exact):
        assert a[0][0] == e[0][0] == f"doc{int(qid.split('-')[1]):04d}"
        assert a[0][1] == pytest.approx(e[0][1], rel=1e-3)  # seismic stores values at reduced precision
        assert [s for _, s in a] == sorted((s for _, s in a), reverse=True)


def test_seismic_handles_empty_queries_and_documents(tmp_path) -> None:
    terms = [
        (np.array([1, 70_001]), np.array([1.0, 2.0])),
        (np.array([], dtype=np.int32), np.array([], dtype=np.float32)),  # indexed by nobody
        (np.array([70_001]), np.array([3.0])),
    ]
    batch = SparseBatch.from_terms(["a", "b", "c"], terms, vocab_size=VOCAB + 10)
    build_shard(batch, tmp_path / "s", "seismic", encoder_path="e", encoder_sha256="0")
    shard = open_shard(tmp_path / "s")
    queries = SparseBatch.from_terms(
        ["none", "q"],
        [(np.array([], dtype=np.int32), np.array([], dtype=np.float32)), (np.array([70_001]), np.array([1.0]))],
        vocab_size=VOCAB + 10,
    )
    assert shard.search(queries, 5) == [[], [("c", 3.0), ("a", 2.0)]]


def test_seismic_shards_through_the_sharded_api(tmp_path) -> None:
    docs = clustered_docs(1200, seed=2)
    batch = SparseBatch.from_scipy([f"p{i}" for i in range(1200)], docs)
    write_encodings(tmp_path / "enc", batch, encoder_path="enc", encoder_sha256="1" * 64)
    build_shards(tmp_path / "enc", tmp_path / "exact", 1)
    build_shards(tmp_path / "enc", tmp_path / "seismic", 2, "seismic", partition="hash", params={"heap_factor": 0.9})
    shards = open_shards(tmp_path / "seismic")
    assert [s.kind for s in shards] == ["seismic", "seismic"]
    assert "seismic.index.seismic" in shards[0].manifest.files  # the native index file is covered by the manifest
    assert shards[0].params["heap_factor"] == 0.9
    queries = SparseBatch.from_scipy([f"q{i}" for i in range(30)], docs[:30])
    exact = search_shards(open_shards(tmp_path / "exact"), queries, 10)
    approx = search_shards(shards, queries, 10)
    assert list(approx) == list(exact)
    assert np.mean([len(set(approx[q]) & set(exact[q])) / 10 for q in exact]) >= 0.9
