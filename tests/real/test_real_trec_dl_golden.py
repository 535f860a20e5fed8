"""Golden check: the published TREC DL 2019 runs reproduce trec_eval's nDCG@10 under the trec-dl protocol."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import shared_path

from retriever.cli import main
from retriever.evaluation import evaluate_run
from retriever.trec import QrelsDict, RunDict, read_qrels, read_run

pytestmark = pytest.mark.real

# trec_eval -m ndcg_cut.10 on these runs (../shared/data/README.md §2b), i.e. the published values.
GOLDEN_NDCG_AT_10 = {
    "BM25": 0.5058,
    "BM25_RM3": 0.5216,
    "D_BERT_KD_TASB": 0.7210,
    "OPEN_AI_ADA2": 0.7035,
    "SPLADE_P_P_ENSEMBLE_DISTIL": 0.7308,
    "REP_LLAMA": 0.7384,
}


def _run_path(retriever: str) -> Path:
    return shared_path("msmarco_trecdl", "rank_llm_retrieve_results", retriever, "trec_results_dl19.txt.gz")


@pytest.fixture(scope="module")
def qrels() -> QrelsDict:
    return read_qrels(shared_path("msmarco_trecdl", "qrels.dl19-passage.txt"))


@pytest.mark.parametrize(("retriever", "expected"), sorted(GOLDEN_NDCG_AT_10.items()))
def test_dl19_ndcg_matches_trec_eval(qrels: QrelsDict, retriever: str, expected: float) -> None:
    metrics = evaluate_run(read_run(_run_path(retriever)), qrels, "trec-dl")
    assert set(metrics) == {"ndcg@10", "mrr@10-l2", "recall@1000-l2"}
    assert round(metrics["ndcg@10"], 4) == expected


@pytest.mark.parametrize(("retriever", "expected"), sorted(GOLDEN_NDCG_AT_10.items()))
def test_cli_evaluate_json_matches_trec_eval(capsys, retriever: str, expected: float) -> None:
    qrels_path = shared_path("msmarco_trecdl", "qrels.dl19-passage.txt")
    argv = ["evaluate", "--run", str(_run_path(retriever)), "--qrels", str(qrels_path), "--protocol", "trec-dl"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert round(report["metrics"]["ndcg@10"], 4) == expected
    assert report["queries_evaluated"] == 43 and report["queries_missing_from_run"] == 0


def _rescored(order: dict[str, list[str]]) -> RunDict:
    """A run without ties whose ranking is exactly ``order``."""
    return {q: {d: float(len(docs) - i) for i, d in enumerate(docs)} for q, docs in order.items()}


def test_repllama_tie_order_matters(qrels: QrelsDict) -> None:
    path = _run_path("REP_LLAMA")
    run = read_run(path)
    # Scores are rounded to 3 decimals: many documents of a query share a score.
    assert any(len(set(docs.values())) < len(docs) for docs in run.values())

    # The file's own rank column (the order the retriever emitted), read independently of read_run.
    by_rank: dict[str, list[tuple[int, str]]] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            qid, _, docid, rank, _, _ = line.split()
            by_rank.setdefault(qid, []).append((int(rank), docid))
    input_order = {q: [d for _, d in sorted(pairs)] for q, pairs in by_rank.items()}
    # Ties broken by ascending doc id instead of trec_eval's descending one.
    ascending = {q: [d for d, _ in sorted(docs.items(), key=lambda x: (-x[1], x[0]))] for q, docs in run.items()}

    assert round(evaluate_run(run, qrels, "trec-dl")["ndcg@10"], 4) == 0.7384
    assert round(evaluate_run(_rescored(input_order), qrels, "trec-dl")["ndcg@10"], 4) == 0.7439
    assert round(evaluate_run(_rescored(ascending), qrels, "trec-dl")["ndcg@10"], 4) == 0.7445
