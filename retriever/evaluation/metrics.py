"""Metrics of runs: query alignment, ranx metrics per protocol and paired significance tests.

Metrics are computed by ranx (``ranx.evaluate`` / ``ranx.compare``); this module decides *what* ranx sees:

* **Tie order.** trec_eval ranks a query's documents by score descending and breaks ties by document id
  descending (``strcmp``), ignoring the rank column. ranx sorts by score only, with an unstable argsort, so tied
  documents end up in an arbitrary order. Before handing a run to ranx we sort each query with the trec_eval key,
  cut it at the protocol's retrieval depth and replace the scores by a strictly decreasing, rank-consistent score
  (``n - position``). ranx then has no ties left to break and reproduces trec_eval's ranking exactly (the metrics
  used here depend on the ranking only, never on the score values).
* **Query alignment.** The evaluated query set is the qrels' query set. Judged queries that are absent from the
  run get an empty result list (they score 0 on every metric) and run queries without judgments are dropped; both
  are counted and logged as warnings, never dropped silently.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from retriever.errors import UserError
from retriever.evaluation.protocols import EvaluationProtocol, get_protocol
from retriever.trec import RunDict, trec_order

logger = logging.getLogger(__name__)

StatTest = Literal["student", "fisher", "tukey"]


class EvaluationError(UserError, ValueError):
    """A run and qrels that cannot be evaluated together: one is empty, or they share no query."""


@dataclass
class Alignment:
    """The run as ranx will see it, and what alignment changed."""

    run: RunDict  # trec_eval order, cut at depth, scores replaced by n - position; one entry per judged query
    missing_from_run: list[str] = field(default_factory=list)  # judged queries the run lacks (scored 0)
    without_qrels: list[str] = field(default_factory=list)  # run queries with no judgments (dropped)
    identical_ids_removed: int = 0  # documents equal to their query id (protocol option)

    @property
    def num_queries(self) -> int:
        return len(self.run)


def _validate_run(run: Mapping[str, Mapping[str, float]]) -> None:
    for qid, docs in run.items():
        if not isinstance(qid, str):
            raise TypeError(f"run query ids must be str, got {type(qid).__name__} {qid!r}")
        if not isinstance(docs, Mapping):
            raise TypeError(f"run[{qid!r}] must map docid -> score, got {type(docs).__name__}")


def align_run(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    depth: int | None = None,
    ignore_identical_ids: bool = False,
    run_name: str = "run",
) -> Alignment:
    """Put ``run`` on the qrels' query set with trec_eval tie order and rank-consistent scores (module docstring)."""
    _validate_run(run)
    if not qrels:
        raise EvaluationError("qrels are empty: nothing to evaluate against (check the qrels file or dataset id)")
    if not run:
        raise EvaluationError(f"{run_name} is empty: it has no queries")
    missing = sorted(q for q in qrels if q not in run)
    without = sorted(q for q in run if q not in qrels)
    if len(missing) == len(qrels):
        raise EvaluationError(
            f"no query of {run_name} has judgments ({len(run)} run queries, {len(qrels)} judged queries, e.g. "
            f"run {next(iter(run))!r} vs qrels {next(iter(qrels))!r}); check that the qrels match the run's query set"
        )
    removed = 0
    aligned: RunDict = {}
    for qid in qrels:
        docs = run.get(qid, {})
        if ignore_identical_ids and qid in docs:
            docs = {d: s for d, s in docs.items() if d != qid}
            removed += 1
        ranked = trec_order(docs)
        if depth is not None:
            ranked = ranked[:depth]
        n = len(ranked)
        aligned[qid] = {docid: float(n - position) for position, (docid, _) in enumerate(ranked)}
    if not any(aligned.values()):
        raise EvaluationError(f"{run_name} retrieved no document for any judged query")
    if missing:
        logger.warning(
            "%s: %d of %d judged queries are missing from the run and score 0 (e.g. %s)",
            run_name,
            len(missing),
            len(qrels),
            ", ".join(missing[:5]),
        )
    if without:
        logger.warning(
            "%s: %d run queries have no judgments and are dropped (e.g. %s)",
            run_name,
            len(without),
            ", ".join(without[:5]),
        )
    if removed:
        logger.warning("%s: removed %d documents whose id equals their query id", run_name, removed)
    return Alignment(aligned, missing, without, removed)


@contextmanager
def _quiet_numba() -> Iterator[None]:
    """ranx's JIT compilation warns about a harmless uint64 -> int64 hash cast; keep logs readable."""
    from numba.core.errors import NumbaTypeSafetyWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumbaTypeSafetyWarning)
        yield


def _ranx_qrels(qrels: Mapping[str, Mapping[str, int]]):  # -> ranx.Qrels (ranx imported lazily: numba start-up)
    import ranx

    for qid, docs in qrels.items():
        if not isinstance(qid, str):
            raise TypeError(f"qrels query ids must be str, got {type(qid).__name__} {qid!r}")
        if not docs:
            raise EvaluationError(f"qrels query {qid!r} has no judgments")
    return ranx.Qrels({q: {d: int(g) for d, g in docs.items()} for q, docs in qrels.items()})


@dataclass
class EvaluationResult:
    """Mean metrics (ranx names), per-query scores and the alignment counts of one evaluated run."""

    protocol: str
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]  # metric -> qid -> score
    num_queries: int  # judged queries averaged over (including the missing ones)
    missing_from_run: list[str]
    without_qrels: list[str]

    def summary(self) -> dict[str, object]:
        return {
            "protocol": self.protocol,
            "metrics": dict(self.metrics),
            "queries_evaluated": self.num_queries,
            "queries_missing_from_run": len(self.missing_from_run),
            "run_queries_without_qrels": len(self.without_qrels),
        }


