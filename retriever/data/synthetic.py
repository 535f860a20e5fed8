"""The offline synthetic retrieval benchmark (deterministic from a seed), written as a BEIR folder.

Generative process (everything drawn from one ``numpy.random.Generator(PCG64(seed))`` in a fixed order):

* **Vocabulary.** ``num_topics`` topics, each with ``CONCEPTS_PER_TOPIC`` content *concepts*. A concept has 1–3
  surface *synonyms*: made-up, pronounceable lowercase words, so no real-language knowledge helps. Synonyms have a
  popularity order (the first is the most used). ``BACKGROUND_WORDS`` shared, low-information background words (one
  surface each, Zipf-distributed). Per topic, a few *entity names* (rare words, each shared by ~2–3 documents of that
  topic), and per document one unique *id code* (two letters + four digits).
* **Documents.** A dominant topic (balanced over topics), optionally a secondary topic; 5–9 topical concepts of the
  dominant topic and 2–3 of the secondary one (Zipf-weighted within the topic), each repeated 1–3 times and always
  written with the SAME synonym inside one document (drawn by popularity); 12–24 background words; the primary
  entity name (1–2 mentions), sometimes a second entity name, and the document's id code. The title is the primary
  entity plus the two most repeated concepts; the body is the shuffled bag cut into short sentences.
* **Queries.** Each query is written from its own source document (train and test sources are disjoint). It samples
  2–4 of the document's concepts (weighted by their counts) and renders each one, when the concept has another
  synonym, with a DIFFERENT synonym than the document used with probability ``SYNONYM_SWAP`` (so pure lexical
  matching misses part of the signal), plus the document's primary entity name (``P_ENTITY``), its id code
  (``P_ID_CODE``) and one frequent background word (``P_BACKGROUND``), in shuffled order.
* **Graded relevance** of document ``d`` for a query with concept set ``Q`` written from source ``s`` with primary
  entity ``E``: ``hits(d) = |Q ∩ concepts(d)|``, ``cov(d) = hits(d) / |Q|`` (synonym-independent), ``shares(d) =
  E ∈ entities(d)``. Grade 3 if ``d = s``; else 2 if ``(shares(d) and cov(d) ≥ 0.5) or cov(d) = 1``; else 1 if
  ``shares(d) or (hits(d) ≥ 2 and cov(d) ≥ 0.5)``; else 0. Test qrels list every document of grade ≥ 1. Train qrels
  list only the source document (score 1), like MS MARCO's sparse labels: the candidate pool therefore holds some
  unlabeled relevant documents (false negatives), which the teacher scores see.
* **Candidates.** BM25 (k1 = 0.9, b = 0.4; whitespace tokens of ``title + " " + text``) over the corpus for every
  train query; the top ``num_candidates`` documents with a positive score that are not the positive, ties broken by
  document id, written as a TREC run.
* **Teacher scores** for (query, positive) and every (query, candidate): a cross-encoder-like logit
  ``TEACHER_BIAS + TEACHER_GRADE·grade + TEACHER_COVERAGE·cov + query offset + noise`` with a per-query offset
  ~ N(0, ``TEACHER_QUERY_SD``²) and per-pair noise ~ N(0, ``TEACHER_NOISE_SD``²).

Files: ``corpus.jsonl`` (``{"_id","title","text"}``), ``queries.jsonl`` (``{"_id","text"}``; ids
``train-000001``…, ``test-000001``…), ``qrels/train.tsv`` and ``qrels/test.tsv`` (BEIR header
``query-id\\tcorpus-id\\tscore``), ``candidates/train.trec``, ``teacher/train.tsv`` (``qid\\tdocid\\tscore``),
``lexicon.tsv`` (``surface\\tconcept\\tkind``: the generative ground truth, for analysis only) and ``manifest.json``
(seed, sizes, generator parameters and the sha256 of every other file; written last). The same seed and sizes give
byte-identical files: floats use fixed formats, and scores are summed in a fixed order with scalar ``math.log``, so
results do not depend on SIMD paths or thread counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retriever.checksums import sha256_file
from retriever.errors import IntegrityError, SettingError

GENERATOR_VERSION = 1

CONCEPTS_PER_TOPIC = 40
BACKGROUND_WORDS = 100
SYNONYM_COUNT_PROBS = (0.3, 0.45, 0.25)  # P(1 synonym), P(2), P(3)
SYNONYM_POPULARITY = (1.0, 0.6, 0.35)  # relative use of the 1st, 2nd, 3rd synonym in documents
CONCEPT_ZIPF = 0.7  # within-topic concept frequency ∝ 1 / rank^CONCEPT_ZIPF
DOCS_PER_ENTITY = 2.5
P_SECONDARY_TOPIC = 0.35
P_SECOND_ENTITY = 0.3
SYNONYM_SWAP = 0.6
P_ENTITY = 0.5
P_ID_CODE = 0.15
P_BACKGROUND = 0.5
BM25_K1 = 0.9
BM25_B = 0.4
TEACHER_BIAS = -7.0
TEACHER_GRADE = 3.5
TEACHER_COVERAGE = 2.0
TEACHER_QUERY_SD = 0.5
TEACHER_NOISE_SD = 1.0
RUN_TAG = "synthetic-bm25"

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_CODAS = "nrsl"
_ID_LETTERS = "bcdfghjklmnpqrstvwxz"

_FILES = {
    "corpus": "corpus.jsonl",
    "queries": "queries.jsonl",
    "qrels_train": "qrels/train.tsv",
    "qrels_test": "qrels/test.tsv",
    "candidates_train": "candidates/train.trec",
    "teacher_train": "teacher/train.tsv",
    "lexicon": "lexicon.tsv",
}
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class SyntheticBenchmark:
    """Paths and sizes of a generated synthetic benchmark folder (a valid BEIR folder)."""

    root: Path
    corpus: Path
    queries: Path
    qrels_train: Path
    qrels_test: Path
    candidates_train: Path
    teacher_train: Path
    lexicon: Path
    manifest: Path
    seed: int
    num_docs: int
    num_train_queries: int
    num_test_queries: int
    num_candidates: int
    num_topics: int

    @classmethod
    def at(cls, root: Path, params: dict[str, int]) -> SyntheticBenchmark:
        root = Path(root)
        paths = {key: root / rel for key, rel in _FILES.items()}
        return cls(root=root, manifest=root / MANIFEST, **paths, **params)

    @classmethod
    def from_dir(cls, root: Path, *, verify: bool = True) -> SyntheticBenchmark:
        """Open a generated folder from its manifest; ``verify`` re-checks every file's sha256."""
        root = Path(root)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no manifest; generate the folder with generate_synthetic()")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        bench = cls.at(root, {key: int(manifest[key]) for key in _PARAM_KEYS})
        if verify:
            bench.verify(manifest)
        return bench

    def verify(self, manifest: dict[str, Any] | None = None) -> None:
        """Raise ``IntegrityError`` (a ``ValueError``) when a file is missing or its sha256 differs from the
        manifest."""
        if manifest is None:
            manifest = json.loads(self.manifest.read_text(encoding="utf-8"))
        for rel, expected in manifest["sha256"].items():
            path = self.root / rel
            if not path.is_file():
                raise IntegrityError(f"{path}: listed in {self.manifest} but missing; regenerate the folder")
            actual = sha256_file(path)
            if actual != expected:
                raise IntegrityError(
                    f"{path}: sha256 {actual} differs from {expected} in {self.manifest}; the file was changed, "
                    "regenerate the folder"
                )

    def docs(self) -> dict[str, str]:
        """Document id → ``"title text"`` (the text an encoder sees, as ir_datasets' BEIR ``default_text``)."""
        out: dict[str, str] = {}
        with self.corpus.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                out[row["_id"]] = f"{row['title']} {row['text']}".strip()
        return out

    def query_texts(self) -> dict[str, str]:
        """Query id → text, train and test queries together."""
        with self.queries.open(encoding="utf-8") as f:
            return {row["_id"]: row["text"] for row in map(json.loads, f)}


