"""Sharded build and search: N shards merged equal one index; merge_topk; partitions; TREC run output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import write_encodings

from retriever.encoding import DenseBatch, SparseBatch
from retriever.index import (
    IndexMismatchError,
    build_shards,
    index_summary,
    merge_topk,
    open_shards,
    search_shards,
    search_to_run,
    shard_assignment,
)
from retriever.trec import read_run

ENCODER = {"encoder_path": "models/enc", "encoder_sha256": "e" * 64}


def sparse_docs(n: int = 1500, vocab: int = 200, seed: int = 0) -> SparseBatch:
    m = sp.random(n, vocab, density=0.05, random_state=seed, format="csr", dtype=np.float32)
    m.data = (np.floor(m.data * 4) + 1) / 4  # coarse weights: many exact ties across shards
    ids = [f"D{(i * 7919) % n:05d}" for i in range(n)]  # rows not in doc-id order
    return SparseBatch.from_scipy(ids, m)


def sparse_queries(nq: int = 40, vocab: int = 200, seed: int = 1) -> SparseBatch:
    m = sp.random(nq, vocab, density=0.04, random_state=seed, format="csr", dtype=np.float32)
    m.data = (np.floor(m.data * 4) + 1) / 4
    return SparseBatch.from_scipy([f"q{i}" for i in range(nq)], m)


def test_merge_topk_by_hand() -> None:
    per_shard = [
        [[("b", 3.0), ("a", 1.0)], [("x", 0.5)]],
        [[("c", 3.0), ("a2", 2.0)], []],
        [[("a", 3.0)], [("y", 0.5), ("w", 0.1)]],
    ]
    assert merge_topk(per_shard, 3) == [[("a", 3.0), ("b", 3.0), ("c", 3.0)], [("x", 0.5), ("y", 0.5), ("w", 0.1)]]
    assert merge_topk(per_shard, 1) == [[("a", 3.0)], [("x", 0.5)]]
    with pytest.raises(ValueError, match="shard 1 answered 2 queries, shard 0 answered 1"):
        merge_topk([[[]], [[], []]], 1)


def test_shard_assignment_partitions() -> None:
    ids = [f"d{i}" for i in range(10)]
    assert shard_assignment(ids, 3, "contiguous").tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    hashed = shard_assignment(ids, 4, "hash")
    assert hashed.tolist() == shard_assignment(list(reversed(ids)), 4, "hash")[::-1].tolist()  # order-free
    assert set(hashed.tolist()) <= {0, 1, 2, 3}
    many = shard_assignment([f"doc-{i}" for i in range(4000)], 4, "hash")
    assert np.bincount(many).min() > 900  # roughly balanced


@pytest.mark.parametrize("partition", ["contiguous", "hash"])
def test_sparse_shards_merged_equal_one_index(tmp_path, partition: str) -> None:
    docs = sparse_docs()
    write_encodings(tmp_path / "enc", docs, rows_per_file=400, **ENCODER)
    build_shards(tmp_path / "enc", tmp_path / "one", 1)
    folders = build_shards(tmp_path / "enc", tmp_path / "four", 4, "exact", partition=partition)
    assert [f.name for f in folders] == [f"shard-0000{i}" for i in range(4)]
    queries = sparse_queries()
    for k in (1, 10, 200):
        one = search_shards(open_shards(tmp_path / "one"), queries, k)
        four = search_shards(open_shards(tmp_path / "four"), queries, k, batch_size=7)
        assert list(one) == queries.ids
        assert {q: list(h.items()) for q, h in four.items()} == {q: list(h.items()) for q, h in one.items()}
    # and the single index agrees with brute force, ties by doc id
    dense_scores = (queries.to_scipy() @ docs.to_scipy().T).toarray()
    for qi, qid in enumerate(queries.ids):
        row = dense_scores[qi]
        cand = [(docs.ids[j], float(row[j])) for j in np.flatnonzero(row)]
        cand.sort(key=lambda h: (-h[1], h[0]))
        assert list(one[qid].items()) == cand[:200]
    summary = index_summary(open_shards(tmp_path / "four"))
    assert (summary["num_shards"], summary["doc_count"], summary["vocab_size"]) == (4, 1500, 200)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_dense_shards_merged_equal_one_index(tmp_path, kind: str) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 24)).astype(np.float32)
    ids = [f"doc-{i}" for i in rng.permutation(2000)]
    write_encodings(tmp_path / "enc", DenseBatch(ids, vectors), **ENCODER)
    params = {"m": 16, "ef_construction": 200, "ef_search": 400} if kind == "hnsw" else None
    build_shards(tmp_path / "enc", tmp_path / "one", 1, kind, params=params)
    build_shards(tmp_path / "enc", tmp_path / "three", 3, kind, partition="hash", params=params)
    queries = DenseBatch([f"q{i}" for i in range(30)], rng.standard_normal((30, 24)).astype(np.float32))
    one = search_shards(open_shards(tmp_path / "one"), queries, 10)
    three = search_shards(open_shards(tmp_path / "three"), queries, 10)
    if kind == "flat":
        for qid in one:
            assert list(one[qid]) == list(three[qid])
            np.testing.assert_allclose(list(one[qid].values()), list(three[qid].values()), atol=1e-5)
        exact = queries.vectors.astype(np.float64) @ vectors.astype(np.float64).T
        for qi, qid in enumerate(queries.ids):
            assert list(one[qid]) == [ids[j] for j in np.argsort(-exact[qi])[:10]]
    else:  # approximate: both must find nearly all of the exact neighbours
        overlap = np.mean([len(set(one[q]) & set(three[q])) / 10 for q in one])
        assert overlap >= 0.9


def test_search_to_run_writes_trec_and_checks_encoder(tmp_path) -> None:
    docs = sparse_docs(300)
    write_encodings(tmp_path / "docs", docs, **ENCODER)
    build_shards(tmp_path / "docs", tmp_path / "index", 2)
    queries = sparse_queries(5)
    write_encodings(tmp_path / "queries", queries, **ENCODER, kind="query")
    run = search_to_run(tmp_path / "index", tmp_path / "queries", 5, output=tmp_path / "run.trec", tag="exact")
    assert read_run(tmp_path / "run.trec") == run
    assert sum(len(h) for h in run.values()) > 0
    before = (tmp_path / "run.trec").read_bytes()
    with pytest.raises(FileExistsError, match="the run file already exists; pass --overwrite"):
        search_to_run(tmp_path / "index", tmp_path / "queries", 3, output=tmp_path / "run.trec")
    with pytest.raises(IndexMismatchError, match="holds passage encodings, not queries"):
        search_to_run(tmp_path / "index", tmp_path / "docs", 3, output=tmp_path / "run.trec", overwrite=True)
    assert (tmp_path / "run.trec").read_bytes() == before
    search_to_run(tmp_path / "index", tmp_path / "queries", 3, output=tmp_path / "run.trec", overwrite=True)
    assert {len(hits) for hits in read_run(tmp_path / "run.trec").values()} == {3}
    write_encodings(tmp_path / "other", queries, encoder_path="other", encoder_sha256="f" * 64, kind="query")
    with pytest.raises(IndexMismatchError, match="encoder sha256 ffffffffffffffff… was expected"):
        search_to_run(tmp_path / "index", tmp_path / "other", 5)
    assert search_to_run(tmp_path / "index", tmp_path / "other", 5, check_encoder=False) == run


def test_build_shards_refuses_bad_requests(tmp_path) -> None:
    write_encodings(tmp_path / "enc", sparse_docs(10), **ENCODER)
    with pytest.raises(ValueError, match="fewer than num_shards=11"):
        build_shards(tmp_path / "enc", tmp_path / "a", 11)
    with pytest.raises(ValueError, match="'flat' indexes dense vectors, but these are sparse; use exact, seismic"):
        build_shards(tmp_path / "enc", tmp_path / "a", 1, "flat")
    with pytest.raises(KeyError, match="unknown index kind 'ivf'"):
        build_shards(tmp_path / "enc", tmp_path / "a", 1, "ivf")
    build_shards(tmp_path / "enc", tmp_path / "b", 2)
    with pytest.raises(FileExistsError, match="an index folder already exists; pass --overwrite"):
        build_shards(tmp_path / "enc", tmp_path / "b", 2)
    build_shards(tmp_path / "enc", tmp_path / "b", 3, overwrite=True)
    assert json.loads((tmp_path / "b" / "shards.json").read_text())["num_shards"] == 3
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds files that are not an index folder; refusing to replace"):
        build_shards(tmp_path / "enc", tmp_path / "c", 1, overwrite=True)
    dup = SparseBatch.from_terms(["x", "x"], [(np.array([1]), np.array([1.0]))] * 2, vocab_size=5)
    write_encodings(tmp_path / "dup", dup, **ENCODER)
    with pytest.raises(ValueError, match="'x' occurs more than once"):
        build_shards(tmp_path / "dup", tmp_path / "d", 1)
