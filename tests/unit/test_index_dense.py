"""FAISS dense shards: flat equals numpy brute force, ties by doc id, HNSW recall, GPU selection, mismatches."""

from __future__ import annotations

import numpy as np
import pytest

from retriever.encoding import DenseBatch, SparseBatch
from retriever.index import IndexMismatchError, build_shard, open_shard
from retriever.index.dense import gpu_available, sort_hits

pytest.importorskip("faiss")


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_topk(queries: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ docs.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # stable: ties by smaller index
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("nq", [3, 50])  # FAISS uses SIMD loops below 20 queries and BLAS above
def test_flat_equals_numpy_brute_force(tmp_path, nq: int) -> None:
    docs = unit_vectors(3000, 48, seed=0)
    ids = [f"doc{i:05d}" for i in range(3000)]
    queries = unit_vectors(nq, 48, seed=1)
    build_shard(DenseBatch(ids, docs), tmp_path / "flat", "flat", encoder_path="enc", encoder_sha256="ab" * 32)
    shard = open_shard(tmp_path / "flat")
    assert shard.device == "cpu" or gpu_available()
    hits = shard.search(DenseBatch([f"q{i}" for i in range(nq)], queries), 20)
    ref_scores, ref_idx = numpy_topk(queries, docs, 20)
    for row, (scores, idx) in zip(hits, zip(ref_scores, ref_idx)):
        assert [d for d, _ in row] == [ids[i] for i in idx]
        np.testing.assert_allclose([s for _, s in row], scores, rtol=0, atol=1e-5)


def test_flat_ties_are_broken_by_doc_id(tmp_path) -> None:
    base = unit_vectors(10, 16, seed=2)
    docs = np.concatenate([base] * 4)  # four identical copies of each vector
    ids = [f"c{copy}-v{i}" for copy in range(4) for i in range(10)]
    order = np.random.default_rng(3).permutation(40)  # the input order must not matter
    batch = DenseBatch([ids[i] for i in order], docs[order])
    build_shard(batch, tmp_path / "ties", "flat", encoder_path="enc", encoder_sha256="0" * 64)
    shard = open_shard(tmp_path / "ties")
    for k in (1, 3, 6):
        hits = shard.search(DenseBatch(["q"], base[4:5]), k)[0]
        # The best four are the copies of v4 with equal scores: ascending doc id, the first k of them.
        assert [d for d, _ in hits[:4]] == ["c0-v4", "c1-v4", "c2-v4", "c3-v4"][:k]
        assert len({s for _, s in hits[: min(k, 4)]}) == 1


def test_sort_hits_orders_ties_and_puts_missing_last() -> None:
    scores = np.array([[1.0, 2.0, 2.0, 0.0]], dtype=np.float32)
    ids = np.array([[5, 9, 3, -1]], dtype=np.int64)
    s, i = sort_hits(scores, ids)
    assert i.tolist() == [[3, 9, 5, -1]]
    assert s.tolist() == [[2.0, 2.0, 1.0, -np.inf]]


def test_hnsw_recall_sanity(tmp_path) -> None:
    docs = unit_vectors(4000, 32, seed=4)
    queries = unit_vectors(100, 32, seed=5)
    ids = [f"d{i:05d}" for i in range(4000)]
    build_shard(
        DenseBatch(ids, docs),
        tmp_path / "hnsw",
        "hnsw",
        encoder_path="enc",
        encoder_sha256="0" * 64,
        params={"m": 16, "ef_construction": 100, "ef_search": 200},
    )
    shard = open_shard(tmp_path / "hnsw")
    assert shard.manifest.params == {"m": 16, "ef_construction": 100, "ef_search": 200}
    hits = shard.search(DenseBatch([f"q{i}" for i in range(100)], queries), 10)
    _, ref = numpy_topk(queries, docs, 10)
    recall = np.mean([len({d for d, _ in h} & {ids[i] for i in r}) / 10 for h, r in zip(hits, ref)])
    assert recall >= 0.95
    # A tiny search queue must lose recall: the parameter really reaches FAISS.
    shard.set_search_params({"ef_search": 1})
    low = shard.search(DenseBatch([f"q{i}" for i in range(100)], queries), 1)
    low_recall = np.mean([h[0][0] == ids[r[0]] for h, r in zip(low, ref)])
    assert low_recall < recall
    with pytest.raises(ValueError, match="not a search parameter"):
        shard.set_search_params({"m": 8})
    with pytest.raises(ValueError, match="unknown parameter 'efs'"):
        build_shard(
            DenseBatch(ids, docs), tmp_path / "x", "hnsw", encoder_path="e", encoder_sha256="0", params={"efs": 1}
        )


def test_query_dimension_and_paradigm_mismatch(tmp_path) -> None:
    build_shard(
        DenseBatch(["a", "b"], unit_vectors(2, 8, seed=6)), tmp_path / "s", encoder_path="e", encoder_sha256="0"
    )
    shard = open_shard(tmp_path / "s")
    assert shard.kind == "flat"  # the dense default
    with pytest.raises(IndexMismatchError, match="8-dimensional vectors but the queries have dimension 4"):
        shard.search(DenseBatch(["q"], unit_vectors(1, 4, seed=7)), 1)
    sparse = SparseBatch.from_terms(["q"], [(np.array([1]), np.array([1.0]))], vocab_size=8)
    with pytest.raises(IndexMismatchError, match="dense index .* queries are sparse"):
        shard.search(sparse, 1)
    with pytest.raises(ValueError, match="'exact' indexes sparse vectors, but these are dense; use flat, hnsw"):
        build_shard(
            DenseBatch(["a"], unit_vectors(1, 8, 0)), tmp_path / "t", "exact", encoder_path="e", encoder_sha256="0"
        )


def test_device_selection_without_gpu(tmp_path) -> None:
    if gpu_available():
        pytest.skip("a GPU is visible: the CPU-only behaviour is not observable here")
    build_shard(DenseBatch(["a"], unit_vectors(1, 8, 0)), tmp_path / "s", encoder_path="e", encoder_sha256="0")
    assert open_shard(tmp_path / "s", device="auto").device == "cpu"
    with pytest.raises(RuntimeError, match="FAISS sees no GPU"):
        open_shard(tmp_path / "s", device="gpu")