_PARAM_KEYS = ("seed", "num_docs", "num_train_queries", "num_test_queries", "num_candidates", "num_topics")


def generate_synthetic(
    out_dir: Path,
    *,
    seed: int = 0,
    num_docs: int = 2000,
    num_train_queries: int = 800,
    num_test_queries: int = 200,
    num_candidates: int = 50,
    num_topics: int = 20,
) -> SyntheticBenchmark:
    """Generate the synthetic benchmark into ``out_dir`` (overwriting its files) and return its paths and sizes."""
    if int(seed) < 0:
        raise SettingError(f"seed must be a non-negative integer, got {seed}")
    _check_sizes(num_docs, num_train_queries, num_test_queries, num_candidates, num_topics)
    params = {
        "seed": int(seed),
        "num_docs": num_docs,
        "num_train_queries": num_train_queries,
        "num_test_queries": num_test_queries,
        "num_candidates": num_candidates,
        "num_topics": num_topics,
    }
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    world = _World(rng, num_docs, num_topics)
    train, test = _draw_queries(world, rng, int(seed), num_docs, num_train_queries, num_test_queries)

    bench = SyntheticBenchmark.at(Path(out_dir), params)
    for path in (bench.qrels_train, bench.candidates_train, bench.teacher_train):
        path.parent.mkdir(parents=True, exist_ok=True)
    bench.manifest.unlink(missing_ok=True)  # a folder without a manifest is an unfinished one

    _write_lines(bench.corpus, (world.corpus_line(d) for d in range(num_docs)))
    query_lines = [json.dumps({"_id": _qid("train", i), "text": q.text}) for i, q in enumerate(train)]
    query_lines += [json.dumps({"_id": _qid("test", i), "text": q.text}) for i, q in enumerate(test)]
    _write_lines(bench.queries, query_lines)
    _write_lines(bench.lexicon, world.lexicon_lines())
    qrels_test = _test_qrels(world, test)
    _write_lines(bench.qrels_test, qrels_test)
    qrels_train, run_lines, teacher_lines = _training_files(world, train, rng, num_candidates)
    _write_lines(bench.qrels_train, qrels_train)
    _write_lines(bench.candidates_train, run_lines)
    _write_lines(bench.teacher_train, teacher_lines)

    counts = {
        "docs": num_docs,
        "train_queries": num_train_queries,
        "test_queries": num_test_queries,
        "qrels_test": len(qrels_test) - 1,
        "candidates": len(run_lines),
        "teacher_pairs": len(teacher_lines),
    }
    _write_manifest(bench, params, counts)
    return bench


