"""The synthetic benchmark: determinism, sizes, BEIR validity, graded qrels, synonyms and difficulty."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from ir_datasets.datasets.beir import BeirDocs, BeirQrels, BeirQueries, BeirTitleDoc
from ir_datasets.formats import GenericQuery, TrecScoredDocs
from ir_datasets.util import LocalDownload

from retriever.data import synthetic
from retriever.data.synthetic import SyntheticBenchmark, ensure_synthetic, generate_synthetic

SMALL = {"num_docs": 300, "num_train_queries": 60, "num_test_queries": 30, "num_candidates": 20}
DATA_FILES = [
    "corpus.jsonl",
    "queries.jsonl",
    "qrels/train.tsv",
    "qrels/test.tsv",
    "candidates/train.trec",
    "teacher/train.tsv",
    "lexicon.tsv",
]


def _hashes(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def default_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticBenchmark, float]:
    start = time.perf_counter()
    bench = generate_synthetic(tmp_path_factory.mktemp("synthetic-default"))
    return bench, time.perf_counter() - start


def _read_corpus(bench: SyntheticBenchmark) -> dict[str, list[str]]:
    """doc id -> lowercase word tokens of ``title + text`` (independent of the generator's tokenizer)."""
    docs = {}
    for line in bench.corpus.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        docs[row["_id"]] = [t.strip(".") for t in f"{row['title']} {row['text']}".split()]
    return docs


def _read_queries(bench: SyntheticBenchmark) -> dict[str, list[str]]:
    lines = bench.queries.read_text(encoding="utf-8").splitlines()
    return {row["_id"]: row["text"].split() for row in map(json.loads, lines)}


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "query-id\tcorpus-id\tscore"
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for line in lines[1:]:
        qid, docid, score = line.split("\t")
        out[qid][docid] = int(score)
    return dict(out)


def _read_run(path: Path) -> dict[str, list[tuple[str, int, float]]]:
    out: dict[str, list[tuple[str, int, float]]] = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        qid, q0, docid, rank, score, tag = line.split(" ")
        assert q0 == "Q0" and tag == "synthetic-bm25"
        out[qid].append((docid, int(rank), float(score)))
    return dict(out)


class Bm25:
    """Plain-python BM25 (k1 = 0.9, b = 0.4), written independently of the generator."""

    def __init__(self, docs: dict[str, list[str]], k1: float = 0.9, b: float = 0.4) -> None:
        self.k1, self.b = k1, b
        self.n = len(docs)
        self.avgdl = sum(len(t) for t in docs.values()) / self.n
        self.length = {d: len(t) for d, t in docs.items()}
        self.index: dict[str, dict[str, int]] = defaultdict(dict)
        for d, toks in docs.items():
            for term, tf in Counter(toks).items():
                self.index[term][d] = tf

    def scores(self, query: list[str]) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for term in set(query):
            postings = self.index.get(term, {})
            idf = math.log(1 + (self.n - len(postings) + 0.5) / (len(postings) + 0.5))
            for d, tf in postings.items():
                norm = self.k1 * (1 - self.b + self.b * self.length[d] / self.avgdl)
                out[d] += idf * tf * (self.k1 + 1) / (tf + norm)
        return dict(out)

    def rank(self, query: list[str], k: int) -> list[str]:
        scores = self.scores(query)
        return sorted(scores, key=lambda d: (-scores[d], d))[:k]


def ndcg_at_10(ranking: list[str], qrels: dict[str, int]) -> float:
    """trec_eval-style nDCG@10: linear gains, log2(rank + 1) discount."""
    dcg = sum(qrels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking[:10]))
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def test_ndcg_helper_on_hand_examples() -> None:
    assert ndcg_at_10(["a", "b"], {"a": 1, "b": 1}) == 1.0
    assert ndcg_at_10(["x", "a"], {"a": 1}) == pytest.approx(1 / math.log2(3))
    # DCG = 3 + 0 + 1/2, IDCG = 3 + 2/log2(3) + 1/2
    assert ndcg_at_10(["a", "b", "c"], {"a": 3, "c": 1, "d": 2}) == pytest.approx(3.5 / (3.5 + 2 / math.log2(3)))


