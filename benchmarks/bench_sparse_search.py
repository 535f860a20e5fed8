"""Sparse search on real text: the exact inverted index vs scipy CSR brute force, and seismic vs exact.

Corpus: the DL19 passage pool (14,581 real MS MARCO passages, ../shared/data/msmarco_trecdl), tokenized with the
real Llama-3 tokenizer (vocabulary 128,256, no BOS). Vectors are learned-sparse-like: the weight of token t in a
text is ``log(1 + tf) * idf(t)`` with the BM25 idf ``ln(1 + (N - df + 0.5) / (df + 0.5))`` over the pool, so
frequent tokens (``the``, ``,``, ``Ġof``) get small but non-zero weights, as in SPLADE-style vectors. Queries use the
same formula with the pool's idf. Correctness is checked on the 43 DL19 queries; speed is measured on the 6,980
MS MARCO dev-small queries (real queries of the same kind; more of them make the timings stable).

Run from the repository root:  PYTHONPATH=. python benchmarks/bench_sparse_search.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numba
import numpy as np

from retriever.data.passage_pool import load_passage_pool
from retriever.encoding import SparseBatch
from retriever.index import build_shard, open_shard
from retriever.index.sparse_kernels import PRUNE_MAX_K, search_inverted
from retriever.models.tokenizers import llama3_tokenizer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_topics(path: Path) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        qid, _, text = line.partition("\t")
        ids.append(qid)
        texts.append(text)
    return ids, texts


def tfidf_vectors(token_ids: list[list[int]], idf: np.ndarray, ids: list[str]) -> SparseBatch:
    terms = []
    for tokens in token_ids:
        counts = Counter(tokens)
        t = np.array(sorted(counts), dtype=np.int32)
        tf = np.array([counts[i] for i in t.tolist()], dtype=np.float64)
        terms.append((t, (np.log1p(tf) * idf[t]).astype(np.float32)))
    return SparseBatch.from_terms(ids, terms, vocab_size=len(idf))


def scipy_topk(queries: SparseBatch, docs_t, k: int, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: the CSR product with all documents, then the top-k of each row (score desc, doc index asc)."""
    out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_p = np.full((len(queries), k), -1, dtype=np.int64)
    q = queries.to_scipy()
    for start in range(0, q.shape[0], batch):
        scores = (q[start : start + batch] @ docs_t).tocsr()
        for r in range(scores.shape[0]):
            lo, hi = scores.indptr[r], scores.indptr[r + 1]
            idx, val = scores.indices[lo:hi], scores.data[lo:hi]
            if len(val) > k:  # keep everything tied with the k-th score, then order exactly
                cut = np.partition(val, len(val) - k)[len(val) - k]
                keep = val >= cut
                idx, val = idx[keep], val[keep]
            order = np.lexsort((idx, -val))[:k]
            out_s[start + r, : len(order)] = val[order]
            out_p[start + r, : len(order)] = idx[order]
    return out_s, out_p


