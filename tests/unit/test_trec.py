"""TREC run and qrels files (`retriever.trec`): reading, writing in trec_eval order, errors naming file and line."""

import gzip
from pathlib import Path

import pytest

from retriever.trec import TrecFormatError, read_qrels, read_run, trec_order, write_run


def test_trec_order_breaks_ties_by_docid_descending() -> None:
    # Ties sorted by string comparison, descending: "9" > "10" > "1"; the higher score still comes first.
    docs = {"1": 0.5, "10": 0.5, "9": 0.5, "2": 0.7, "a": 0.1}
    assert trec_order(docs) == [("2", 0.7), ("9", 0.5), ("10", 0.5), ("1", 0.5), ("a", 0.1)]
    with pytest.raises(TrecFormatError, match="non-finite"):
        trec_order({"a": float("nan")})


def _write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_read_run_and_qrels(tmp_path: Path) -> None:
    run_text = "q1 Q0 d1 1 2.5 tag\n\nq1 Q0 d2 2 -1e-3 tag\nq2 Q0 d1 1 7 tag\n"
    for name in ("run.txt", "run.txt.gz"):
        assert read_run(_write(tmp_path / name, run_text)) == {"q1": {"d1": 2.5, "d2": -0.001}, "q2": {"d1": 7.0}}
    # The second column is ignored: DL19's qrels use "Q0", most others "0".
    qrels_text = "q1 0 d1 2\nq1 Q0 d2 0\nq2 0 d3 -1\n"
    for name in ("qrels.txt", "qrels.txt.gz"):
        assert read_qrels(_write(tmp_path / name, qrels_text)) == {"q1": {"d1": 2, "d2": 0}, "q2": {"d3": -1}}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("q1 Q0 d2 2 0.5", "expected 6 whitespace-separated fields 'qid Q0 docid rank score tag', got 5"),
        ("q1 Q0 d2 two 0.5 tag", "rank (field 4) must be an integer, got 'two'"),
        ("q1 Q0 d2 2 high tag", "score (field 5) must be a number, got 'high'"),
        ("q1 Q0 d2 2 nan tag", "score (field 5) must be finite"),
        ("q1 Q0 d1 2 0.5 tag", "duplicate document 'd1' for query 'q1' (first at line 1)"),
    ],
)
@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_malformed_run_errors_name_file_and_line(tmp_path: Path, bad_line: str, message: str, suffix: str) -> None:
    path = _write(tmp_path / f"run{suffix}", f"q1 Q0 d1 1 0.9 tag\n\n{bad_line}\n")
    with pytest.raises(TrecFormatError) as err:
        read_run(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("q1 0 d2", "expected 4 whitespace-separated fields 'qid 0 docid grade', got 3"),
        ("q1 0 d2 1.5", "relevance grade (field 4) must be an integer, got '1.5'"),
        ("q1 0 d1 1", "duplicate judgment of document 'd1' for query 'q1' (first at line 1)"),
    ],
)
def test_malformed_qrels_errors_name_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = _write(tmp_path / "qrels.txt", f"q1 0 d1 1\nq1 0 d3 0\n{bad_line}\n")
    with pytest.raises(TrecFormatError) as err:
        read_qrels(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_missing_or_bad_gzip_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_run(tmp_path / "absent.trec")
    plain = tmp_path / "plain.trec.gz"
    plain.write_text("q1 Q0 d1 1 0.9 tag\n")
    with pytest.raises(TrecFormatError, match="not a gzip file"):
        read_run(plain)


def test_write_run_ranks_in_trec_eval_order(tmp_path: Path) -> None:
    run = {"q2": {"b": 1.0, "a": 1.0, "c": 3.25}, "q1": {"x": 0.1}}
    for name in ("out/run.trec", "out/run.trec.gz"):
        path = tmp_path / name
        write_run(run, path, tag="mine")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            lines = f.read().splitlines()
        assert lines == [
            "q1 Q0 x 1 0.1 mine",
            "q2 Q0 c 1 3.25 mine",
            "q2 Q0 b 2 1.0 mine",
            "q2 Q0 a 3 1.0 mine",
        ]
        assert read_run(path) == run
    write_run(run, tmp_path / "top1.trec", tag="t", depth=1)
    assert read_run(tmp_path / "top1.trec") == {"q1": {"x": 0.1}, "q2": {"c": 3.25}}
    with pytest.raises(TrecFormatError, match="without whitespace"):
        write_run({"q 1": {"a": 1.0}}, tmp_path / "bad.trec", tag="t")
    with pytest.raises(TrecFormatError, match="run tag"):
        write_run(run, tmp_path / "bad.trec", tag="two words")
