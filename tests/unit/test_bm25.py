"""BM25 (`retriever.bm25`): exact scores on a hand-computed corpus and the ranking rules (its reference numbers on
the default synthetic benchmark are checked with the BM25 baseline, test_report_baselines.py)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from retriever.bm25 import K1, B, Bm25Index, _TermCounts, tokenize

# N = 3 documents of lengths 3, 3, 2: avgdl = 8/3
DOCS = [("d1", "a b c"), ("d2", "a a d"), ("d3", "b e")]


def _lucene(tf: int, df: int, length: int, n: int = 3, avgdl: float = 8 / 3) -> float:
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    return idf * tf / (tf + K1 * (1 - B + B * length / avgdl))


def test_scores_match_the_lucene_formula_by_hand() -> None:
    index = Bm25Index(DOCS)
    assert (K1, B) == (0.9, 0.4) and index.num_docs == 3
    # "a": df 2, idf ln(1.6); d1 tf 1, d2 tf 2, both of length 3
    assert _lucene(1, 2, 3) == pytest.approx(math.log(1.6) / (1 + 0.9 * 1.05))
    assert index.scores("a").tolist() == pytest.approx([_lucene(1, 2, 3), _lucene(2, 2, 3), 0.0], rel=1e-6)
    # "b e": b has df 2 (d1, d3), e df 1 (d3, length 2)
    expected = [_lucene(1, 2, 3), 0.0, _lucene(1, 2, 2) + _lucene(1, 1, 2)]
    assert index.scores("b e").tolist() == pytest.approx(expected, rel=1e-6)
    # a repeated query token counts once per occurrence (Anserini's bag of words); unknown tokens are ignored
    assert index.scores("e e zzz").tolist() == pytest.approx([0.0, 0.0, 2 * _lucene(1, 1, 2)], rel=1e-6)


def test_search_ranks_positive_scores_in_trec_order() -> None:
    index = Bm25Index(DOCS)
    run = index.search({"q1": "a", "q2": "b e", "q3": "zzz", "q4": ""}, k=10)
    assert list(run["q1"]) == ["d2", "d1"]  # only documents sharing a token
    assert run["q1"]["d2"] == pytest.approx(_lucene(2, 2, 3), rel=1e-6)
    assert list(run["q2"]) == ["d3", "d1"]
    assert run["q3"] == {} and run["q4"] == {}
    assert list(index.search({"q": "b e"}, k=1)["q"]) == ["d3"]


def test_ties_follow_trec_eval_order_across_the_cut() -> None:
    # identical documents tie: trec_eval orders them by doc id descending, also when the cut falls inside the tie
    index = Bm25Index([(f"doc{i}", "x y") for i in range(5)] + [("other", "z")])
    assert list(index.top_k("x", 3)) == ["doc4", "doc3", "doc2"]
    assert list(index.top_k("x z", 2)) == ["other", "doc4"]  # z is rarer, so "other" scores higher


def test_tokens_are_whitespace_split_only() -> None:
    assert tokenize("Word. word\tWORD\n  x-y ") == ["Word.", "word", "WORD", "x-y"]
    index = Bm25Index([("d1", "Word."), ("d2", "word")])
    assert list(index.top_k("word", 5)) == ["d2"]  # no lowercasing, punctuation stays attached


def test_bad_input_fails_clearly() -> None:
    with pytest.raises(ValueError, match="at least one document"):
        Bm25Index([])
    with pytest.raises(ValueError, match="at least one token; all 2 documents are empty"):
        Bm25Index([("d1", ""), ("d2", "  ")])
    with pytest.raises(ValueError, match="duplicate doc_id 'd1'"):
        Bm25Index([("d1", "a"), ("d1", "b")])
    with pytest.raises(TypeError, match=r"document 1: expected a \(doc_id, text\) pair"):
        Bm25Index([("d1", "a"), "d2 b"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="non-empty str"):
        Bm25Index([(1, "a")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="k1 >= 0 and 0 <= b <= 1"):
        Bm25Index(DOCS, b=1.5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        Bm25Index(DOCS).top_k("a", 0)
    with pytest.raises(TypeError, match="queries must map str"):
        Bm25Index(DOCS).search({"q": None}, 5)  # type: ignore[dict-item]


def test_a_saved_index_loads_memory_mapped_and_searches_the_same(tmp_path) -> None:
    import numpy as np

    from retriever.bm25 import read_index_meta
    from retriever.errors import IntegrityError

    docs = [*DOCS, ("d4", "a b e e f"), ("d5", "f g")]
    index = Bm25Index(docs)
    folder = index.save(tmp_path / "bm25")
    meta = read_index_meta(folder)
    assert (meta["k1"], meta["b"], meta["num_docs"]) == (K1, B, 5) and "doc_ids.npy" in meta["sha256"]
    loaded = Bm25Index.load(folder)
    assert isinstance(loaded.doc_ids, np.memmap)  # mapped, not read
    queries = {"q1": "a b", "q2": "e f g", "q3": "a a d e", "q4": "unknown"}
    assert loaded.search(queries, 3) == index.search(queries, 3)
    with pytest.raises(Exception, match="already holds a BM25 index"):
        index.save(folder)
    (folder / "doc_ids.npy").write_bytes((folder / "doc_ids.npy").read_bytes()[:-4] + b"zzzz")
    with pytest.raises(IntegrityError, match=r"doc_ids.npy: missing or changed since the BM25 index was saved"):
        Bm25Index.load(folder)
    (folder / "bm25.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"bm25.json: no BM25 index here"):
        Bm25Index.load(folder)


@pytest.mark.parametrize("chunk_docs", [1, 7, 65_536])
def test_the_score_matrix_is_bm25s_own_value_for_value(monkeypatch, chunk_docs: int) -> None:
    """The streamed numpy build against ``bm25s.BM25(method="lucene").index`` on the same token ids: identical
    arrays (bit for bit) and vocabulary, whatever the chunking; empty documents and repeated tokens included."""
    import bm25s

    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    docs = [(f"d{i}", " ".join(rng.choices(words[: rng.randint(1, 300)], k=rng.randint(0, 60)))) for i in range(500)]
    docs += [("empty", ""), ("spaces", "   "), ("repeat", "w1 w1 w1 w2")]
    monkeypatch.setattr(_TermCounts, "CHUNK_DOCS", chunk_docs)
    ours = Bm25Index(docs)._model
    vocab: dict[str, int] = {}
    token_ids = [[vocab.setdefault(t, len(vocab)) for t in tokenize(text)] for _, text in docs]
    reference = bm25s.BM25(k1=K1, b=B, method="lucene", dtype="float32")
    reference.index((token_ids, vocab), show_progress=False)
    assert ours.vocab_dict == reference.vocab_dict and "" in ours.vocab_dict
    assert ours.scores["num_docs"] == reference.scores["num_docs"] == len(docs)
    for name in ("data", "indices", "indptr"):
        mine, theirs = ours.scores[name], reference.scores[name]
        assert mine.dtype == theirs.dtype and mine.tobytes() == theirs.tobytes(), name
    query = [vocab["w1"], vocab["w2"], vocab["w5"]]
    assert np.array_equal(ours.get_scores(query), reference.get_scores(query))