def _draw_queries(
    world: _World, rng: np.random.Generator, seed: int, num_docs: int, num_train: int, num_test: int
) -> tuple[list[_Query], list[_Query]]:
    """(train, test) queries. The first train queries and every test query have their own source document; train
    queries beyond num_docs - num_test come from a second stream (seeded by the same seed), so adding them changes
    no earlier file content and no test query."""
    unique = min(num_train, num_docs - num_test)
    sources = rng.choice(num_docs, size=unique + num_test, replace=False)
    train = [world.make_query(int(d), rng) for d in sources[:unique]]
    test = [world.make_query(int(d), rng) for d in sources[unique:]]
    if num_train > unique:
        extra_rng = np.random.Generator(np.random.PCG64([seed, 1]))
        eligible = np.setdiff1d(np.arange(num_docs), sources[unique:])
        extra = extra_rng.choice(eligible, size=num_train - unique, replace=True)
        train += [world.make_query(int(d), extra_rng) for d in extra]
    return train, test


def _test_qrels(world: _World, test: list[_Query]) -> list[str]:
    """Graded judgments of the test queries (BEIR TSV lines with header), best grade first."""
    lines = ["query-id\tcorpus-id\tscore"]
    for i, q in enumerate(test):
        grades = world.grades(q)[0]
        judged = np.flatnonzero(grades)
        for d in judged[np.lexsort((judged, -grades[judged]))]:
            lines.append(f"{_qid('test', i)}\t{_did(int(d))}\t{int(grades[d])}")
    return lines


