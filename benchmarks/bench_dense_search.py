"""Dense search: the FAISS flat shard vs numpy brute force on the same vectors, plus HNSW recall and speed.

Vectors: 14,581 documents × 768 dimensions (the DL19 passage-pool size, a BERT-base/Llama-1B-like width), random
Gaussian rows L2-normalised like the dense encoder's output, and 6,980 queries drawn the same way (seeded). Random
vectors are the hardest case for HNSW; exact search does not care. Both exact methods return the top-k by inner
product with ties broken by the smaller index; the check compares ids exactly and scores to 1e-5.

Run from the repository root:  PYTHONPATH=. python benchmarks/bench_dense_search.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from retriever.encoding import DenseBatch
from retriever.index import build_shard, open_shard


def numpy_topk(queries: np.ndarray, docs: np.ndarray, k: int, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: one matrix product per query batch (BLAS), then argpartition + sort of each row."""
    out_s = np.empty((len(queries), k), dtype=np.float32)
    out_p = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), batch):
        scores = queries[start : start + batch] @ docs.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.lexsort((part, -part_scores), axis=1)
        out_p[start : start + batch] = np.take_along_axis(part, order, axis=1)
        out_s[start : start + batch] = np.take_along_axis(part_scores, order, axis=1)
    return out_s, out_p


def timed(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` runs after one warm-up run, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def unit_rows(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-dense-") as tmp:
        run(Path(tmp))


def run(workdir: Path) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=14_581)
    parser.add_argument("--queries", type=int, default=6_980)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    docs = unit_rows(args.docs, args.dim, rng)
    queries = unit_rows(args.queries, args.dim, rng)
    ids = [f"doc{i:06d}" for i in range(args.docs)]  # zero-padded: doc-id order == row order
    q_batch = DenseBatch([f"q{i}" for i in range(args.queries)], queries)
    k = args.k

    start = time.perf_counter()
    build_shard(DenseBatch(ids, docs), workdir / "flat", "flat", encoder_path="random", encoder_sha256="0" * 64)
    flat = open_shard(workdir / "flat", device="cpu")
    flat_build = time.perf_counter() - start
    start = time.perf_counter()
    build_shard(DenseBatch(ids, docs), workdir / "hnsw", "hnsw", encoder_path="random", encoder_sha256="0" * 64)
    hnsw = open_shard(workdir / "hnsw", device="cpu")
    hnsw_build = time.perf_counter() - start

    t_numpy, (ref_s, ref_p) = timed(lambda: numpy_topk(queries, docs, k), args.repeats)
    t_flat, (flat_s, flat_p) = timed(lambda: flat.search_positions(q_batch, k), args.repeats)
    same_ids = np.array_equal(flat_p, ref_p)
    max_diff = float(np.abs(flat_s - ref_s).max())
    if not same_ids or max_diff > 1e-5:
        raise SystemExit(f"FAISS flat differs from numpy: ids equal {same_ids}, max score difference {max_diff}")
    rows = [("numpy brute force (BLAS matmul + argpartition)", t_numpy, 1.0), ("FAISS IndexFlatIP shard", t_flat, 1.0)]
    for ef in (64, 256):
        hnsw.set_search_params({"ef_search": ef})
        # HNSW timings are long and stable on this data: one timed run after the warm-up.
        t, (_, p) = timed(lambda: hnsw.search_positions(q_batch, k), 1)
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(p, ref_p)])
        m, efc = hnsw.params["m"], hnsw.params["ef_construction"]
        rows.append((f"FAISS HNSW M={m} efC={efc} efSearch={ef}", t, recall))

    print(
        f"{args.docs} docs × {args.dim} dims, {args.queries} queries, k={k}, best of {args.repeats} runs, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; flat build {flat_build:.2f} s, HNSW build "
        f"{hnsw_build:.1f} s"
    )
    print(f"FAISS flat top-{k} ids == numpy: {same_ids}; max |score difference| {max_diff:.1e}")
    print()
    print(f"| method | time (s) | QPS | speed-up vs numpy | recall@{k} vs exact |")
    print("|---|---|---|---|---|")
    for label, t, recall in rows:
        print(f"| {label} | {t:.3f} | {args.queries / t:,.0f} | {t_numpy / t:.1f}× | {recall:.4f} |")


if __name__ == "__main__":
    main()
