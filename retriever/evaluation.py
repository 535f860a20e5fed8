"""Retrieval evaluation: protocols, TREC run/qrels IO, query alignment, metrics and significance tests.

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

Runs and qrels are plain dicts: ``{qid: {docid: score}}`` and ``{qid: {docid: grade}}``.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, TypeVar

from retriever.data.sources import BEIR_13
from retriever.registry import Registry
from retriever.tracking import safe_metric_name

logger = logging.getLogger(__name__)

RunDict = dict[str, dict[str, float]]
QrelsDict = dict[str, dict[str, int]]
StatTest = Literal["student", "fisher", "tukey"]
_Value = TypeVar("_Value")


class TrecFormatError(ValueError):
    """A TREC run or qrels file (or an in-memory run/qrels) is malformed."""


# --------------------------------------------------------------------------------------------------------------
# Protocols


@dataclass(frozen=True)
class EvaluationProtocol:
    """How a benchmark is evaluated: ranx metric names, retrieval depth and default encoding lengths.

    ``datasets`` are the ir_datasets ids that use this protocol by default; an entry ending in ``/`` is a prefix.
    ``ignore_identical_ids`` drops documents whose id equals the query id before scoring (the official BEIR
    evaluation does this, which matters for ArguAna and Quora where queries are also corpus documents).
    """

    name: str
    metrics: tuple[str, ...]
    depth: int
    query_max_length: int
    passage_max_length: int
    datasets: tuple[str, ...] = ()
    ignore_identical_ids: bool = False
    description: str = ""

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]


PROTOCOLS: Registry[EvaluationProtocol] = Registry("evaluation protocol")

# The 13 public BEIR test sets averaged in the paper, as ir_datasets ids (Touché is BEIR's v2 of the qrels).
BEIR_13_DATASETS: tuple[str, ...] = tuple(BEIR_13.values())


# The MS MARCO passage benchmarks share the top-1000 depth and the paper's 64/192-token encoding lengths.
_MSMARCO = dict(depth=1000, query_max_length=64, passage_max_length=192)

for _protocol in (
    EvaluationProtocol(
        "msmarco-dev",
        ("mrr@10", "recall@1000"),
        **_MSMARCO,
        datasets=("msmarco-passage/dev/small",),
        description="MS MARCO passage dev/small: MRR@10 and Recall@1000 on the top-1000",
    ),
    # nDCG uses the graded labels; the binary metrics count grade >= 2 as relevant (TREC DL convention).
    EvaluationProtocol(
        "trec-dl",
        ("ndcg@10", "mrr@10-l2", "recall@1000-l2"),
        **_MSMARCO,
        datasets=("msmarco-passage/trec-dl-2019/judged", "msmarco-passage/trec-dl-2020/judged"),
        description="TREC DL 2019/2020 passage: nDCG@10 (graded), MRR@10 and Recall@1000 at relevance level 2",
    ),
    EvaluationProtocol(
        "synthetic",
        ("ndcg@10", "mrr@10", "recall@100"),
        depth=100,
        query_max_length=64,
        passage_max_length=128,
        datasets=("synthetic/",),
        description="the offline synthetic benchmark: nDCG@10 (graded), MRR@10 and Recall@100 on the top-100",
    ),
    EvaluationProtocol(
        "beir",
        ("ndcg@10", "recall@100"),
        depth=100,
        query_max_length=512,
        passage_max_length=512,
        datasets=("beir/",),
        ignore_identical_ids=True,
        description="BEIR: nDCG@10 and Recall@100 on the top-100, averaged over datasets with beir_mean",
    ),
):
    PROTOCOLS.add(_protocol.name, _protocol)


def get_protocol(protocol: str | EvaluationProtocol) -> EvaluationProtocol:
    """The protocol object for a name (unknown names fail with the list of known ones)."""
    return protocol if isinstance(protocol, EvaluationProtocol) else PROTOCOLS.get(protocol)


def protocol_for_dataset(dataset_id: str) -> EvaluationProtocol:
    """The default protocol of an ir_datasets id: exact ids first, then prefixes (``beir/...``)."""
    for _, protocol in PROTOCOLS.items():
        if dataset_id in protocol.datasets:
            return protocol
    for _, protocol in PROTOCOLS.items():
        if any(p.endswith("/") and dataset_id.startswith(p) for p in protocol.datasets):
            return protocol
    known = ", ".join(f"{p.name}: {', '.join(p.datasets)}" for _, p in PROTOCOLS.items())
    raise KeyError(f"no default evaluation protocol for dataset {dataset_id!r}; pass one explicitly ({known})")


def beir_mean(per_dataset: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over datasets (the BEIR summary number); every dataset must report the same metrics."""
    if not per_dataset:
        raise ValueError("beir_mean needs the metrics of at least one dataset")
    names = {name: set(metrics) for name, metrics in per_dataset.items()}
    first_name, first = next(iter(names.items()))
    for name, metrics in names.items():
        if metrics != first:
            raise ValueError(
                f"datasets report different metrics: {first_name!r} has {sorted(first)}, {name!r} has "
                f"{sorted(metrics)}; evaluate all datasets with the same protocol"
            )
    return {m: sum(float(per_dataset[d][m]) for d in per_dataset) / len(per_dataset) for m in per_dataset[first_name]}