def _training_files(
    world: _World, train: list[_Query], rng: np.random.Generator, num_candidates: int
) -> tuple[list[str], list[str], list[str]]:
    """Lines of the train qrels (the source document), BM25 candidates (positives excluded) and teacher scores."""
    bm25 = _Bm25(world.doc_tokens())
    qrels = ["query-id\tcorpus-id\tscore"]
    run_lines: list[str] = []
    teacher_lines: list[str] = []
    for i, q in enumerate(train):
        qid = _qid("train", i)
        qrels.append(f"{qid}\t{_did(q.source)}\t1")
        scores = bm25.scores(q.tokens)
        scores[q.source] = 0.0  # positives are excluded from the pool
        hits = np.flatnonzero(scores > 0)
        hits = hits[np.lexsort((hits, -scores[hits]))][:num_candidates]
        for rank, d in enumerate(hits, start=1):
            run_lines.append(f"{qid} Q0 {_did(int(d))} {rank} {scores[d]:.6f} {RUN_TAG}")
        grades, cov = world.grades(q)
        pairs = [q.source, *(int(d) for d in hits)]
        logits = (
            TEACHER_BIAS
            + TEACHER_GRADE * grades[pairs]
            + TEACHER_COVERAGE * cov[pairs]
            + TEACHER_QUERY_SD * rng.standard_normal()
            + TEACHER_NOISE_SD * rng.standard_normal(len(pairs))
        )
        teacher_lines += [f"{qid}\t{_did(d)}\t{s:.4f}" for d, s in zip(pairs, logits.tolist())]
    return qrels, run_lines, teacher_lines


def _write_manifest(bench: SyntheticBenchmark, params: dict[str, int], counts: dict[str, int]) -> None:
    """Written last: it records the parameters, counts and file hashes that `ensure_synthetic` verifies."""
    manifest = {
        "format": "beir",
        "generator": "retriever.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        **params,
        "counts": counts,
        "parameters": _generator_parameters(),
        "sha256": {rel: sha256_file(bench.root / rel) for rel in sorted(_FILES.values())},
    }
    bench.manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def ensure_synthetic(out_dir: Path, **params: int) -> SyntheticBenchmark:
    """Reuse ``out_dir`` when its manifest matches ``params`` (defaults of generate_synthetic) and every file
    verifies; otherwise generate it."""
    full = {"seed": 0, "num_docs": 2000, "num_train_queries": 800, "num_test_queries": 200}
    full |= {"num_candidates": 50, "num_topics": 20} | params
    unknown = set(full) - set(_PARAM_KEYS)
    if unknown:
        raise TypeError(f"unknown synthetic parameters {sorted(unknown)}; known: {list(_PARAM_KEYS)}")
    manifest_path = Path(out_dir) / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            same = manifest.get("generator_version") == GENERATOR_VERSION and all(
                manifest.get(k) == v for k, v in full.items()
            )
            if same:
                return SyntheticBenchmark.from_dir(Path(out_dir), verify=True)
        except (ValueError, KeyError):
            pass  # corrupt or changed folder: regenerate below
    return generate_synthetic(Path(out_dir), **full)


# --------------------------------------------------------------------------------------------------------------
# generative model


@dataclass(frozen=True)
class _Query:
    source: int
    concepts: tuple[int, ...]  # concept ids, in sampling order
    tokens: tuple[str, ...]  # rendered words, in query order
    text: str