def evaluate_detailed(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    protocol: str | EvaluationProtocol,
    metrics: Iterable[str] | None = None,
    run_name: str = "run",
) -> EvaluationResult:
    """Evaluate one run under a protocol (``metrics`` overrides the protocol's ranx metric names)."""
    import ranx

    proto = get_protocol(protocol)
    names = list(metrics) if metrics is not None else list(proto.metrics)
    alignment = align_run(run, qrels, proto.depth, proto.ignore_identical_ids, run_name)
    with _quiet_numba():
        ranx_qrels = _ranx_qrels(qrels)
        ranx_run = ranx.Run(alignment.run, name=run_name)
        means = ranx.evaluate(ranx_qrels, ranx_run, names, save_results_in_run=True)
    if len(names) == 1:  # ranx returns a bare number for a single metric
        means = {names[0]: means}
    return EvaluationResult(
        protocol=proto.name,
        metrics={m: float(means[m]) for m in names},
        per_query={m: {q: float(s) for q, s in ranx_run.scores[m].items()} for m in names},
        num_queries=alignment.num_queries,
        missing_from_run=alignment.missing_from_run,
        without_qrels=alignment.without_qrels,
    )


def evaluate_run(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    protocol: str | EvaluationProtocol,
    metrics: Iterable[str] | None = None,
) -> dict[str, float]:
    """Mean metrics of a run under a protocol, keyed by ranx metric name (e.g. ``ndcg@10``, ``mrr@10-l2``)."""
    return evaluate_detailed(run, qrels, protocol, metrics).metrics


# --------------------------------------------------------------------------------------------------------------
# Significance tests


def _comparison(report, a: str, b: str, metric: str, scores: dict[str, dict[str, float]]) -> dict[str, object]:
    """One row of `compare_runs`: runs ``a`` and ``b`` on ``metric`` in a ``ranx.compare`` report."""
    result = report.comparisons[a, b][metric]
    significant = bool(result["significant"])
    wtl = report.win_tie_loss[(a, b)][metric]
    diff = scores[a][metric] - scores[b][metric]
    return {
        "run_a": a,
        "run_b": b,
        "metric": metric,
        "mean_a": scores[a][metric],
        "mean_b": scores[b][metric],
        "difference": diff,
        "p_value": float(result["p_value"]),
        "significant": significant,
        "better": (a if diff > 0 else b if diff < 0 else None) if significant else None,
        "wins_a": int(wtl["W"]),
        "ties": int(wtl["T"]),
        "wins_b": int(wtl["L"]),
    }


def compare_runs(
    qrels: Mapping[str, Mapping[str, int]],
    runs: Mapping[str, Mapping[str, Mapping[str, float]]],
    metrics: Iterable[str] | None = None,
    test: StatTest = "student",
    max_p: float = 0.05,
    protocol: str | EvaluationProtocol | None = None,
    n_permutations: int = 1000,
    random_seed: int = 42,
) -> dict[str, object]:
    """Paired significance tests between runs with ``ranx.compare``, as a JSON-serialisable dict.

    Every run is aligned to the qrels like ``evaluate_run`` (trec_eval tie order, missing queries score 0), so the
    tests pair the same queries; ``protocol`` (optional) supplies the retrieval depth, the identical-id rule and,
    when ``metrics`` is None, the metrics. ``test`` is "student" (paired t-test), "fisher" (randomization test with
    ``n_permutations``) or "tukey" (Tukey's HSD over all runs). A difference is significant when p <= ``max_p``.
    ranx's Fisher p-value is a Monte-Carlo estimate drawn in numba worker threads that ``random_seed`` does not
    reach, so it varies slightly from call to call (about sqrt(p (1 - p) / n_permutations)); "student" and
    "tukey" are exact and reproducible.
    The result holds the mean scores, one row per (run pair, metric) with the p-value, whether it is significant and
    which run is better, and ranx's printable ``table``.
    """
    import ranx

    proto = get_protocol(protocol) if protocol is not None else None
    if metrics is not None:
        metric_names = list(metrics)
    elif proto is not None:
        metric_names = list(proto.metrics)
    else:
        raise ValueError("compare_runs needs metrics or a protocol to take them from")
    depth = proto.depth if proto is not None else None
    ignore_identical_ids = proto.ignore_identical_ids if proto is not None else False
    if len(runs) < 2:
        raise ValueError(f"compare_runs needs at least two runs, got {len(runs)}")
    if test not in ("student", "fisher", "tukey"):
        raise ValueError(f"unknown test {test!r}; use 'student', 'fisher' or 'tukey'")
    with _quiet_numba():
        ranx_qrels = _ranx_qrels(qrels)
        ranx_runs = [
            ranx.Run(align_run(run, qrels, depth, ignore_identical_ids, run_name=name).run, name=name)
            for name, run in runs.items()
        ]
        report = ranx.compare(
            ranx_qrels,
            ranx_runs,
            metric_names,
            stat_test=test,
            n_permutations=n_permutations,
            max_p=max_p,
            random_seed=random_seed,
            rounding_digits=4,
        )
    names = list(runs)
    scores = {n: {m: float(report.results[n][m]) for m in metric_names} for n in names}
    pairs = [
        _comparison(report, a, b, m, scores) for i, a in enumerate(names) for b in names[i + 1 :] for m in metric_names
    ]
    return {
        "test": test,
        "max_p": max_p,
        "metrics": metric_names,
        "runs": names,
        "protocol": proto.name if proto is not None else None,
        "num_queries": len(qrels),
        "scores": scores,
        "comparisons": pairs,
        "table": report.to_table(),
    }