def test_same_seed_gives_byte_identical_files_and_other_seeds_differ(tmp_path: Path) -> None:
    generate_synthetic(tmp_path / "a", seed=7, **SMALL)
    generate_synthetic(tmp_path / "b", seed=7, **SMALL)
    generate_synthetic(tmp_path / "c", seed=8, **SMALL)
    a, b, c = (_hashes(tmp_path / name) for name in "abc")
    assert sorted(a) == sorted([*DATA_FILES, "manifest.json"])
    assert a == b
    assert all(a[f] != c[f] for f in DATA_FILES)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["sha256"] == {f: a[f] for f in DATA_FILES}
    assert manifest["seed"] == 7 and manifest["num_docs"] == 300 and manifest["num_candidates"] == 20


def test_regenerating_into_the_same_folder_is_byte_identical(tmp_path: Path) -> None:
    generate_synthetic(tmp_path, seed=3, **SMALL)
    first = _hashes(tmp_path)
    (tmp_path / "corpus.jsonl").write_text("garbage\n")
    generate_synthetic(tmp_path, seed=3, **SMALL)
    assert _hashes(tmp_path) == first


def test_default_sizes_are_honoured_and_fast(default_bench: tuple[SyntheticBenchmark, float]) -> None:
    bench, seconds = default_bench
    assert seconds < 5.0
    assert (bench.num_docs, bench.num_train_queries, bench.num_test_queries) == (2000, 800, 200)
    docs = _read_corpus(bench)
    queries = _read_queries(bench)
    assert len(docs) == 2000
    train = [q for q in queries if q.startswith("train-")]
    test = [q for q in queries if q.startswith("test-")]
    assert (len(train), len(test), len(queries)) == (800, 200, 1000)
    assert train[0] == "train-000001" and test[-1] == "test-000200"
    run = _read_run(bench.candidates_train)
    assert set(run) <= set(train)
    sizes = [len(v) for v in run.values()]
    assert len(run) == 800 and max(sizes) == 50 and sum(s == 50 for s in sizes) > 0.6 * len(train)
    teacher_lines = bench.teacher_train.read_text().splitlines()
    assert len(teacher_lines) == 800 + sum(sizes)
    manifest = json.loads(bench.manifest.read_text())
    assert manifest["counts"]["teacher_pairs"] == len(teacher_lines)
    assert manifest["counts"]["candidates"] == sum(sizes)


def test_sizes_and_validation_of_small_benchmarks(tmp_path: Path) -> None:
    bench = generate_synthetic(
        tmp_path, seed=1, num_docs=40, num_train_queries=25, num_test_queries=15, num_candidates=5
    )
    assert len(_read_corpus(bench)) == 40
    assert len(_read_qrels(bench.qrels_train)) == 25 and len(_read_qrels(bench.qrels_test)) == 15
    assert max(len(v) for v in _read_run(bench.candidates_train).values()) <= 5
    with pytest.raises(ValueError, match="num_test_queries = 40 >= num_docs = 40"):
        generate_synthetic(tmp_path / "x", num_docs=40, num_train_queries=26, num_test_queries=40)