# --------------------------------------------------------------------------------------------------------------
# TREC file IO


def _open_text(path: Path, mode: Literal["rt", "wt"]) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, mode, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def _numbered_lines(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, whitespace-split fields) for every non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with _open_text(path, "rt") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                fields = line.split()
                if fields:
                    yield lineno, fields
        except gzip.BadGzipFile as err:
            raise TrecFormatError(f"{path}: not a gzip file ({err}); drop the .gz suffix for plain text") from None
        except UnicodeDecodeError as err:
            raise TrecFormatError(
                f"{path}: not UTF-8 text ({err}); TREC files are plain text, optionally .gz"
            ) from None


def _read_trec_pairs(
    path: str | Path, columns: str, parse: Callable[[str, list[str]], _Value], duplicate: str, rule: str
) -> dict[str, dict[str, _Value]]:
    """``{qid: {docid: value}}`` of a TREC file whose lines hold the whitespace-separated ``columns``.

    The query id is the first column and the document id the third; ``parse(where, fields)`` turns a line into
    its value. A (query, document) pair may occur once: ``duplicate`` and ``rule`` word the error otherwise.
    """
    table: dict[str, dict[str, _Value]] = {}
    first_seen: dict[tuple[str, str], int] = {}
    expected = len(columns.split())
    for lineno, fields in _numbered_lines(path):
        where = f"{path}:{lineno}"
        if len(fields) != expected:
            raise TrecFormatError(
                f"{where}: expected {expected} whitespace-separated fields '{columns}', got {len(fields)}: "
                f"{' '.join(fields)!r}"
            )
        qid, docid = fields[0], fields[2]
        value = parse(where, fields)
        key = (qid, docid)
        if key in first_seen:
            raise TrecFormatError(
                f"{where}: {duplicate} {docid!r} for query {qid!r} (first at line {first_seen[key]}); "
                f"{rule} (query, document) pair once"
            )
        first_seen[key] = lineno
        table.setdefault(qid, {})[docid] = value
    return table


def _run_score(where: str, fields: list[str]) -> float:
    rank, score_text = fields[3], fields[4]
    try:
        int(rank)
    except ValueError:
        raise TrecFormatError(f"{where}: rank (field 4) must be an integer, got {rank!r}") from None
    try:
        score = float(score_text)
    except ValueError:
        raise TrecFormatError(f"{where}: score (field 5) must be a number, got {score_text!r}") from None
    if not math.isfinite(score):
        raise TrecFormatError(f"{where}: score (field 5) must be finite, got {score_text!r}")
    return score


def _qrels_grade(where: str, fields: list[str]) -> int:
    try:
        return int(fields[3])
    except ValueError:
        raise TrecFormatError(f"{where}: relevance grade (field 4) must be an integer, got {fields[3]!r}") from None


def read_run(path: str | Path) -> RunDict:
    """Read a TREC run (``qid Q0 docid rank score tag``, optionally gzipped).

    The rank column must be an integer but is not used: like trec_eval, the ranking comes from the scores.
    """
    return _read_trec_pairs(path, "qid Q0 docid rank score tag", _run_score, "duplicate document", "a run lists each")


