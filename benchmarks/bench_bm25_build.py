"""Building a BM25 index: `retriever.bm25.Bm25Index` (token ids streamed into int32 chunks, the score matrix computed
with numpy) next to ``bm25s.BM25.index`` on Python lists of token ids (what a user of bm25s writes, and what this
project did before). Both give the same matrix bit for bit (tests/unit/test_bm25.py).

Corpus: generated passages of 30-60 Zipf-distributed made-up words (``--passages``, default 500,000, vocabulary
200,000 words), produced lazily by a generator inside each measured process, so the texts themselves are never held.
Each method runs in its own process, one thread (both are single-threaded Python + numpy); reported: wall time of the
build and the peak RSS of the process (``ru_maxrss``) above its RSS before the build.

Run from the repository root:  PYTHONPATH=. python benchmarks/bench_bm25_build.py  (about 3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np

METHODS = ("retriever", "bm25s-lists")


def passages(count: int, vocabulary: int, seed: int = 0) -> Iterator[tuple[str, str]]:
    """``count`` (id, text) pairs of 30-60 Zipf-distributed words from ``vocabulary`` made-up words."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(vocabulary)])
    for start in range(0, count, 10_000):
        n = min(10_000, count - start)
        lengths = rng.integers(30, 61, size=n)
        ranks = np.minimum(rng.zipf(1.1, size=int(lengths.sum())), vocabulary) - 1
        at = 0
        for i, length in enumerate(lengths.tolist()):
            yield f"p{start + i}", " ".join(words[ranks[at : at + length]].tolist())
            at += length


def measure(method: str, count: int, vocabulary: int) -> dict[str, float]:
    """Build once with ``method`` in this process; wall seconds and peak RSS growth in GiB."""
    import bm25s

    from retriever.bm25 import K1, B, Bm25Index, tokenize

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    if method == "retriever":
        index = Bm25Index(passages(count, vocabulary))
        nnz = index._model.scores["data"].size
    else:
        vocab: dict[str, int] = {}
        token_ids = [
            [vocab.setdefault(t, len(vocab)) for t in tokenize(text)] for _, text in passages(count, vocabulary)
        ]
        model = bm25s.BM25(k1=K1, b=B, method="lucene", dtype="float32")
        model.index((token_ids, vocab), show_progress=False)
        nnz = model.scores["data"].size
    wall = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"wall_s": wall, "peak_gib": (peak - before) / 2**20, "nnz": nnz}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=500_000)
    parser.add_argument("--vocabulary", type=int, default=200_000)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # one measurement, in a child process
    args = parser.parse_args()
    if args.method:
        print(json.dumps(measure(args.method, args.passages, args.vocabulary)))
        return 0
    print(
        f"{args.passages:,} passages of 30-60 words, vocabulary {args.vocabulary:,}; one process per method, 1 thread"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    rows = {}
    for method in METHODS:
        command = [sys.executable, __file__, "--method", method, "--passages", str(args.passages)]
        command += ["--vocabulary", str(args.vocabulary)]
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        rows[method] = json.loads(out.strip().splitlines()[-1])
        print(
            f"{method:<12} {rows[method]['wall_s']:7.1f} s  peak RSS +{rows[method]['peak_gib']:.2f} GiB", flush=True
        )
    print("\n| build | wall s | peak RSS growth GiB | matrix entries |\n|---|---:|---:|---:|")
    for method, r in rows.items():
        print(f"| {method} | {r['wall_s']:.1f} | {r['peak_gib']:.2f} | {r['nnz']:,} |")
    ours, theirs = rows["retriever"], rows["bm25s-lists"]
    print(
        f"\nretriever: {theirs['wall_s'] / ours['wall_s']:.1f}x faster, "
        f"{theirs['peak_gib'] / max(ours['peak_gib'], 1e-9):.1f}x less peak memory growth"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
