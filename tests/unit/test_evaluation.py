"""Evaluation: protocols, TREC IO, alignment, tie order and metrics on tiny hand-computed cases.

The expected metric values are written out by hand below (linear-gain nDCG with log2(rank + 1) discounts, as
trec_eval's ndcg_cut), never taken from the code under test.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import uuid
from pathlib import Path

import pytest
from scipy import stats

from retriever.evaluation import (
    BEIR_13_DATASETS,
    PROTOCOLS,
    align_run,
    beir_mean,
    compare_runs,
    evaluate_command,
    evaluate_detailed,
    evaluate_run,
    get_protocol,
    load_qrels,
    protocol_for_dataset,
    qrels_from_ir_datasets,
)
from retriever.trec import TrecFormatError, write_run

# Judged: q1 graded 3/2/1/0, q2 one grade-1 doc, q3 judged but never retrieved.
QRELS = {
    "q1": {"d1": 3, "d2": 2, "d3": 1, "d4": 0},
    "q2": {"d5": 1},
    "q3": {"d6": 2},
}
# q1 ranks d4(0) d1(3) d2(2) d9(unjudged) d3(1); q2 ranks d7(unjudged) d5(1); q4 has no judgments.
RUN = {
    "q1": {"d4": 0.9, "d1": 0.8, "d2": 0.5, "d9": 0.4, "d3": 0.1},
    "q2": {"d7": 2.0, "d5": 1.0},
    "q4": {"dx": 1.0},
}

# nDCG@10, q1: DCG = 0/log2(2) + 3/log2(3) + 2/log2(4) + 0/log2(5) + 1/log2(6)
#              IDCG = 3/log2(2) + 2/log2(3) + 1/log2(4)
NDCG_Q1 = (3 / math.log2(3) + 2 / 2 + 1 / math.log2(6)) / (3 + 2 / math.log2(3) + 1 / 2)
# q2: DCG = 1/log2(3), IDCG = 1/log2(2) = 1
NDCG_Q2 = 1 / math.log2(3)


def test_protocol_registry_and_defaults() -> None:
    assert set(PROTOCOLS.names()) == {"msmarco-dev", "trec-dl", "beir", "synthetic"}
    msmarco, dl, beir = (get_protocol(n) for n in ("msmarco-dev", "trec-dl", "beir"))
    assert msmarco.metrics == ("mrr@10", "recall@1000") and msmarco.depth == 1000
    assert dl.metrics == ("ndcg@10", "mrr@10-l2", "recall@1000-l2") and dl.depth == 1000
    assert beir.metrics == ("ndcg@10", "recall@100") and beir.depth == 100
    assert (msmarco.query_max_length, msmarco.passage_max_length) == (64, 192)
    assert (dl.query_max_length, dl.passage_max_length) == (64, 192)
    assert (beir.query_max_length, beir.passage_max_length) == (512, 512)
    assert get_protocol(dl) is dl
    with pytest.raises(KeyError, match="known: beir, msmarco-dev, synthetic, trec-dl"):
        get_protocol("msmarco")


def test_protocol_for_dataset() -> None:
    assert protocol_for_dataset("msmarco-passage/dev/small").name == "msmarco-dev"
    assert protocol_for_dataset("msmarco-passage/trec-dl-2019/judged").name == "trec-dl"
    assert protocol_for_dataset("msmarco-passage/trec-dl-2020/judged").name == "trec-dl"
    assert {protocol_for_dataset(d).name for d in BEIR_13_DATASETS} == {"beir"}
    assert len(BEIR_13_DATASETS) == 13
    with pytest.raises(KeyError, match="no default evaluation protocol for dataset 'msmarco-passage/dev'"):
        protocol_for_dataset("msmarco-passage/dev")


def test_hand_computed_trec_dl_metrics(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="retriever.evaluation"):
        result = evaluate_detailed(RUN, QRELS, "trec-dl")
    # Mean over the 3 judged queries; q3 (missing from the run) counts as 0, q4 (no qrels) is dropped.
    assert result.metrics["ndcg@10"] == pytest.approx((NDCG_Q1 + NDCG_Q2 + 0) / 3, abs=1e-12)
    # MRR@10 at level 2: q1's first doc with grade >= 2 is d1 at rank 2 -> 1/2; q2 has no grade >= 2 -> 0; q3 -> 0.
    assert result.metrics["mrr@10-l2"] == pytest.approx((1 / 2 + 0 + 0) / 3, abs=1e-12)
    # Recall@1000 at level 2: q1 retrieves both of d1, d2 -> 1; q2 has nothing relevant at level 2 -> 0; q3 -> 0.
    assert result.metrics["recall@1000-l2"] == pytest.approx((1 + 0 + 0) / 3, abs=1e-12)
    assert result.per_query["ndcg@10"] == pytest.approx({"q1": NDCG_Q1, "q2": NDCG_Q2, "q3": 0.0}, abs=1e-12)
    assert result.num_queries == 3
    assert result.missing_from_run == ["q3"] and result.without_qrels == ["q4"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 of 3 judged queries are missing from the run and score 0" in m for m in messages), messages
    assert any("1 run queries have no judgments and are dropped" in m for m in messages), messages


def test_level_one_metrics_differ_from_level_two() -> None:
    metrics = evaluate_run(RUN, QRELS, "trec-dl", metrics=["mrr@10", "recall@3", "mrr@10-l2"])
    # Level 1: q1's first grade >= 1 doc is d1 at rank 2 -> 1/2; q2's d5 at rank 2 -> 1/2; q3 -> 0.
    assert metrics["mrr@10"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3, abs=1e-12)
    assert metrics["mrr@10-l2"] == pytest.approx((1 / 2) / 3, abs=1e-12)
    # Recall@3: q1's top 3 (d4 d1 d2) hold 2 of its 3 grade >= 1 docs; q2's top 3 hold d5 -> 1; q3 -> 0.
    assert metrics["recall@3"] == pytest.approx((2 / 3 + 1 + 0) / 3, abs=1e-12)


def test_msmarco_protocol_depth_cut() -> None:
    # Relevant doc at position 1001 of 1001: outside the protocol's top-1000, so recall@1000 = 0; MRR@10 = 0.
    run = {"q": {f"n{i:04d}": 2000.0 - i for i in range(1000)} | {"rel": 1.0}}
    metrics = evaluate_run(run, {"q": {"rel": 1}}, "msmarco-dev")
    assert metrics == {"mrr@10": 0.0, "recall@1000": 0.0}
    # With "rel" moved to position 7, MRR@10 = 1/7 and recall@1000 = 1.
    run["q"]["rel"] = 2000.0 - 5.5
    assert evaluate_run(run, {"q": {"rel": 1}}, "msmarco-dev") == pytest.approx({"mrr@10": 1 / 7, "recall@1000": 1.0})


def test_ties_follow_trec_eval_order_whatever_the_insertion_order() -> None:
    qrels = {"q": {"a": 1}}
    # All three tie: trec_eval ranks c, b, a, so the relevant "a" is third: RR = 1/3 and nDCG@2 = 0.
    for docs in ({"a": 1.0, "b": 1.0, "c": 1.0}, {"c": 1.0, "b": 1.0, "a": 1.0}, {"b": 1.0, "a": 1.0, "c": 1.0}):
        metrics = evaluate_run({"q": docs}, qrels, "trec-dl", metrics=["mrr@10", "ndcg@2"])
        assert metrics == pytest.approx({"mrr@10": 1 / 3, "ndcg@2": 0.0}, abs=1e-12)
    # Renaming the relevant doc to "d" (> "c") puts it first: RR = 1.
    assert evaluate_run({"q": {"d": 1.0, "b": 1.0, "c": 1.0}}, {"q": {"d": 1}}, "trec-dl", ["mrr@10"]) == {
        "mrr@10": 1.0
    }


def test_align_run_rank_consistent_scores_and_identical_ids() -> None:
    alignment = align_run({"q": {"a": 1.0, "b": 1.0, "q": 5.0}}, {"q": {"a": 1}}, ignore_identical_ids=True)
    assert alignment.run == {"q": {"b": 2.0, "a": 1.0}}
    assert alignment.identical_ids_removed == 1
    with pytest.raises(ValueError, match="no query of run has judgments"):
        align_run({"x": {"a": 1.0}}, {"q": {"a": 1}})
    with pytest.raises(ValueError, match="retrieved no document for any judged query"):
        align_run({"q": {}}, {"q": {"a": 1}})
    with pytest.raises(TypeError, match="query ids must be str"):
        align_run({1: {"a": 1.0}}, {"q": {"a": 1}})  # type: ignore[dict-item]


def test_beir_protocol_ignores_identical_ids() -> None:
    # ArguAna-style: the query's own id is retrieved first. BEIR's evaluation removes it, so "rel" is at rank 1.
    run = {"q": {"q": 9.0, "rel": 5.0, "x": 1.0}}
    assert evaluate_run(run, {"q": {"rel": 1}}, "beir") == pytest.approx({"ndcg@10": 1.0, "recall@100": 1.0})
    # The trec-dl protocol keeps it: "rel" at rank 2 -> nDCG@10 = 1/log2(3).
    assert evaluate_run(run, {"q": {"rel": 1}}, "trec-dl", ["ndcg@10"])["ndcg@10"] == pytest.approx(1 / math.log2(3))


def test_beir_mean() -> None:
    per_dataset = {
        "beir/scifact/test": {"ndcg@10": 0.7, "recall@100": 0.9},
        "beir/nq": {"ndcg@10": 0.5, "recall@100": 0.8},
    }
    assert beir_mean(per_dataset) == pytest.approx({"ndcg@10": 0.6, "recall@100": 0.85})
    with pytest.raises(ValueError, match="different metrics"):
        beir_mean({"a": {"ndcg@10": 0.1}, "b": {"recall@100": 0.2}})
    with pytest.raises(ValueError, match="at least one dataset"):
        beir_mean({})


def _register_local_qrels(tmp_path: Path, text: str) -> str:
    import ir_datasets
    from ir_datasets.datasets.base import Dataset
    from ir_datasets.formats import TrecQrels
    from ir_datasets.util import LocalDownload

    path = tmp_path / f"{uuid.uuid4().hex}.qrels"
    path.write_text(text, encoding="utf-8")
    dataset_id = f"local-test/{uuid.uuid4().hex}"
    ir_datasets.registry.register(dataset_id, Dataset(TrecQrels(LocalDownload(path), {0: "no", 1: "yes", 2: "very"})))
    return dataset_id


def test_qrels_from_ir_datasets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset_id = _register_local_qrels(tmp_path, "q1 0 d1 2\nq1 0 d2 0\nq2 0 d1 1\nq2 0 d1 1\n")
    with caplog.at_level(logging.WARNING, logger="retriever.evaluation"):
        assert load_qrels(dataset_id) == {"q1": {"d1": 2, "d2": 0}, "q2": {"d1": 1}}
    assert any("1 repeated identical judgments merged" in r.getMessage() for r in caplog.records)
    conflicting = _register_local_qrels(tmp_path, "q1 0 d1 2\nq1 0 d1 1\n")
    with pytest.raises(TrecFormatError, match="judged both 2 and 1"):
        qrels_from_ir_datasets(conflicting)
    qrels_file = tmp_path / "qrels.txt"
    qrels_file.write_text("q1 0 d1 2\nq1 Q0 d2 0\n", encoding="utf-8")
    assert load_qrels(qrels_file) == {"q1": {"d1": 2, "d2": 0}}
    with pytest.raises(KeyError, match="neither an existing qrels file nor a known dataset id"):
        load_qrels(str(tmp_path / "absent-qrels.txt"))


def test_qrels_of_a_dataset_id_offline_name_the_file_to_place(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from retriever.data.sources import SourceUnavailableError

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceUnavailableError) as info:
        load_qrels("msmarco-passage/dev/small")
    message = str(info.value)
    assert message.startswith("msmarco-passage/dev/small: the qrels cannot be read: downloads are disabled (")
    assert "HF_HUB_OFFLINE=1" in message and "Place this file" in message


def test_evaluate_command(tmp_path: Path) -> None:
    run_path = tmp_path / "run.trec"
    write_run(RUN, run_path, tag="t")
    qrels_path = tmp_path / "qrels.txt"
    qrels_path.write_text("".join(f"{q} 0 {d} {g}\n" for q, ds in QRELS.items() for d, g in ds.items()))
    out = io.StringIO()
    summary = evaluate_command(run_path, str(qrels_path), "trec-dl", as_json=True, out=out)
    assert json.loads(out.getvalue()) == summary
    assert summary["metrics"]["ndcg@10"] == pytest.approx((NDCG_Q1 + NDCG_Q2) / 3, abs=1e-12)
    assert (summary["queries_evaluated"], summary["queries_missing_from_run"]) == (3, 1)
    assert summary["run_queries_without_qrels"] == 1 and summary["protocol"] == "trec-dl"

    text = io.StringIO()
    evaluate_command(run_path, qrels_path, "trec-dl", out=text)
    assert f"  ndcg@10         {(NDCG_Q1 + NDCG_Q2) / 3:.4f}" in text.getvalue()
    assert (
        "queries evaluated: 3 (missing from run, scored 0: 1; run queries without qrels, dropped: 1)"
        in text.getvalue()
    )

    dataset_id = _register_local_qrels(tmp_path, qrels_path.read_text())
    from_id = evaluate_command(run_path, dataset_id, "trec-dl", out=io.StringIO())
    assert from_id["metrics"] == summary["metrics"]
    with pytest.raises(ValueError, match="protocol cannot be inferred"):
        evaluate_command(run_path, qrels_path, None, out=io.StringIO())
    with pytest.raises(KeyError, match="no default evaluation protocol"):
        evaluate_command(run_path, dataset_id, None, out=io.StringIO())


# Four queries, one relevant doc each. Run "good" ranks it at 1, 1, 2, 1; run "bad" at 2, 3, 1, 4.
COMPARE_QRELS = {f"q{i}": {"rel": 1} for i in range(4)}


def _ranked(position: int) -> dict[str, float]:
    docs = {f"n{j}": 10.0 - j for j in range(4)}
    docs["rel"] = 10.0 - (position - 1) + 0.5  # just above the non-relevant doc at `position`
    return docs


def test_compare_runs_student_matches_hand_computed_t_test() -> None:
    good = {f"q{i}": _ranked(p) for i, p in enumerate([1, 1, 2, 1])}
    bad = {f"q{i}": _ranked(p) for i, p in enumerate([2, 3, 1, 4])}
    report = compare_runs(COMPARE_QRELS, {"good": good, "bad": bad}, ["mrr@10"], test="student", max_p=0.05)
    rr_good, rr_bad = [1, 1, 1 / 2, 1], [1 / 2, 1 / 3, 1, 1 / 4]
    assert report["scores"]["good"] == pytest.approx({"mrr@10": 3.5 / 4})
    assert report["scores"]["bad"] == pytest.approx({"mrr@10": (1 / 2 + 1 / 3 + 1 + 1 / 4) / 4})
    # Paired t: d = good - bad per query, t = mean(d) / (sd(d) / sqrt(n)), two-sided p with n - 1 dof.
    d = [g - b for g, b in zip(rr_good, rr_bad)]
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    p_value = 2 * stats.t.sf(abs(mean / (sd / 2)), df=3)
    (row,) = report["comparisons"]
    assert row["p_value"] == pytest.approx(p_value, rel=1e-9)
    assert p_value == pytest.approx(0.3084, abs=1e-4)  # 4 queries: far from significant at 0.05
    assert row["significant"] is False and row["better"] is None
    assert (row["wins_a"], row["ties"], row["wins_b"]) == (3, 0, 1)
    assert row["difference"] == pytest.approx(mean)
    json.dumps(report)  # plain, saveable
    assert "good" in report["table"] and "MRR@10" in report["table"]
    # A lax threshold makes the same difference significant, in favour of "good".
    (lax,) = compare_runs(COMPARE_QRELS, {"good": good, "bad": bad}, ["mrr@10"], max_p=0.5)["comparisons"]
    assert lax["p_value"] == pytest.approx(p_value, rel=1e-9)
    assert lax["significant"] is True and lax["better"] == "good"


def test_compare_runs_fisher_and_tukey() -> None:
    good = {f"q{i}": _ranked(p) for i, p in enumerate([1, 1, 2, 1])}
    bad = {f"q{i}": _ranked(p) for i, p in enumerate([2, 3, 1, 4])}
    # Identical runs: every permutation's difference (0) reaches the observed one (0), so p = 1.
    same = compare_runs(COMPARE_QRELS, {"a": good, "b": dict(good)}, ["mrr@10"], test="fisher", n_permutations=200)
    (row,) = same["comparisons"]
    assert row["p_value"] == 1.0 and row["significant"] is False and row["better"] is None
    tukey = compare_runs(COMPARE_QRELS, {"good": good, "bad": bad, "mid": good}, ["mrr@10"], test="tukey")
    reference = stats.tukey_hsd([1, 1, 1 / 2, 1], [1 / 2, 1 / 3, 1, 1 / 4], [1, 1, 1 / 2, 1]).pvalue
    rows = {(r["run_a"], r["run_b"]): r for r in tukey["comparisons"]}
    assert set(rows) == {("good", "bad"), ("good", "mid"), ("bad", "mid")}
    assert rows["good", "bad"]["p_value"] == pytest.approx(reference[0, 1], rel=1e-9)
    assert rows["bad", "mid"]["p_value"] == pytest.approx(reference[1, 2], rel=1e-9)
    json.dumps(tukey)
    # The protocol supplies the metrics (and the depth).
    by_protocol = compare_runs(COMPARE_QRELS, {"good": good, "bad": bad}, protocol="msmarco-dev")
    assert by_protocol["metrics"] == ["mrr@10", "recall@1000"] and by_protocol["protocol"] == "msmarco-dev"
    assert by_protocol["scores"]["good"] == pytest.approx({"mrr@10": 3.5 / 4, "recall@1000": 1.0})
    with pytest.raises(ValueError, match="needs metrics or a protocol"):
        compare_runs(COMPARE_QRELS, {"good": good, "bad": bad})
    with pytest.raises(ValueError, match="at least two runs"):
        compare_runs(COMPARE_QRELS, {"good": good}, ["mrr@10"])
    with pytest.raises(ValueError, match="unknown test"):
        compare_runs(COMPARE_QRELS, {"a": good, "b": bad}, ["mrr@10"], test="wilcoxon")  # type: ignore[arg-type]


def test_compare_runs_fisher_estimates_the_exact_randomization_p_value() -> None:
    # 12 queries; the exact randomization test swaps each query's pair of scores or not: 2**12 equally likely
    # relabelings, p = share of them whose |mean difference| reaches the observed one. ranx samples 2000 of them,
    # so its estimate is within a few standard errors (sqrt(p (1 - p) / 2000) <= 0.012) of the exact value.
    qrels = {f"q{i}": {"rel": 1} for i in range(12)}
    pos_a, pos_b = [1, 2, 1, 3, 1, 1, 4, 2, 1, 1, 2, 1], [2, 1, 3, 1, 4, 2, 1, 1, 3, 2, 1, 4]
    a = {f"q{i}": _ranked(p) for i, p in enumerate(pos_a)}
    b = {f"q{i}": _ranked(p) for i, p in enumerate(pos_b)}
    d = [1 / x - 1 / y for x, y in zip(pos_a, pos_b)]
    observed = abs(sum(d)) / 12
    flips = itertools.product([1, -1], repeat=12)
    exact = sum(abs(sum(s * x for s, x in zip(signs, d))) / 12 >= observed - 1e-12 for signs in flips) / 2**12
    report = compare_runs(qrels, {"a": a, "b": b}, ["mrr@10"], test="fisher", n_permutations=2000)
    (row,) = report["comparisons"]
    assert 0.2 < exact < 0.8
    assert row["p_value"] == pytest.approx(exact, abs=0.05)
    assert row["significant"] is False