def read_qrels(path: str | Path) -> QrelsDict:
    """Read TREC qrels (``qid iteration docid grade``, optionally gzipped); grades are integers."""
    return _read_trec_pairs(
        path, "qid 0 docid grade", _qrels_grade, "duplicate judgment of document", "qrels judge each"
    )


def qrels_from_ir_datasets(dataset_id: str) -> QrelsDict:
    """Qrels of an ir_datasets dataset (``ir_datasets.load(id).qrels_iter()``).

    Repeated identical judgments are merged (and counted in a warning); conflicting grades are an error.
    """
    import ir_datasets

    try:
        dataset = ir_datasets.load(dataset_id)
    except KeyError:
        raise KeyError(
            f"{dataset_id!r} is neither an existing qrels file nor a known ir_datasets id "
            "(see https://ir-datasets.com for ids)"
        ) from None
    if not dataset.has_qrels():
        raise ValueError(f"ir_datasets dataset {dataset_id!r} has no qrels; pick a split with judgments")
    qrels: QrelsDict = {}
    repeated = 0
    try:
        for qrel in dataset.qrels_iter():
            docs = qrels.setdefault(str(qrel.query_id), {})
            docid, grade = str(qrel.doc_id), int(qrel.relevance)
            if docid in docs:
                if docs[docid] != grade:
                    raise TrecFormatError(
                        f"{dataset_id}: document {docid!r} of query {qrel.query_id!r} is judged both "
                        f"{docs[docid]} and {grade}"
                    )
                repeated += 1
            docs[docid] = grade
    except RuntimeError as err:
        raise RuntimeError(
            f"could not read the qrels of ir_datasets id {dataset_id!r} ({err}); when offline, place the files "
            "under IR_DATASETS_HOME or pass a TREC qrels file instead"
        ) from err
    if repeated:
        logger.warning("%s: %d repeated identical judgments merged", dataset_id, repeated)
    return qrels


def load_qrels(qrels_or_dataset_id: str | Path) -> QrelsDict:
    """Qrels from a TREC qrels file when the argument is an existing file, otherwise from an ir_datasets id."""
    if Path(qrels_or_dataset_id).is_file():
        return read_qrels(qrels_or_dataset_id)
    return qrels_from_ir_datasets(str(qrels_or_dataset_id))


def trec_order(docs: Mapping[str, float]) -> list[tuple[str, float]]:
    """A query's (docid, score) pairs in trec_eval order: score descending, then docid descending."""
    bad = [d for d, s in docs.items() if not math.isfinite(s)]
    if bad:
        raise TrecFormatError(f"non-finite scores for documents {bad[:5]}; scores must be finite numbers")
    # Python's sort is stable, also with reverse=True: sort by the secondary key first, then the primary one.
    # str comparison is by code point, which matches strcmp on UTF-8 bytes.
    by_docid = sorted(docs.items(), key=lambda item: item[0], reverse=True)
    return sorted(by_docid, key=lambda item: item[1], reverse=True)


def _check_ids(value: str, what: str) -> None:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise TrecFormatError(f"{what} {value!r} must be a non-empty string without whitespace for a TREC file")


def write_run(run: Mapping[str, Mapping[str, float]], path: str | Path, tag: str, depth: int | None = None) -> None:
    """Write a TREC run (gzipped when ``path`` ends in .gz); ranks follow trec_eval's order (see ``trec_order``).

    Queries are written in sorted id order; ``depth`` keeps only the top ``depth`` documents of each query.
    """
    _check_ids(tag, "run tag")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open_text(path, "wt") as f:
        for qid in sorted(run):
            _check_ids(qid, "query id")
            ranked = trec_order(run[qid])
            for rank, (docid, score) in enumerate(ranked[:depth] if depth else ranked, start=1):
                _check_ids(docid, f"document id (query {qid!r})")
                f.write(f"{qid} Q0 {docid} {rank} {float(score)!r} {tag}\n")


