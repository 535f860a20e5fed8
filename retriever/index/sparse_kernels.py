"""Exact sparse search kernels: CSC posting lists (term offsets, doc indices, weights) searched term-at-a-time
with numba.

Scores are ``sum_t q_t * d_t`` accumulated in float32 in ascending term order, the order of scipy's CSR product,
so they match ``(Q @ D.T)`` bit for bit. Only documents sharing at least one term with the query are returned.
Ties are broken by the smaller index id (= smaller doc id, see ``retriever.index.base``).

When every weight is non-negative (learned sparse vectors are), the search skips work that cannot change the
top-k (a MaxScore-style bound; results are identical): query terms are processed in decreasing order of their
largest possible contribution ``q_t * max_d d_t``; once the contributions left to process cannot lift an unseen
document above the current k-th partial score, the remaining (usually long, low-weight) posting lists are not
scanned: the exact score of each remaining candidate is completed by galloping search in them. This is used for
k <= 64 (for larger k the k-th score is too low for the bound to skip enough work), and a query falls back to the
exhaustive scan when completing its candidates would cost more (dense-like vectors, where most documents share terms).
A query with more postings than ``DENSE_LIKE`` times the documents is searched exhaustively from the start, marking
documents without a branch per posting.

Per search thread the index needs ``21 * n_docs`` bytes of scratch (score accumulators, flags, candidate lists).
A search runs without the GIL, so a server's event loop and other Python threads go on meanwhile.
"""

from __future__ import annotations

import contextlib
import threading

import numba
import numpy as np

from retriever.encoding.batches import SparseBatch

# Relative slack on the pruning bounds: the bounds are float64 sums in another order than the float32 scores, so a
# document is only skipped when it is short of the k-th score by more than any rounding difference.
_BOUND_SLACK = 1e-4
_F32_EPS = 2.0**-24


# --------------------------------------------------------------------------------------------------------------
# Top-k heap keyed by (score descending, index ascending); the root is the worst kept hit.


@numba.njit(cache=True, inline="always")
def _worse(s1: float, p1: int, s2: float, p2: int) -> bool:
    return s1 < s2 or (s1 == s2 and p1 > p2)


@numba.njit(cache=True)
def _sift_down(hs: np.ndarray, hp: np.ndarray, i: int, size: int) -> None:
    while True:
        left = 2 * i + 1
        worst = i
        if left < size and _worse(hs[left], hp[left], hs[worst], hp[worst]):
            worst = left
        if left + 1 < size and _worse(hs[left + 1], hp[left + 1], hs[worst], hp[worst]):
            worst = left + 1
        if worst == i:
            return
        hs[i], hs[worst] = hs[worst], hs[i]
        hp[i], hp[worst] = hp[worst], hp[i]
        i = worst


@numba.njit(cache=True)
def _heap_offer(hs: np.ndarray, hp: np.ndarray, size: int, k: int, s: float, p: int) -> int:
    if size < k:
        i = size
        hs[i] = s
        hp[i] = p
        while i > 0:
            parent = (i - 1) // 2
            if _worse(hs[i], hp[i], hs[parent], hp[parent]):
                hs[i], hs[parent] = hs[parent], hs[i]
                hp[i], hp[parent] = hp[parent], hp[i]
                i = parent
            else:
                break
        return size + 1
    if _worse(hs[0], hp[0], s, p):
        hs[0] = s
        hp[0] = p
        _sift_down(hs, hp, 0, size)
    return size


@numba.njit(cache=True)
def _heap_drain(hs: np.ndarray, hp: np.ndarray, size: int, out_s: np.ndarray, out_p: np.ndarray) -> None:
    """Write the heap best-first into out_s/out_p (popping the worst into the last free slot)."""
    for j in range(size - 1, -1, -1):
        out_s[j] = hs[0]
        out_p[j] = hp[0]
        hs[0] = hs[j]
        hp[0] = hp[j]
        _sift_down(hs, hp, 0, j)