class _World:
    """Vocabulary and documents of one benchmark; holds what the relevance grades are defined on."""

    def __init__(self, rng: np.random.Generator, num_docs: int, num_topics: int) -> None:
        self.num_docs = num_docs
        self.num_topics = num_topics
        words = _WordMaker()

        # concepts: topical ones first (topic t owns ids t*C .. t*C+C-1), then background ones
        n_topical = num_topics * CONCEPTS_PER_TOPIC
        n_syn = rng.choice(3, size=n_topical, p=np.asarray(SYNONYM_COUNT_PROBS)) + 1
        self.surfaces: list[list[str]] = [[words.word(rng) for _ in range(int(k))] for k in n_syn]
        self.background = [words.word(rng) for _ in range(BACKGROUND_WORDS)]
        self.concept_p = _zipf(CONCEPTS_PER_TOPIC, CONCEPT_ZIPF)
        self.background_p = _zipf(BACKGROUND_WORDS, 1.0)

        # documents
        self.topic = rng.permutation(np.arange(num_docs) % num_topics)
        docs_per_topic = np.bincount(self.topic, minlength=num_topics)
        n_entities = np.maximum(1, np.rint(docs_per_topic / DOCS_PER_ENTITY).astype(int))
        entity_offset = np.concatenate([[0], np.cumsum(n_entities)])
        self.entity_names = [words.word(rng, syllables=3, coda=True) for _ in range(int(entity_offset[-1]))]
        self.id_codes = [words.id_code(rng) for _ in range(num_docs)]

        self.doc_concepts: list[dict[int, int]] = []  # concept id -> count, in insertion order
        self.doc_surface: list[dict[int, str]] = []  # concept id -> the synonym this document uses
        self.doc_entities: list[list[int]] = []  # primary entity first
        self.titles: list[str] = []
        self.texts: list[str] = []
        for d in range(num_docs):
            t = int(self.topic[d])
            concepts = self._sample_concepts(rng, t, int(rng.integers(5, 10)))
            if rng.random() < P_SECONDARY_TOPIC and num_topics > 1:
                u = int((t + rng.integers(1, num_topics)) % num_topics)
                concepts += [c for c in self._sample_concepts(rng, u, int(rng.integers(2, 4))) if c not in concepts]
            counts = {c: int(k) for c, k in zip(concepts, 1 + rng.binomial(2, 0.35, size=len(concepts)))}
            surface = {c: self.surfaces[c][self._doc_synonym(rng, c)] for c in concepts}
            lo, hi = int(entity_offset[t]), int(entity_offset[t + 1])
            entities = [int(rng.integers(lo, hi))]
            if rng.random() < P_SECOND_ENTITY and hi - lo > 1:
                second = int(rng.integers(lo, hi - 1))
                entities.append(second + (second >= entities[0]))
            bag = [surface[c] for c in concepts for _ in range(counts[c])]
            bag += [
                self.background[i]
                for i in rng.choice(BACKGROUND_WORDS, int(rng.integers(12, 25)), p=self.background_p)
            ]
            bag += [self.entity_names[entities[0]]] * int(rng.integers(1, 3))
            bag += [self.entity_names[e] for e in entities[1:]] + [self.id_codes[d]]
            bag = [bag[i] for i in rng.permutation(len(bag))]
            top = sorted(concepts, key=lambda c: (-counts[c], concepts.index(c)))[:2]
            self.titles.append(" ".join([self.entity_names[entities[0]], *(surface[c] for c in top)]))
            self.texts.append(_sentences(bag, rng))
            self.doc_concepts.append(counts)
            self.doc_surface.append(surface)
            self.doc_entities.append(entities)

        # postings for the grades (doc ids ascending)
        self.concept_docs = _postings((list(dc) for dc in self.doc_concepts), n_topical)
        self.entity_docs = _postings(self.doc_entities, len(self.entity_names))

    def _sample_concepts(self, rng: np.random.Generator, topic: int, k: int) -> list[int]:
        picked = rng.choice(CONCEPTS_PER_TOPIC, size=k, replace=False, p=self.concept_p)
        return [topic * CONCEPTS_PER_TOPIC + int(i) for i in picked]

    def _doc_synonym(self, rng: np.random.Generator, concept: int) -> int:
        n = len(self.surfaces[concept])
        if n == 1:
            return 0
        p = np.asarray(SYNONYM_POPULARITY[:n])
        return int(rng.choice(n, p=p / p.sum()))

    def make_query(self, source: int, rng: np.random.Generator) -> _Query:
        counts = self.doc_concepts[source]
        ids = list(counts)
        weights = np.asarray([counts[c] for c in ids], dtype=float)
        m = min(len(ids), int(rng.integers(2, 5)))
        concepts = tuple(ids[int(i)] for i in rng.choice(len(ids), size=m, replace=False, p=weights / weights.sum()))
        tokens: list[str] = []
        for c in concepts:
            used = self.doc_surface[source][c]
            others = [s for s in self.surfaces[c] if s != used]
            swap = rng.random() < SYNONYM_SWAP
            tokens.append(others[int(rng.integers(len(others)))] if swap and others else used)
        if rng.random() < P_ENTITY:
            tokens.append(self.entity_names[self.doc_entities[source][0]])
        if rng.random() < P_ID_CODE:
            tokens.append(self.id_codes[source])
        if rng.random() < P_BACKGROUND:
            tokens.append(self.background[int(rng.integers(10))])
        tokens = [tokens[i] for i in rng.permutation(len(tokens))]
        return _Query(source=source, concepts=concepts, tokens=tuple(tokens), text=" ".join(tokens))

    def grades(self, q: _Query) -> tuple[np.ndarray, np.ndarray]:
        """Graded relevance (0–3) and concept coverage of every document for query ``q`` (module docstring)."""
        hits = np.zeros(self.num_docs, dtype=np.int64)
        for c in q.concepts:
            hits[self.concept_docs[c]] += 1
        cov = hits / len(q.concepts)
        shares = np.zeros(self.num_docs, dtype=bool)
        shares[self.entity_docs[self.doc_entities[q.source][0]]] = True
        grades = np.where(shares | ((hits >= 2) & (cov >= 0.5)), 1, 0)
        grades = np.where((shares & (cov >= 0.5)) | (cov == 1.0), 2, grades)
        grades[q.source] = 3
        return grades.astype(np.int64), cov

    def doc_tokens(self) -> list[list[str]]:
        return [f"{title} {text}".replace(".", " ").split() for title, text in zip(self.titles, self.texts)]

    def corpus_line(self, d: int) -> str:
        return json.dumps({"_id": _did(d), "title": self.titles[d], "text": self.texts[d]})

    def lexicon_lines(self) -> list[str]:
        lines = ["surface\tconcept\tkind"]
        for c, surfaces in enumerate(self.surfaces):
            lines += [f"{s}\tc{c:05d}\ttopic{c // CONCEPTS_PER_TOPIC:03d}" for s in surfaces]
        lines += [f"{s}\tb{i:05d}\tbackground" for i, s in enumerate(self.background)]
        lines += [f"{s}\te{i:05d}\tentity" for i, s in enumerate(self.entity_names)]
        lines += [f"{s}\t{_did(d)}\tid" for d, s in enumerate(self.id_codes)]
        return lines