# --------------------------------------------------------------------------------------------------------------
# Alignment and metrics


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
        raise ValueError("qrels are empty: nothing to evaluate against")
    if not run:
        raise ValueError(f"{run_name} is empty: it has no queries")
    missing = sorted(q for q in qrels if q not in run)
    without = sorted(q for q in run if q not in qrels)
    if len(missing) == len(qrels):
        raise ValueError(
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
        raise ValueError(f"{run_name} retrieved no document for any judged query")
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
            raise ValueError(f"qrels query {qid!r} has no judgments")
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


def mlflow_metric_name(metric: str) -> str:
    """An MLflow-safe metric name: ``ndcg@10`` -> ``ndcg_at_10``, ``mrr@10-l2`` -> ``mrr_at_10_l2``."""
    return safe_metric_name(metric)


def mlflow_metrics(metrics: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """Metrics renamed for ``mlflow.log_metrics``; ``prefix`` (e.g. a dataset id and ``/``) is prepended as is."""
    return {f"{prefix}{mlflow_metric_name(m)}": float(v) for m, v in metrics.items()}


# --------------------------------------------------------------------------------------------------------------
# Significance tests


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
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for m in metric_names:
                result = report.comparisons[a, b][m]
                p_value = float(result["p_value"])
                significant = bool(result["significant"])
                wtl = report.win_tie_loss[(a, b)][m]
                diff = scores[a][m] - scores[b][m]
                pairs.append(
                    {
                        "run_a": a,
                        "run_b": b,
                        "metric": m,
                        "mean_a": scores[a][m],
                        "mean_b": scores[b][m],
                        "difference": diff,
                        "p_value": p_value,
                        "significant": significant,
                        "better": (a if diff > 0 else b if diff < 0 else None) if significant else None,
                        "wins_a": int(wtl["W"]),
                        "ties": int(wtl["T"]),
                        "wins_b": int(wtl["L"]),
                    }
                )
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


# --------------------------------------------------------------------------------------------------------------
# CLI entry point


def evaluate_command(
    run_path: str | Path,
    qrels_or_dataset_id: str | Path,
    protocol: str | None = None,
    as_json: bool = False,
    out: IO[str] | None = None,
) -> dict[str, object]:
    """``retriever evaluate``: evaluate a TREC run file against a qrels file or an ir_datasets id.

    ``protocol`` defaults to the dataset's protocol (``protocol_for_dataset``), which needs an ir_datasets id.
    Prints the result to ``out`` (stdout by default) as JSON or as aligned text and returns it as a dict.
    """
    source = str(qrels_or_dataset_id)
    is_file = Path(source).is_file()
    if protocol is None:
        if is_file:
            raise ValueError(
                f"{source} is a qrels file, so the protocol cannot be inferred; pass one of: {', '.join(PROTOCOLS)}"
            )
        protocol = protocol_for_dataset(source).name
    proto = get_protocol(protocol)
    qrels = read_qrels(source) if is_file else qrels_from_ir_datasets(source)
    result = evaluate_detailed(read_run(run_path), qrels, proto, run_name=str(run_path))
    summary = {"run": str(run_path), "qrels": source, **result.summary()}
    stream = out if out is not None else sys.stdout
    if as_json:
        stream.write(json.dumps(summary, indent=2) + "\n")
    else:
        stream.write(format_summary(summary))
    return summary


def format_summary(summary: Mapping[str, object]) -> str:
    """Human-readable text of an ``evaluate_command`` result."""
    metrics: Mapping[str, float] = summary["metrics"]  # type: ignore[assignment]
    width = max(len(m) for m in metrics)
    lines = [f"run: {summary['run']}", f"qrels: {summary['qrels']}", f"protocol: {summary['protocol']}"]
    lines += [f"  {m:<{width}}  {float(v):.4f}" for m, v in metrics.items()]
    lines.append(
        f"queries evaluated: {summary['queries_evaluated']} (missing from run, scored 0: "
        f"{summary['queries_missing_from_run']}; run queries without qrels, dropped: "
        f"{summary['run_queries_without_qrels']})"
    )
    return "\n".join(lines) + "\n"


__all__ = [
    "BEIR_13_DATASETS",
    "PROTOCOLS",
    "Alignment",
    "EvaluationProtocol",
    "EvaluationResult",
    "QrelsDict",
    "RunDict",
    "TrecFormatError",
    "align_run",
    "beir_mean",
    "compare_runs",
    "evaluate_command",
    "evaluate_detailed",
    "evaluate_run",
    "format_summary",
    "get_protocol",
    "load_qrels",
    "mlflow_metric_name",
    "mlflow_metrics",
    "protocol_for_dataset",
    "qrels_from_ir_datasets",
    "read_qrels",
    "read_run",
    "trec_order",
    "write_run",
]