_HEAP_MAX_K = 16  # up to this k a heap with an inline reject test is fastest; above, select by sort keys
PRUNE_MAX_K = 64  # above this k the k-th score is too low for the bound to skip enough work: search exhaustively
DENSE_LIKE = 4  # postings per document above which a query is searched exhaustively (see `_search_batch`)
THREADSAFE_LAYERS = ("omp", "tbb")  # Numba's `workqueue` layer aborts the process when launched from two threads
_LAUNCH_LOCK = threading.Lock()
_SIGN = np.uint32(0x80000000)
_LOW32 = np.uint64(0xFFFFFFFF)


@numba.njit(cache=True, inline="always")
def _rank_key(bits: np.ndarray, d: int) -> np.uint64:
    """A uint64 whose ascending order is (score descending, index ascending): the float32 score's bits made
    order-preserving as an unsigned int (-0.0 counted as +0.0) and inverted, then the index in the low half."""
    b = bits[d]
    if b == _SIGN:
        b = np.uint32(0)
    ascending = b ^ _SIGN if b < _SIGN else ~b
    return (np.uint64(~ascending) << np.uint64(32)) | np.uint64(d)


@numba.njit(cache=True)
def _radix_sort(a: np.ndarray, buf: np.ndarray) -> None:
    """Sort uint64 ``a`` in place: LSD radix, 8-bit digits, digits that never vary skipped; ``buf`` is scratch of at
    least ``len(a)``. (numba's own sort is several times slower on these keys.)"""
    n = a.shape[0]
    if n < 2:
        return
    varying = np.uint64(0)
    for i in range(n):
        varying |= a[i] ^ a[0]
    counts = np.empty(256, dtype=np.int64)
    src = a
    dst = buf[:n]
    swapped = False
    for shift in range(0, 64, 8):
        if (varying >> np.uint64(shift)) & np.uint64(255) == 0:
            continue
        counts[:] = 0
        for i in range(n):
            counts[(src[i] >> np.uint64(shift)) & np.uint64(255)] += 1
        total = 0
        for digit in range(256):
            c = counts[digit]
            counts[digit] = total
            total += c
        for i in range(n):
            key = src[i]
            digit = (key >> np.uint64(shift)) & np.uint64(255)
            dst[counts[digit]] = key
            counts[digit] += 1
        src, dst = dst, src
        swapped = not swapped
    if swapped:
        a[:] = src