def timed(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` runs after one warm-up run (other load on the machine only adds time), and
    the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top-k ids found by the approximate search."""
    hits = [len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, int((e >= 0).sum())) for a, e in zip(approx, exact)]
    return float(np.mean(hits))


def tie_aware_recall(approx: np.ndarray, exact_scores: np.ndarray, queries, docs_t) -> float:
    """Share of approximate hits whose exact score reaches the exact k-th score: with quantized tf-idf weights many
    documents tie at the cut-off, and any of them is a correct answer."""
    q = queries.to_scipy()
    good = []
    for i in range(len(queries)):
        ids = approx[i][approx[i] >= 0]
        kth = exact_scores[i][np.isfinite(exact_scores[i])]
        if not len(kth):
            continue
        scores = np.asarray((q[i] @ docs_t[:, ids]).todense()).ravel()
        good.append(float(np.sum(scores >= kth[-1] * (1 - 1e-6))) / len(kth))
    return float(np.mean(good))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-sparse-") as tmp:
        run(Path(tmp))


def run(workdir: Path) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timing-queries", type=int, default=0, help="use only this many dev queries (0: all)")
    args = parser.parse_args()
    data = args.data
    trecdl = data / "msmarco_trecdl"
    if not trecdl.is_dir():
        sys.exit(f"{trecdl} not found: pass --data pointing at the shared data folder")

    start = time.perf_counter()
    tokenizer = llama3_tokenizer(data / "tokenizers" / "llama3" / "tokenizer.model")
    pool = load_passage_pool(trecdl / "rank_llm_retrieve_results")
    doc_ids = list(pool)
    doc_tokens = tokenizer(list(pool.values()), add_special_tokens=False)["input_ids"]
    df = np.zeros(len(tokenizer), dtype=np.float64)
    for tokens in doc_tokens:
        df[np.unique(tokens)] += 1
    n = len(doc_ids)
    idf = np.log1p((n - df + 0.5) / (df + 0.5))
    docs = tfidf_vectors(doc_tokens, idf, doc_ids)
    dl19_ids, dl19_text = read_topics(trecdl / "topics.dl19-passage.txt")
    dev_ids, dev_text = read_topics(trecdl / "topics.msmarco-passage.dev-subset.txt")
    if args.timing_queries:
        dev_ids, dev_text = dev_ids[: args.timing_queries], dev_text[: args.timing_queries]
    dl19 = tfidf_vectors(tokenizer(dl19_text, add_special_tokens=False)["input_ids"], idf, dl19_ids)
    dev = tfidf_vectors(tokenizer(dev_text, add_special_tokens=False)["input_ids"], idf, dev_ids)
    lengths = np.diff(docs.indptr)
    postings = np.sort(df[df > 0])[::-1]
    print(
        f"corpus: {n} passages, vocabulary {len(tokenizer)}, {docs.nnz} non-zeros "
        f"({lengths.mean():.1f} terms/passage, longest posting list {int(postings[0])}); "
        f"queries: {len(dl19)} DL19 ({np.diff(dl19.indptr).mean():.1f} terms), {len(dev)} dev-small "
        f"({np.diff(dev.indptr).mean():.1f} terms); prepared in {time.perf_counter() - start:.1f} s"
    )
    k = args.k

    start = time.perf_counter()
    build_shard(docs, workdir / "exact", "exact", encoder_path="tfidf", encoder_sha256="0" * 64)
    exact = open_shard(workdir / "exact")
    exact_build = time.perf_counter() - start
    # scipy works on the same documents in the shard's order (doc-id order), so index ids agree.
    order = np.array(sorted(range(n), key=docs.ids.__getitem__))
    exact_docs_t = docs.take(order).to_scipy().T.tocsr()

    def run_exact(queries: SparseBatch, pruning: bool, threads: int):
        numba.set_num_threads(threads)
        try:
            return search_inverted(
                exact.offsets, exact.docs, exact.weights, exact.doc_count, queries, k,
                term_max=exact.term_max, dynamic_pruning=pruning,
            )  # fmt: skip
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)

    # Correctness on DL19 and on all timing queries: identical ids and bit-identical scores.
    ref_dl19 = scipy_topk(dl19, exact_docs_t, k)
    rows = []
    t_scipy, ref_dev = timed(lambda: scipy_topk(dev, exact_docs_t, k), args.repeats)
    rows.append(("scipy CSR brute force: product + per-row top-k (1 thread)", t_scipy, None, None, None))
    q_all = dev.to_scipy()
    t_product, _ = timed(lambda: [q_all[s : s + 1000] @ exact_docs_t for s in range(0, len(dev), 1000)], args.repeats)
    rows.append(("scipy CSR product alone, no top-k (lower bound of brute force)", t_product, None, None, None))
    threads = numba.config.NUMBA_NUM_THREADS
    # Bound-based skipping applies up to k = PRUNE_MAX_K; above, both settings run the same exhaustive search.
    for pruning in (False, True) if k <= PRUNE_MAX_K else (False,):
        for nthreads in sorted({1, threads}):
            for name, queries, ref in (("dl19", dl19, ref_dl19), ("dev", dev, ref_dev)):
                s, p = run_exact(queries, pruning, nthreads)
                same = np.array_equal(p, ref[1]) and np.array_equal(s, ref[0])
                if not same:
                    sys.exit(f"exact index (pruning={pruning}) differs from scipy on the {name} queries")
            t, _ = timed(lambda pruning=pruning, nthreads=nthreads: run_exact(dev, pruning, nthreads), args.repeats)
            label = "exact inverted index, " + ("MaxScore skipping" if pruning else "exhaustive TAAT")
            rows.append((f"{label} ({nthreads} thread{'s' if nthreads > 1 else ''})", t, 1.0, 1.0, 1.0))

    seismic_rows = []
    try:
        import seismic  # noqa: F401

        have_seismic = True
    except ImportError:
        have_seismic = False
    if have_seismic:
        start = time.perf_counter()
        build_shard(docs, workdir / "seismic", "seismic", encoder_path="tfidf", encoder_sha256="0" * 64)
        seismic_shard = open_shard(workdir / "seismic")
        seismic_build = time.perf_counter() - start
        exact_dev = ref_dev[1]
        for query_cut, heap_factor in ((10, 0.7), (20, 0.9), (40, 1.0)):
            seismic_shard.set_search_params({"query_cut": query_cut, "heap_factor": heap_factor})
            t, (_, p) = timed(lambda: seismic_shard.search_positions(dev, k), args.repeats)
            _, p19 = seismic_shard.search_positions(dl19, k)
            rows.append(
                (
                    f"seismic LV query_cut={query_cut} heap_factor={heap_factor} ({threads} threads)",
                    t,
                    recall(p, exact_dev),
                    recall(p19, ref_dl19[1]),
                    tie_aware_recall(p, ref_dev[0], dev, exact_docs_t),
                )
            )
        seismic_rows.append(f"seismic build {seismic_build:.1f} s")

    print(f"exact index build {exact_build:.2f} s" + (f"; {seismic_rows[0]}" if seismic_rows else "; seismic n/a"))
    print(f"top-{k} of the exact index == scipy brute force (ids and float32 scores) on all DL19 and dev queries: yes")
    print()
    load = os.getloadavg()[0]
    print(
        f"{len(dev)} dev-small queries, k={k}, best of {args.repeats} runs, {threads} cores, load average {load:.1f}"
    )
    print(
        f"| method | time (s) | QPS | speed-up vs scipy | recall@{k} vs exact (dev) | recall@{k} (DL19) | "
        f"tie-aware recall@{k} (dev) |"
    )
    print("|---|---|---|---|---|---|---|")

    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{v:.4f}"

    for label, t, r_dev, r_19, r_tie in rows:
        print(
            f"| {label} | {t:.3f} | {len(dev) / t:,.0f} | {t_scipy / t:.1f}× | {fmt(r_dev)} | {fmt(r_19)} | "
            f"{fmt(r_tie)} |"
        )


if __name__ == "__main__":
    main()