def test_more_train_queries_than_free_documents_keep_the_test_set(tmp_path: Path) -> None:
    """Train queries beyond num_docs - num_test_queries reuse training documents as sources; the test queries,
    test qrels and corpus stay byte-identical, and the first train queries stay the same."""
    small = generate_synthetic(tmp_path / "a", seed=3, num_docs=60, num_train_queries=40, num_test_queries=20)
    large = generate_synthetic(tmp_path / "b", seed=3, num_docs=60, num_train_queries=300, num_test_queries=20)
    assert large.corpus.read_bytes() == small.corpus.read_bytes()
    assert large.qrels_test.read_bytes() == small.qrels_test.read_bytes()
    small_queries = small.query_texts()
    large_queries = large.query_texts()
    assert {q: t for q, t in large_queries.items() if q.startswith("test-")} == {
        q: t for q, t in small_queries.items() if q.startswith("test-")
    }
    assert all(large_queries[q] == t for q, t in small_queries.items() if q.startswith("train-"))
    assert len(_read_qrels(large.qrels_train)) == 300
    test_sources = {d for rows in _read_qrels(large.qrels_test).values() for d, g in rows.items() if g == 3}
    train_sources = {d for rows in _read_qrels(large.qrels_train).values() for d in rows}
    assert not test_sources & train_sources
    with pytest.raises(ValueError, match="num_candidates must be ≥ 1"):
        generate_synthetic(tmp_path / "x", num_candidates=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        generate_synthetic(tmp_path / "x", seed=-1)


def test_files_are_valid_beir_and_trec(default_bench: tuple[SyntheticBenchmark, float]) -> None:
    bench, _ = default_bench
    # parse back with ir_datasets' own BEIR and TREC readers
    docs = list(BeirDocs("synthetic-test", LocalDownload(bench.corpus), BeirTitleDoc)._docs_iter())
    queries = list(BeirQueries("synthetic-test", LocalDownload(bench.queries), GenericQuery).queries_iter())
    qrels_test = list(BeirQrels(LocalDownload(bench.qrels_test), {}).qrels_iter())
    qrels_train = list(BeirQrels(LocalDownload(bench.qrels_train), {}).qrels_iter())
    run = list(TrecScoredDocs(LocalDownload(bench.candidates_train)).scoreddocs_iter())
    doc_ids = [d.doc_id for d in docs]
    query_ids = [q.query_id for q in queries]
    assert len(set(doc_ids)) == len(doc_ids) == 2000
    assert len(set(query_ids)) == len(query_ids) == 1000
    assert all(d.title and d.text for d in docs) and all(q.text for q in queries)
    for line in bench.corpus.read_text().splitlines():
        assert sorted(json.loads(line)) == ["_id", "text", "title"]
    known_docs, known_queries = set(doc_ids), set(query_ids)
    assert {q.doc_id for q in qrels_test + qrels_train} <= known_docs
    assert {q.query_id for q in qrels_test} == {q for q in query_ids if q.startswith("test-")}
    assert {q.query_id for q in qrels_train} == {q for q in query_ids if q.startswith("train-")}
    assert {r.doc_id for r in run} <= known_docs and {r.query_id for r in run} <= known_queries
    for line in bench.teacher_train.read_text().splitlines():
        qid, docid, score = line.split("\t")
        assert qid in known_queries and docid in known_docs and math.isfinite(float(score))
        assert len(score.split(".")[1]) == 4  # fixed formatting
    assert bench.lexicon.read_text().splitlines()[0] == "surface\tconcept\tkind"
    reopened = SyntheticBenchmark.from_dir(bench.root)
    assert reopened == bench
    assert reopened.docs()["doc-000001"].startswith(docs[0].title + " ")
    assert len(reopened.query_texts()) == 1000


def test_graded_qrels_on_test_queries(default_bench: tuple[SyntheticBenchmark, float]) -> None:
    bench, _ = default_bench
    test = _read_qrels(bench.qrels_test)
    train = _read_qrels(bench.qrels_train)
    assert len(test) == 200
    for judged in test.values():
        assert sorted(judged.values()).count(3) == 1
        assert set(judged.values()) <= {1, 2, 3}
    grades = Counter(g for judged in test.values() for g in judged.values())
    assert grades[2] > 200 and grades[1] > grades[2]  # lesser grades are common, not rare accidents
    assert sum(len(j) > 1 for j in test.values()) > 150
    # train: exactly one positive per query, all sources (train and test) distinct documents
    assert all(list(j.values()) == [1] for j in train.values())
    sources = [d for j in train.values() for d in j] + [d for j in test.values() for d, g in j.items() if g == 3]
    assert len(set(sources)) == len(sources) == 1000
    # file order: per query, grade descending then doc id
    lines = bench.qrels_test.read_text().splitlines()[1:]
    keys = [(q, -int(g), d) for q, d, g in (line.split("\t") for line in lines)]
    assert keys == sorted(keys)


def test_synonyms_hide_part_of_the_query_from_its_positive(default_bench: tuple[SyntheticBenchmark, float]) -> None:
    bench, _ = default_bench
    docs = _read_corpus(bench)
    queries = _read_queries(bench)
    positive = {q: next(iter(j)) for q, j in _read_qrels(bench.qrels_train).items()}
    positive |= {q: d for q, j in _read_qrels(bench.qrels_test).items() for d, g in j.items() if g == 3}
    lexicon = {}
    for line in bench.lexicon.read_text().splitlines()[1:]:
        surface, concept, kind = line.split("\t")
        lexicon[surface] = (concept, kind)
    absent = total = 0
    for qid, tokens in queries.items():
        doc = set(docs[positive[qid]])
        doc_concepts = {lexicon[t][0] for t in doc}
        for token in tokens:
            total += 1
            if token not in doc:
                absent += 1
                concept, kind = lexicon[token]
                # a missing word is a synonym of one of the document's concepts, or a background word
                assert kind == "background" or (kind.startswith("topic") and concept in doc_concepts), token
    assert 0.2 < absent / total < 0.5


def test_bm25_separates_retrievers_and_synonym_knowledge_helps(
    default_bench: tuple[SyntheticBenchmark, float],
) -> None:
    bench, _ = default_bench
    docs = _read_corpus(bench)
    queries = _read_queries(bench)
    qrels = _read_qrels(bench.qrels_test)
    bm25 = Bm25(docs)
    lexical = sum(ndcg_at_10(bm25.rank(queries[q], 10), qrels[q]) for q in qrels) / len(qrels)
    rng = random.Random(0)
    ids = sorted(docs)
    rand = sum(ndcg_at_10(rng.sample(ids, 10), qrels[q]) for q in qrels) / len(qrels)
    # a retriever that knows the synonyms (maps surfaces to concepts) does much better
    concept = {}
    for line in bench.lexicon.read_text().splitlines()[1:]:
        surface, cid, kind = line.split("\t")
        concept[surface] = cid if kind.startswith("topic") else surface
    aware = Bm25({d: [concept.get(t, t) for t in toks] for d, toks in docs.items()})
    oracle = sum(ndcg_at_10(aware.rank([concept[t] for t in queries[q]], 10), qrels[q]) for q in qrels) / len(qrels)
    assert rand < 0.05
    assert 0.45 < lexical < 0.9
    assert oracle > lexical + 0.1 and oracle < 1.0


def test_candidates_are_bm25_top_k_without_the_positive(tmp_path: Path) -> None:
    bench = generate_synthetic(tmp_path, seed=5, **SMALL)
    docs = _read_corpus(bench)
    queries = _read_queries(bench)
    positives = _read_qrels(bench.qrels_train)
    run = _read_run(bench.candidates_train)
    bm25 = Bm25(docs)
    for qid, judged in positives.items():
        scores = bm25.scores(queries[qid])
        expected = [d for d in bm25.rank(queries[qid], len(docs)) if d not in judged][:20]
        got = run.get(qid, [])
        assert [d for d, _, _ in got] == expected, qid
        assert [r for _, r, _ in got] == list(range(1, len(got) + 1))
        assert all(s == pytest.approx(scores[d], abs=1e-6) for d, _, s in got)


def test_teacher_scores_follow_the_generative_relevance(default_bench: tuple[SyntheticBenchmark, float]) -> None:
    bench, _ = default_bench
    positives = _read_qrels(bench.qrels_train)
    run = _read_run(bench.candidates_train)
    pairs = [line.split("\t") for line in bench.teacher_train.read_text().splitlines()]
    # pairs: per train query, the positive then the candidates in run order
    expected = []
    for qid, judged in positives.items():
        expected += [(qid, d) for d in judged] + [(qid, d) for d, _, _ in run.get(qid, [])]
    assert [(q, d) for q, d, _ in pairs] == expected
    pos = [float(s) for q, d, s in pairs if d in positives[q]]
    neg = [float(s) for q, d, s in pairs if d not in positives[q]]
    # positive: bias + 3 * grade weight + full coverage; noise sd ≈ 1.1 over 800 queries
    mean_pos = sum(pos) / len(pos)
    top = synthetic.TEACHER_BIAS + 3 * synthetic.TEACHER_GRADE + synthetic.TEACHER_COVERAGE
    assert mean_pos == pytest.approx(top, abs=0.25)
    assert sum(neg) / len(neg) < mean_pos - 5
    # some candidates are unlabeled relevant documents: the teacher ranks them high
    assert sum(s > 0 for s in neg) > 0.02 * len(neg)


def test_ensure_reuses_verified_folders_and_regenerates_changed_ones(tmp_path: Path) -> None:
    bench = ensure_synthetic(tmp_path, seed=2, **SMALL)
    hashes = _hashes(tmp_path)
    mtime = bench.corpus.stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, seed=2, **SMALL) == bench
    assert bench.corpus.stat().st_mtime_ns == mtime  # reused, not rewritten
    bench.queries.write_text(bench.queries.read_text().replace("train-000001", "train-999999"))
    with pytest.raises(ValueError, match="sha256 .* differs"):
        SyntheticBenchmark.from_dir(tmp_path)
    ensure_synthetic(tmp_path, seed=2, **SMALL)
    assert _hashes(tmp_path) == hashes
    other = ensure_synthetic(tmp_path, seed=3, **SMALL)
    assert other.seed == 3 and _hashes(tmp_path) != hashes
    with pytest.raises(TypeError, match="unknown synthetic parameters"):
        ensure_synthetic(tmp_path, num_doc=10)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        SyntheticBenchmark.from_dir(tmp_path / "missing")