@numba.njit(cache=True)
def _select(acc, ids, count, k, hs, hp, keys, buf, out_s, out_p) -> None:
    """Write the top-k of the documents ``ids[:count]`` with scores ``acc[d]`` into out_s/out_p, best first, ties by
    the smaller index. ``keys`` (uint64 scratch, all zero, at least ``count`` long) is left all zero; ``buf`` is
    uint64 scratch for the sort."""
    if k <= _HEAP_MAX_K:
        size = 0
        for i in range(count):
            d = ids[i]
            s = acc[d]
            # Most documents lose against the worst kept hit: test inline, call only to insert (calls are costly).
            if size < k or _worse(hs[0], hp[0], s, d):
                size = _heap_offer(hs, hp, size, k, s, d)
        _heap_drain(hs, hp, size, out_s, out_p)
        return
    # Large k: a strided sample of the scores sets a cut expected to keep ~1.3k documents (lowered until at least
    # k pass, raised while far too many do; a cut on a crowd of tied scores is made strict when enough documents
    # lie strictly above it). Every document scoring at least the k-th score survives, ties included; only the
    # survivors' keys are sorted.
    if count == 0:
        return
    bits = acc.view(np.uint32)
    sample_size = min(count, 256)
    step = max(1, count // sample_size)
    sample = np.empty(sample_size, dtype=np.uint64)
    for i in range(sample_size):
        sample[i] = _rank_key(bits, ids[i * step])
    _radix_sort(sample, buf)  # best first
    rank = min(sample_size - 1, (13 * k * sample_size) // (10 * count) + 4)
    if count <= 2 * k:
        rank = sample_size - 1  # few enough to sort them all
    limit = 4 * k + 1024
    lowered = False  # once the cut had to come down, it never goes back up (that could cycle)
    while True:
        cut = -np.inf if rank >= sample_size - 1 else acc[np.int64(sample[rank] & _LOW32)]
        kept = 0
        above = 0
        for i in range(count):
            d = ids[i]
            s = acc[d]
            if s >= cut:
                above += s > cut
                keys[kept] = _rank_key(bits, d)
                kept += 1
        if kept < k and cut > -np.inf:
            rank = min(sample_size - 1, 2 * rank + 8)
            lowered = True
            keys[:kept] = 0
            continue
        if above >= k and kept > above:  # enough strictly above: drop the crowd tied at the cut
            strict = 0
            for i in range(kept):
                key = keys[i]
                if acc[np.int64(key & _LOW32)] > cut:
                    keys[strict] = key
                    strict += 1
            keys[strict:kept] = 0
            kept = strict
        if kept > limit and rank > 0 and not lowered:
            keys[:kept] = 0
            rank //= 2
            continue
        break
    chosen = keys[:kept]
    _radix_sort(chosen, buf if buf.shape[0] >= kept else np.empty(kept, dtype=np.uint64))
    for j in range(min(k, kept)):
        d = np.int64(chosen[j] & _LOW32)
        out_s[j] = acc[d]
        out_p[j] = d
    keys[:kept] = 0


# --------------------------------------------------------------------------------------------------------------
# Per-query search


@numba.njit(cache=True, inline="always")
def _scan_postings(offsets, docs, weights, t, w, acc, flag, touched, m) -> int:
    """Add ``w`` x term ``t``'s posting list to ``acc`` (in ``acc``'s precision: ``w`` float32 keeps float32,
    float64 widens), appending each document seen for the first time to ``touched[m:]``; returns the new count."""
    for p in range(offsets[t], offsets[t + 1]):
        d = docs[p]
        if flag[d] == 0:
            flag[d] = 1
            touched[m] = d
            m += 1
        acc[d] += w * weights[p]
    return m


@numba.njit(cache=True, inline="always")
def _clear(acc, flag, touched, m) -> None:
    """Reset the scratch of the documents ``touched[:m]`` (cheaper than clearing whole arrays per query)."""
    for r in range(m):
        acc[touched[r]] = 0.0
        flag[touched[r]] = 0


@numba.njit(cache=True)
def _query_exhaustive(offsets, docs, weights, qt, qw, acc, flag, touched, hs, hp, keys, buf, k, out_s, out_p, work):
    m = 0
    if work >= acc.shape[0]:
        # As many postings as documents or more (dense-like vectors): most documents are hit, often several times,
        # so marking them unconditionally and listing the marked ones afterwards beats a branch per posting.
        for j in range(qt.shape[0]):
            t = qt[j]
            w = qw[j]
            for p in range(offsets[t], offsets[t + 1]):
                d = docs[p]
                acc[d] += w * weights[p]
                flag[d] = 1
        for d in range(acc.shape[0]):
            if flag[d]:
                touched[m] = d
                m += 1
    else:
        for j in range(qt.shape[0]):
            m = _scan_postings(offsets, docs, weights, qt[j], qw[j], acc, flag, touched, m)
    _select(acc, touched, m, k, hs, hp, keys, buf, out_s, out_p)
    _clear(acc, flag, touched, m)


@numba.njit(cache=True, inline="always")
def _gallop(a: np.ndarray, lo: int, hi: int, x: int) -> int:
    """Smallest p in [lo, hi] with p == hi or a[p] >= x, for ascending a; fast when the answer is near lo."""
    if lo >= hi or a[lo] >= x:
        return lo
    below = lo  # a[below] < x
    step = 1
    probe = lo + 1
    while probe < hi and a[probe] < x:
        below = probe
        step *= 2
        probe = below + step
    left = below + 1
    right = min(probe, hi)
    while left < right:
        mid = (left + right) >> 1
        if a[mid] < x:
            left = mid + 1
        else:
            right = mid
    return left


@numba.njit(cache=True)
def _gallop_steps(offsets, qt, terms, count, spread) -> float:
    """Steps of ``count`` gallops into each posting list ``qt[terms]``: about 2 log2(gap) + 1, the gap being a list's
    length over ``spread`` (the sorted candidates advance together) or the whole length (each gallop from the
    start)."""
    steps = 0.0
    for j in terms:
        length = offsets[qt[j] + 1] - offsets[qt[j]]
        steps += count * (2.0 * np.log2(length / max(spread, 1) + 1.0) + 1.0)
    return steps


@numba.njit(cache=True)
def _kth_largest(acc64: np.ndarray, items: np.ndarray, count: int, k: int, scratch: np.ndarray) -> float:
    """The k-th largest of acc64[items[:count]] (count >= k), by a size-k min-heap in scratch (no allocation)."""
    size = 0
    for r in range(count):
        v = acc64[items[r]]
        if size < k:
            i = size
            size += 1
            while i > 0:
                parent = (i - 1) >> 1
                if v < scratch[parent]:
                    scratch[i] = scratch[parent]
                    i = parent
                else:
                    break
            scratch[i] = v
        elif v > scratch[0]:
            i = 0
            while True:
                child = 2 * i + 1
                if child >= k:
                    break
                if child + 1 < k and scratch[child + 1] < scratch[child]:
                    child += 1
                if scratch[child] < v:
                    scratch[i] = scratch[child]
                    i = child
                else:
                    break
            scratch[i] = v
    return scratch[0]


@numba.njit(cache=True)
def _query_pruned(
    offsets,
    docs,
    weights,
    term_max,
    qt,
    qw,
    acc,
    acc64,
    flag,
    touched,
    cand,
    scratch,
    hs,
    hp,
    buf,
    k,
    out_s,
    out_p,
    total_work,
) -> bool:
    """Exact top-k with bound-based skipping (non-negative weights only; ``total_work``: the postings of the query's
    terms). Returns False, having written nothing, when skipping would not pay off; the caller then runs the
    exhaustive search.

    Phase 1 accumulates whole posting lists (float64), largest bound first, until the bound on what the remaining
    terms can add is below the k-th partial score theta: no unseen document can reach the top-k. Phase 2 completes
    the surviving candidates term by term with galloping search in the remaining (long) lists, dropping those that
    can no longer reach theta. Phase 3 rescores the few finalists in float32 in ascending term order (the exhaustive
    path's arithmetic, so scores are bit-identical) and keeps the top k.
    """
    n = qt.shape[0]
    ub = np.empty(n, dtype=np.float64)
    for j in range(n):
        ub[j] = np.float64(qw[j]) * np.float64(term_max[qt[j]])
    order = np.argsort(-ub)
    suffix = np.zeros(n + 1, dtype=np.float64)  # suffix[i]: bound on what terms order[i:] can still add
    for i in range(n - 1, -1, -1):
        suffix[i] = suffix[i + 1] + ub[order[i]]
    slack = 1.0 - (_BOUND_SLACK + 4.0 * n * _F32_EPS)

    # Phase 1
    m = 0
    theta = -np.inf
    work = 0
    since = 0
    stop = -1
    for i in range(n - 1):  # stopping before the last term is the only way to save work
        t = qt[order[i]]
        m = _scan_postings(offsets, docs, weights, t, np.float64(qw[order[i]]), acc64, flag, touched, m)
        length = offsets[t + 1] - offsets[t]
        work += length
        since += length
        if m >= k:
            rem = suffix[i + 1]
            # Recompute the k-th partial score only after as much posting work as it costs (amortised).
            if not rem < theta * slack and since >= m:
                theta = _kth_largest(acc64, touched, m, k, scratch)
                since = 0
                # Documents that can still reach theta: each costs at least one step per remaining term to
                # complete. Far more than the exhaustive search costs: stop trying (dense-like sparse vectors).
                alive = 0
                for r in range(m):
                    if acc64[touched[r]] + rem >= theta * slack:
                        alive += 1
                if alive * (n - i - 1) > 2 * total_work:
                    break
            if rem < theta * slack:
                stop = i + 1
                break
        if 2 * work > total_work:
            break  # most postings are scanned already: finishing exhaustively is cheaper
    if stop < 0:
        _clear(acc64, flag, touched, m)
        return False

    # Phase 2
    theta = _kth_largest(acc64, touched, m, k, scratch)  # a stale theta would let in needless candidates
    c = 0
    rem = suffix[stop]
    for r in range(m):
        d = touched[r]
        if acc64[d] + rem >= theta * slack:
            cand[c] = d
            c += 1
    # Completing the candidates costs a gallop per candidate and remaining term, then one per candidate and term to
    # rescore; the exhaustive search costs one step per posting. On indexes where most documents share terms with
    # the query (dense-like sparse vectors) the candidates are too many to pay.
    if _gallop_steps(offsets, qt, order[stop:], c, c) > total_work:
        _clear(acc64, flag, touched, m)
        return False
    cand[:c].sort()  # ascending, for galloping through the posting lists
    for i in range(stop, n):
        t = qt[order[i]]
        w = np.float64(qw[order[i]])
        hi = offsets[t + 1]
        pos = offsets[t]
        for r in range(c):
            d = cand[r]
            pos = _gallop(docs, pos, hi, d)
            if pos < hi and docs[pos] == d:
                acc64[d] += w * np.float64(weights[pos])
        rem = suffix[i + 1]
        if c > k:
            theta = max(theta, _kth_largest(acc64, cand, c, k, scratch))
        kept = 0
        for r in range(c):
            d = cand[r]
            if acc64[d] + rem >= theta * slack:
                cand[kept] = d
                kept += 1
        c = kept

    # Phase 3
    if _gallop_steps(offsets, qt, order, c, 1) > total_work:
        _clear(acc64, flag, touched, m)
        return False
    for r in range(c):
        d = cand[r]
        s = np.float32(0.0)
        for j in range(n):
            t = qt[j]
            lo = offsets[t]
            hi = offsets[t + 1]
            pos = _gallop(docs, lo, hi, d)
            if pos < hi and docs[pos] == d:
                s += qw[j] * weights[pos]
        acc[d] = s
    _clear(acc64, flag, touched, m)
    _select(acc, cand, c, k, hs, hp, acc64.view(np.uint64), buf, out_s, out_p)  # acc64 is all zero again: scratch
    for r in range(c):
        acc[cand[r]] = 0.0
    return True


def _launch_guard() -> contextlib.AbstractContextManager[object]:
    """Nothing where Numba's threading layer is threadsafe, else a lock, so searches from several threads (a
    server's `asyncio.to_thread`) take turns there instead of aborting the process."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel launch yet: the first one picks the layer
        return _LAUNCH_LOCK
    return contextlib.nullcontext() if layer in THREADSAFE_LAYERS else _LAUNCH_LOCK


@numba.njit(parallel=True, cache=True, nogil=True)
def _search_batch(
    offsets, docs, weights, term_max, n_docs, prunable, q_indptr, q_indices, q_weights, threads, out_s, out_p, skipped
):
    nq = q_indptr.shape[0] - 1
    k = out_s.shape[1]
    blocks = min(threads, nq)
    for b in numba.prange(blocks):
        # Per-thread scratch, reset after every query by walking only the touched documents.
        acc = np.zeros(n_docs, dtype=np.float32)
        acc64 = np.zeros(n_docs, dtype=np.float64)  # pruning partial sums; also the selection's key scratch
        cand = np.empty(n_docs if prunable else 0, dtype=np.int32)
        scratch = np.empty(k, dtype=np.float64)  # the k-th-largest heap
        flag = np.zeros(n_docs, dtype=np.uint8)
        touched = np.empty(n_docs, dtype=np.int32)
        hs = np.empty(k, dtype=np.float32)
        hp = np.empty(k, dtype=np.int64)
        buf = np.empty(0 if k <= _HEAP_MAX_K else min(n_docs, 4 * k + 1024), dtype=np.uint64)  # sort scratch
        for q in range(b, nq, blocks):
            qt = q_indices[q_indptr[q] : q_indptr[q + 1]]
            qw = q_weights[q_indptr[q] : q_indptr[q + 1]]
            work = 0
            for j in range(qt.shape[0]):
                work += offsets[qt[j] + 1] - offsets[qt[j]]
            done = False
            # A query whose postings outnumber the documents DENSE_LIKE times over shares terms with most of them:
            # bounds cannot skip whole lists there, and trying costs up to half of the exhaustive scan.
            if prunable and qt.shape[0] > 1 and work <= DENSE_LIKE * n_docs and qw.min() > 0:
                done = _query_pruned(
                    offsets,
                    docs,
                    weights,
                    term_max,
                    qt,
                    qw,
                    acc,
                    acc64,
                    flag,
                    touched,
                    cand,
                    scratch,
                    hs,
                    hp,
                    buf,
                    k,
                    out_s[q],
                    out_p[q],
                    work,
                )
            skipped[q] = done
            if not done:
                keys = acc64.view(np.uint64)
                _query_exhaustive(
                    offsets, docs, weights, qt, qw, acc, flag, touched, hs, hp, keys, buf, k, out_s[q], out_p[q], work
                )


def search_inverted(
    offsets: np.ndarray,
    docs: np.ndarray,
    weights: np.ndarray,
    n_docs: int,
    queries: SparseBatch,
    k: int,
    *,
    term_max: np.ndarray | None = None,
    nonnegative: bool | None = None,
    dynamic_pruning: bool = True,
    skipped: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over posting lists (see the module docstring): (scores float32 [nq, k], index ids int64 [nq, k]).
    ``term_max`` (largest weight per term, needed for pruning) and ``nonnegative`` (no weight below zero, the
    condition for pruning) are computed when not given. ``skipped``, a bool array of ``nq`` entries when given, is
    set where a query's search skipped posting lists."""
    nq = len(queries)
    k = max(1, min(k, n_docs))
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_p = np.full((nq, k), -1, dtype=np.int64)
    if skipped is None:
        skipped = np.zeros(nq, dtype=np.bool_)
    if nq == 0 or n_docs == 0:
        return out_s, out_p
    if nonnegative is None:
        nonnegative = weights.size == 0 or float(weights.min()) >= 0.0
    prunable = bool(dynamic_pruning) and k <= PRUNE_MAX_K and nonnegative
    if prunable and term_max is None:
        term_max = term_maxima(offsets, weights)
    if term_max is None:
        term_max = np.zeros(0, dtype=np.float32)
    with _launch_guard():
        _search_batch(
            offsets,
            docs,
            weights,
            term_max,
            n_docs,
            prunable,
            queries.indptr,
            queries.indices,
            queries.weights,
            numba.get_num_threads(),
            out_s,
            out_p,
            skipped,
        )
    return out_s, out_p


def term_maxima(offsets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Largest weight of each term's postings (0 for empty terms)."""
    out = np.zeros(offsets.shape[0] - 1, dtype=np.float32)
    nonempty = np.flatnonzero(np.diff(offsets) > 0)
    if nonempty.size:
        out[nonempty] = np.maximum.reduceat(weights, offsets[nonempty])
    return out


def invert(batch: SparseBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR documents → CSC posting lists (term offsets int64, doc indices int32 ascending per term, weights)."""
    csc = batch.to_scipy().tocsc()  # scipy's csr→csc keeps row (document) order within each column
    return csc.indptr.astype(np.int64), csc.indices.astype(np.int32), csc.data.astype(np.float32, copy=False)