class _WordMaker:
    """Unique made-up words from consonant–vowel syllables (pronounceable, not English)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()  # membership only, never iterated

    def word(self, rng: np.random.Generator, *, syllables: int | None = None, coda: bool = False) -> str:
        while True:
            n = syllables if syllables is not None else int(rng.integers(2, 4))
            parts = [
                _CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(n)
            ]
            if coda or rng.random() < 0.25:
                parts.append(_CODAS[rng.integers(len(_CODAS))])
            w = "".join(parts)
            if w not in self._seen:
                self._seen.add(w)
                return w

    def id_code(self, rng: np.random.Generator) -> str:
        while True:
            letters = "".join(_ID_LETTERS[i] for i in rng.integers(len(_ID_LETTERS), size=2))
            w = f"{letters}{int(rng.integers(10_000)):04d}"
            if w not in self._seen:
                self._seen.add(w)
                return w


class _Bm25:
    """BM25 over whitespace tokens, summed term by term in a fixed order (deterministic to the last bit)."""

    def __init__(self, docs: list[list[str]]) -> None:
        n = len(docs)
        lengths = np.asarray([len(toks) for toks in docs], dtype=np.float64)
        norm = BM25_K1 * (1.0 - BM25_B + BM25_B * lengths / lengths.mean())
        tf: dict[str, dict[int, int]] = {}
        for d, toks in enumerate(docs):
            for tok in toks:
                row = tf.setdefault(tok, {})
                row[d] = row.get(d, 0) + 1
        self.n = n
        self.postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for term, row in tf.items():
            ids = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
            counts = np.fromiter(row.values(), dtype=np.float64, count=len(row))
            idf = math.log(1.0 + (n - len(row) + 0.5) / (len(row) + 0.5))
            self.postings[term] = (ids, idf * counts * (BM25_K1 + 1.0) / (counts + norm[ids]))

    def scores(self, query: tuple[str, ...]) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float64)
        for term in dict.fromkeys(query):  # unique terms, query order
            if term in self.postings:
                ids, weights = self.postings[term]
                out[ids] += weights
        return out


# --------------------------------------------------------------------------------------------------------------
# helpers


def _check_sizes(num_docs: int, n_train: int, n_test: int, num_candidates: int, num_topics: int) -> None:
    for name, value in [("num_docs", num_docs), ("num_candidates", num_candidates), ("num_topics", num_topics)]:
        if value < 1:
            raise SettingError(f"{name} must be ≥ 1, got {value}")
    if n_train < 0 or n_test < 0:
        raise SettingError(f"query counts must be ≥ 0, got num_train_queries={n_train}, num_test_queries={n_test}")
    if n_test >= num_docs:
        raise SettingError(
            f"every test query needs its own source document and training needs at least one more: "
            f"num_test_queries = {n_test} >= num_docs = {num_docs}; raise num_docs or lower num_test_queries "
            "(data.synthetic_docs, data.synthetic_test_queries in a config)"
        )


def _generator_parameters() -> dict[str, Any]:
    """The module constants, recorded in the manifest so a folder says how it was made."""
    return {
        "concepts_per_topic": CONCEPTS_PER_TOPIC,
        "background_words": BACKGROUND_WORDS,
        "synonym_count_probs": list(SYNONYM_COUNT_PROBS),
        "synonym_popularity": list(SYNONYM_POPULARITY),
        "concept_zipf": CONCEPT_ZIPF,
        "docs_per_entity": DOCS_PER_ENTITY,
        "p_secondary_topic": P_SECONDARY_TOPIC,
        "p_second_entity": P_SECOND_ENTITY,
        "synonym_swap": SYNONYM_SWAP,
        "p_entity": P_ENTITY,
        "p_id_code": P_ID_CODE,
        "p_background": P_BACKGROUND,
        "bm25_k1": BM25_K1,
        "bm25_b": BM25_B,
        "teacher_bias": TEACHER_BIAS,
        "teacher_grade": TEACHER_GRADE,
        "teacher_coverage": TEACHER_COVERAGE,
        "teacher_query_sd": TEACHER_QUERY_SD,
        "teacher_noise_sd": TEACHER_NOISE_SD,
    }


def _zipf(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return w / w.sum()


def _sentences(words: list[str], rng: np.random.Generator) -> str:
    out: list[str] = []
    i = 0
    while i < len(words):
        k = int(rng.integers(6, 13))
        out.append(" ".join(words[i : i + k]) + ".")
        i += k
    return " ".join(out)


def _postings(rows: Any, size: int) -> list[np.ndarray]:
    lists: list[list[int]] = [[] for _ in range(size)]
    for d, items in enumerate(rows):
        for item in items:
            lists[item].append(d)
    return [np.asarray(x, dtype=np.int64) for x in lists]


def _did(d: int) -> str:
    return f"doc-{d + 1:06d}"


def _qid(split: str, i: int) -> str:
    return f"{split}-{i + 1:06d}"


def _write_lines(path: Path, lines: Any) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line)
            f.write("\n")


__all__ = ["SyntheticBenchmark", "ensure_synthetic", "generate_synthetic"]
