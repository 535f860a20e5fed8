"""Training examples: exact rows from hand-written files, the teacher formats (3-column, MarginMSE; pickles and
binary files refused), bad-input errors, schema checks, folders of shards, negative sampling."""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retriever.data.examples import (
    build_synthetic_examples,
    build_training_examples,
    read_training_examples,
    sample_negatives,
    training_examples_schema,
)
from retriever.data.synthetic import generate_synthetic

DOCS = {"d1": "alpha text", "d2": "beta text", "d3": "gamma text", "d4": "delta text", "d5": "epsilon text"}
QUERIES = [
    '{"_id": "q1", "text": "first query"}',
    '{"_id": "q2", "text": "second query"}',
    '{"_id": "q3", "text": "x"}',
]
QRELS = ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\td3\t0", "q2\td2\t2", "q2\td4\t1", "q3\td5\t0"]
RUN = [
    "q1 Q0 d2 1 9.5 bm25",
    "q1 Q0 d1 2 9.0 bm25",
    "q1 Q0 d3 3 8.0 bm25",
    "q1 Q0 d4 4 7.0 bm25",
    "q2 Q0 d5 3 4.0 bm25",  # ranks out of file order: the builder follows the rank column
    "q2 Q0 d4 1 6.0 bm25",
    "q2 Q0 d1 2 5.0 bm25",
    "q2 Q0 d3 4 3.0 bm25",
]
# scores exactly representable in float32
TEACHER = [
    "q1\td1\t4.5",
    "q1\td2\t-1.25",
    "q1\td3\t0.5",
    "q1\td4\t-3.0",
    "q2\td2\t6.0",
    "q2\td4\t2.25",
    "q2\td1\t-0.75",
    "q2\td5\t-2.5",
    "q2\td3\t1.125",
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "queries": _write(tmp_path / "queries.jsonl", QUERIES),
        "qrels": _write(tmp_path / "qrels.tsv", QRELS),
        "run": _write(tmp_path / "run.trec", RUN),
        "teacher": _write(tmp_path / "teacher.tsv", TEACHER),
    }


def _build(files: dict[str, Path], tmp_path: Path, **kwargs):  # type: ignore[no-untyped-def]
    args = {"teacher": files["teacher"], **kwargs}
    return build_training_examples(
        files["qrels"], files["run"], files["queries"], DOCS, tmp_path / "ex.parquet", **args
    )


COLUMNS = ("query_id", "query", "positive_id", "positive", "negative_ids", "negatives", "teacher_pos", "teacher_negs")
Q1_NEGATIVES = (["d2", "d3", "d4"], ["beta text", "gamma text", "delta text"])
Q2_NEGATIVES = (["d1", "d5", "d3"], ["alpha text", "epsilon text", "gamma text"])
EXPECTED_ROWS = [
    dict(zip(COLUMNS, row))
    for row in (
        ("q1", "first query", "d1", "alpha text", *Q1_NEGATIVES, 4.5, [-1.25, 0.5, -3.0]),
        ("q2", "second query", "d2", "beta text", *Q2_NEGATIVES, 6.0, [-0.75, -2.5, 1.125]),
        ("q2", "second query", "d4", "delta text", *Q2_NEGATIVES, 2.25, [-0.75, -2.5, 1.125]),
    )
]


def test_exact_rows_rank_order_and_teacher_alignment(
    files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="retriever.data.examples"):
        report = _build(files, tmp_path, num_negatives=16)
    table = read_training_examples(report.path)
    assert table.to_pylist() == EXPECTED_ROWS
    assert table.schema.field("teacher_pos").type == pa.float32()
    assert (report.rows, report.queries, report.with_teacher, report.inline_text) == (3, 2, True, True)
    assert (report.min_negatives, report.mean_negatives, report.max_negatives) == (3, 3.0, 3)
    assert report.rows_below_num_negatives == 3
    assert "3 of 3 rows have fewer than 16 hard negatives" in caplog.text
    assert "where the pool allows" in caplog.text


def test_no_warning_when_every_pool_is_large_enough(
    files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="retriever.data.examples"):
        report = _build(files, tmp_path, num_negatives=3)
    assert report.rows_below_num_negatives == 0 and caplog.text == ""


def test_max_candidates_caps_the_pool_after_removing_positives(files: dict[str, Path], tmp_path: Path) -> None:
    report = _build(files, tmp_path, max_candidates=2)
    rows = read_training_examples(report.path).to_pylist()
    assert [r["negative_ids"] for r in rows] == [["d2", "d3"], ["d1", "d5"], ["d1", "d5"]]
    assert [r["teacher_negs"] for r in rows] == [[-1.25, 0.5], [-0.75, -2.5], [-0.75, -2.5]]
    assert (report.min_negatives, report.max_negatives) == (2, 2)


def test_ids_only_and_without_teacher(files: dict[str, Path], tmp_path: Path) -> None:
    report = _build(files, tmp_path, teacher=None, inline_text=False)
    table = read_training_examples(report.path)
    assert table.column_names == ["query_id", "query", "positive_id", "negative_ids", "teacher_pos", "teacher_negs"]
    rows = table.to_pylist()
    assert [(r["positive_id"], r["negative_ids"]) for r in rows] == [
        ("d1", ["d2", "d3", "d4"]),
        ("d2", ["d1", "d5", "d3"]),
        ("d4", ["d1", "d5", "d3"]),
    ]
    assert all(r["teacher_pos"] is None and r["teacher_negs"] is None for r in rows)
    assert not report.with_teacher and not report.inline_text


class _Doc(NamedTuple):
    doc_id: str
    title: str
    text: str

    def default_text(self) -> str:
        return f"{self.title} {self.text}"


class _Store:
    """Like an ir_datasets docs store: .get raises KeyError for unknown ids and returns document tuples."""

    def get(self, doc_id: str) -> _Doc:
        return _Doc(doc_id, "T", DOCS[doc_id])


def test_other_input_formats_give_the_same_rows(files: dict[str, Path], tmp_path: Path) -> None:
    trec_qrels = _write(tmp_path / "qrels.txt", [line.replace("\t", " 0 ", 1) for line in QRELS[1:]])
    tsv_queries = _write(tmp_path / "queries.tsv", ["q1\tfirst query", "q2\tsecond query", "q3\tx"])
    from_files = build_training_examples(
        trec_qrels, files["run"], tsv_queries, DOCS, tmp_path / "a.parquet", teacher=files["teacher"]
    )
    qrels = {"q1": {"d1": 1, "d3": 0}, "q2": {"d2": 2, "d4": 1}}
    queries = {"q1": "first query", "q2": "second query"}
    from_dicts = build_training_examples(
        qrels, files["run"], queries, DOCS, tmp_path / "b.parquet", teacher=files["teacher"]
    )
    assert read_training_examples(from_files.path).to_pylist() == EXPECTED_ROWS
    assert read_training_examples(from_dicts.path).to_pylist() == EXPECTED_ROWS
    store = build_training_examples(qrels, files["run"], queries, _Store(), tmp_path / "c.parquet")
    rows = read_training_examples(store.path).to_pylist()
    assert rows[0]["positive"] == "T alpha text" and rows[0]["negatives"][0] == "T beta text"


@pytest.mark.parametrize(
    ("name", "line_no", "new_line", "message"),
    [
        ("qrels", 3, "q1\td9\t0", "qrels.tsv:3: unknown document id 'd9'"),
        ("qrels", 2, "q1\td1", "qrels.tsv:2: expected 3 columns (query-id corpus-id score) or 4"),
        ("qrels", 4, "q2\td2\t2\textra", "qrels.tsv:4: expected 3 columns like the first line, got 4"),
        ("qrels", 4, "q2\td2\thigh", "qrels.tsv:4: expected an integer relevance grade, got 'high'"),
        ("qrels", 3, "q1\td1\t1", "qrels.tsv:3: duplicate judgment of 'd1' for query 'q1' (first at line 2)"),
        ("run", 7, "q2 Q0 d7 3 4.0 bm25", "run.trec:7: unknown document id 'd7'"),
        ("run", 2, "q1 Q0 d1 2 9.0", "run.trec:2: expected a TREC run line 'qid Q0 docid rank score tag'"),
        ("run", 3, "q1 Q0 d3 third 8.0 bm25", "run.trec:3: expected an integer rank (column 4), got 'third'"),
        ("run", 3, "q1 Q0 d3 3 high bm25", "run.trec:3: expected a number as score (column 5), got 'high'"),
        ("run", 3, "q1 Q0 d2 3 8.0 bm25", "run.trec:3: document 'd2' listed twice for query 'q1' (first at line 1)"),
        ("teacher", 5, "q2\td6\t6.0", "teacher.tsv:5: unknown document id 'd6'"),
        ("teacher", 2, "q1\td2\tnan", "teacher.tsv:2: teacher score is 'nan'; scores must be finite"),
        ("teacher", 2, "q1\td2\t-inf", "teacher.tsv:2: teacher score is '-inf'; scores must be finite"),
        ("teacher", 2, "q1\td2\tlow", "teacher.tsv:2: expected a number as teacher score (column 3), got 'low'"),
        ("teacher", 2, "q1\td2", "teacher.tsv:2: expected 3 columns (qid docid score) like the first line"),
        ("teacher", 3, "q1\td2\t0.0", "teacher.tsv:3: duplicate teacher score for ('q1', 'd2')"),
        ("queries", 3, '{"_id": "q1", "text": "again"}', "queries.jsonl:3: duplicate query id 'q1' (first at line 1)"),
        ("queries", 2, '{"id": "q2", "text": "second"}', 'queries.jsonl:2: expected a JSON object with "_id"'),
    ],
)
def test_bad_input_names_file_and_line(
    files: dict[str, Path], tmp_path: Path, name: str, line_no: int, new_line: str, message: str
) -> None:
    lines = files[name].read_text().splitlines()
    lines[line_no - 1] = new_line
    _write(files[name], lines)
    with pytest.raises(ValueError) as err:
        _build(files, tmp_path)
    assert str(err.value).startswith(str(files[name].parent / message.split(":")[0]) + ":")
    assert message in str(err.value)


# The TEACHER scores as MarginMSE triples (pos_score neg_score qid pid_pos pid_neg): every positive of a query with
# every other scored document, so positives repeat on many lines; one line space-separated, one repeat printed
# differently but equal within the tolerance.
MARGIN_MSE = [
    "4.5\t-1.25\tq1\td1\td2",
    "4.5 0.5 q1 d1 d3",
    "4.50000001\t-3.0\tq1\td1\td4",
    *(
        f"{pos_score}\t{neg_score}\tq2\t{pos}\t{neg}"
        for pos, pos_score in (("d2", 6.0), ("d4", 2.25))
        for neg, neg_score in (("d1", -0.75), ("d5", -2.5), ("d3", 1.125))
    ),
]


def test_margin_mse_teacher_gives_the_same_rows_as_the_three_column_file(
    files: dict[str, Path], tmp_path: Path
) -> None:
    margin = _write(tmp_path / "margin.tsv", MARGIN_MSE)
    from_triples = build_training_examples(
        files["qrels"], files["run"], files["queries"], DOCS, tmp_path / "m.parquet", teacher=margin
    )
    from_pairs = _build(files, tmp_path)
    assert read_training_examples(from_triples.path).to_pylist() == EXPECTED_ROWS
    assert read_training_examples(from_pairs.path).to_pylist() == EXPECTED_ROWS
    assert from_triples.with_teacher


@pytest.mark.parametrize(
    ("line_no", "new_line", "message"),
    [
        (
            6,
            "6.5\t1.125\tq2\td2\td3",
            "margin.tsv:6: teacher score 6.5 for ('q2', 'd2') differs from 6.0 at {dir}/margin.tsv:4;",
        ),
        (
            7,
            "2.25\t-0.7\tq2\td4\td1",
            "margin.tsv:7: teacher score -0.7 for ('q2', 'd1') differs from -0.75 at {dir}/margin.tsv:4;",
        ),
        (
            2,
            "q1\td3\t0.5",
            "margin.tsv:2: expected 5 columns (MarginMSE: pos_score neg_score qid pid_pos pid_neg) like the first "
            "line ({dir}/margin.tsv:1), got 3",
        ),
        (1, "4.5\t-1.25\tq1\td1", "margin.tsv:1: expected 3 columns (qid, docid, score) or 5 (MarginMSE: "),
        (2, "4.5\tinf\tq1\td1\td3", "margin.tsv:2: teacher score is 'inf'; scores must be finite"),
        (2, "high\t0.5\tq1\td1\td3", "margin.tsv:2: expected a number as teacher score (column 1), got 'high'"),
    ],
)
def test_bad_margin_mse_lines_name_file_and_line(
    files: dict[str, Path], tmp_path: Path, line_no: int, new_line: str, message: str
) -> None:
    lines = list(MARGIN_MSE)
    lines[line_no - 1] = new_line
    files["teacher"] = _write(tmp_path / "margin.tsv", lines)
    with pytest.raises(ValueError) as err:
        _build(files, tmp_path)
    assert str(err.value).startswith(f"{tmp_path}/" + message.format(dir=tmp_path))


def test_a_later_line_with_the_other_column_count_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    _write(files["teacher"], [*TEACHER[:3], "4.5\t-3.0\tq1\td1\td4", *TEACHER[4:]])
    with pytest.raises(
        ValueError,
        match=r"teacher.tsv:4: expected 3 columns \(qid docid score\) like the first line "
        r"\(.*teacher.tsv:1\), got 5",
    ):
        _build(files, tmp_path)


def test_a_pickled_teacher_is_refused_unread_and_the_hint_converts_it(files: dict[str, Path], tmp_path: Path) -> None:
    scores: dict[str, dict[str, float]] = {}
    for line in TEACHER:
        qid, docid, score = line.split("\t")
        scores.setdefault(qid, {})[docid] = float(score)
    pickled = tmp_path / "scores.bin"  # no telling name: the pickle header is enough
    pickled.write_bytes(pickle.dumps(scores))
    with pytest.raises(ValueError) as err:
        _build(files, tmp_path, teacher=pickled)
    text = str(err.value)
    assert text.startswith(
        f"{pickled}: a Python pickle (it starts with a pickle header); pickles are not read because "
        "loading one can run arbitrary code. Where the file is trusted, convert it once"
    )
    # The hint's command, run as printed (with this interpreter), makes a teacher file that builds the same rows.
    command = text.split(" pickle: ", 1)[1]
    assert command.startswith("python -c ")
    command = shlex.quote(sys.executable) + command.removeprefix("python")
    subprocess.run(command, shell=True, check=True, cwd=tmp_path)
    converted = _build(files, tmp_path, teacher=tmp_path / "teacher.tsv", overwrite=True)
    assert read_training_examples(converted.path).to_pylist() == EXPECTED_ROWS
    # The same for the published gzipped layout (.pkl.gz).
    zipped = tmp_path / "scores.pkl.gz"
    zipped.write_bytes(gzip.compress(pickle.dumps(scores)))
    with pytest.raises(ValueError, match=r"scores.pkl.gz: the name 'scores.pkl.gz' marks a gzipped Python pickle"):
        _build(files, tmp_path, teacher=zipped, overwrite=True)


def test_a_pkl_name_is_refused_even_with_text_content_as_protocol_0_pickles_are_text(
    files: dict[str, Path], tmp_path: Path
) -> None:
    named = _write(tmp_path / "teacher.pkl", TEACHER)
    with pytest.raises(
        ValueError,
        match=r"teacher.pkl: the name 'teacher.pkl' marks a Python pickle; .* If it is a "
        "text file, rename it",
    ):
        _build(files, tmp_path, teacher=named)
    protocol_0 = tmp_path / "teacher.pickle"
    protocol_0.write_bytes(pickle.dumps({"q1": {"d1": 1.0}}, protocol=0))
    assert protocol_0.read_bytes().isascii()
    with pytest.raises(ValueError, match="marks a Python pickle"):
        _build(files, tmp_path, teacher=protocol_0)


def test_compressed_and_binary_inputs_are_refused_by_their_first_bytes(files: dict[str, Path], tmp_path: Path) -> None:
    zipped = tmp_path / "teacher.tsv.gz"
    zipped.write_bytes(gzip.compress(files["teacher"].read_bytes()))
    with pytest.raises(
        ValueError,
        match=r"teacher.tsv.gz: gzip-compressed, expected a text file; decompress it first "
        r"\(gunzip -k .*teacher.tsv.gz\)",
    ):
        _build(files, tmp_path, teacher=zipped)
    files["qrels"].write_bytes("\n".join(QRELS).encode("utf-16-le"))
    with pytest.raises(ValueError, match=r"qrels.tsv: binary data \(a NUL byte at offset 1\), expected UTF-8 text"):
        _build(files, tmp_path)
    files["qrels"].write_bytes(pickle.dumps({"q1": {"d1": 1}}))
    with pytest.raises(ValueError, match=r"qrels.tsv: a Python pickle, expected a text file"):
        _build(files, tmp_path)


def test_missing_teacher_score_names_the_pair_and_where_it_is_needed(files: dict[str, Path], tmp_path: Path) -> None:
    _write(files["teacher"], [line for line in TEACHER if line != "q2\td5\t-2.5"])
    with pytest.raises(ValueError) as err:
        _build(files, tmp_path)
    text = str(err.value)
    assert text.startswith(f"{files['teacher']}: no teacher score for query 'q2' and document 'd5'")
    assert f"needed by {files['run']}:5" in text
    _write(files["teacher"], [line for line in TEACHER if line != "q2\td4\t2.25"])
    with pytest.raises(ValueError, match=r"document 'd4' \(needed by .*qrels.tsv:5\)"):
        _build(files, tmp_path)


def test_query_without_text_and_bad_parameters(files: dict[str, Path], tmp_path: Path) -> None:
    _write(files["queries"], QUERIES[:1])
    with pytest.raises(ValueError, match=r"qrels.tsv:4: query id 'q2' has no text in .*queries.jsonl"):
        _build(files, tmp_path)
    with pytest.raises(ValueError, match="num_negatives must be ≥ 1"):
        _build(files, tmp_path, num_negatives=0)
    with pytest.raises(ValueError, match="unknown document id 'd1'"):
        build_training_examples(files["qrels"], files["run"], files["queries"], {}, tmp_path / "x.parquet")
    with pytest.raises(FileNotFoundError, match="nope.trec: no such file"):
        build_training_examples(files["qrels"], tmp_path / "nope.trec", files["queries"], DOCS, tmp_path / "x.parquet")


def test_read_training_examples_names_missing_and_wrong_columns(files: dict[str, Path], tmp_path: Path) -> None:
    good = read_training_examples(_build(files, tmp_path).path)
    bad = good.drop_columns(["negative_ids", "negatives"]).set_column(
        good.schema.get_field_index("teacher_pos") - 2, "teacher_pos", pa.array(["1.0"] * good.num_rows)
    )
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(ValueError) as err:
        read_training_examples(tmp_path / "bad.parquet")
    text = str(err.value)
    assert "missing column 'negative_ids'" in text and "missing column 'negatives'" in text
    assert "column 'teacher_pos' is string, expected float" in text
    # misaligned teacher scores are caught too
    rows = good.to_pylist()
    rows[1]["teacher_negs"] = rows[1]["teacher_negs"][:2]
    pq.write_table(pa.Table.from_pylist(rows, schema=good.schema), tmp_path / "misaligned.parquet")
    with pytest.raises(ValueError, match="row 1: column 'teacher_negs' has a different length than 'negative_ids'"):
        read_training_examples(tmp_path / "misaligned.parquet")


def _shards(table: pa.Table, folder: Path, *parts: pa.Table) -> Path:
    """``parts`` (default: ``table`` cut after its first row) as part-0.parquet, part-1.parquet, ... in ``folder``."""
    folder.mkdir()
    for i, part in enumerate(parts or (table.slice(0, 1), table.slice(1))):
        pq.write_table(part, folder / f"part-{i}.parquet")
    return folder


def test_a_folder_of_shards_reads_as_the_file_it_was_cut_from(files: dict[str, Path], tmp_path: Path) -> None:
    whole = read_training_examples(_build(files, tmp_path).path)
    folder = _shards(whole, tmp_path / "shards")
    # Not shards: a manifest, hidden files, a nested folder (the folder is not searched recursively).
    (folder / "manifest.json").write_text("{}")
    (folder / ".part-9.parquet").write_text("not parquet")
    (folder / "_SUCCESS.parquet").write_text("")
    (folder / "nested").mkdir()
    pq.write_table(whole, folder / "nested" / "part-0.parquet")
    table = read_training_examples(folder)
    assert table.to_pylist() == whole.to_pylist() == EXPECTED_ROWS
    assert training_examples_schema(folder).names == whole.schema.names


def test_bad_shard_folders_name_the_folder_or_the_shard(files: dict[str, Path], tmp_path: Path) -> None:
    whole = read_training_examples(_build(files, tmp_path).path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match=r"empty: a folder without training-example shards \(no \*.parquet file"):
        read_training_examples(empty)
    with pytest.raises(FileNotFoundError, match="nowhere: no such training-examples file or folder"):
        read_training_examples(tmp_path / "nowhere")
    mistyped = whole.slice(1).set_column(0, "query_id", pa.array([1, 2]))
    folder = _shards(whole, tmp_path / "mistyped", whole.slice(0, 1), mistyped)
    message = r"mistyped/part-1.parquet: not a training-examples parquet: column 'query_id' is int64, expected string"
    for read in (read_training_examples, training_examples_schema):
        with pytest.raises(ValueError, match=message):
            read(folder)
    wider = whole.slice(1).set_column(6, "teacher_pos", whole.column("teacher_pos").slice(1).cast(pa.float64()))
    folder = _shards(whole, tmp_path / "mixed", whole.slice(0, 1), wider)
    message = (
        r"mixed/part-1.parquet: its columns differ from those of .*mixed/part-0.parquet \('teacher_pos' is double "
        r"there, float in the first\); the shards of one folder must share one schema"
    )
    for read in (read_training_examples, training_examples_schema):
        with pytest.raises(ValueError, match=message):
            read(folder)
    (folder / "part-1.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(ValueError, match=r"mixed/part-1.parquet: not a readable parquet file"):
        read_training_examples(folder)


def test_sample_negatives_is_deterministic_and_changes_per_epoch() -> None:
    pool = [f"d{i}" for i in range(50)]
    first = sample_negatives(pool, 16, epoch=0, seed=13, key="q1/d1")
    assert first == sample_negatives(pool, 16, epoch=0, seed=13, key="q1/d1")
    assert len(first) == 16 and len(set(first)) == 16 and all(0 <= i < 50 for i in first)
    epochs = [tuple(sample_negatives(pool, 16, epoch=e, seed=13, key="q1/d1")) for e in range(6)]
    assert len(set(epochs)) == 6
    assert sample_negatives(pool, 16, epoch=0, seed=14, key="q1/d1") != first
    assert sample_negatives(pool, 16, epoch=0, seed=13, key="q1/d2") != first
    # the whole pool, in a new order each epoch
    whole = [sample_negatives(pool[:5], 5, epoch=e, seed=0, key="k") for e in range(4)]
    assert all(sorted(w) == [0, 1, 2, 3, 4] for w in whole) and len({tuple(w) for w in whole}) > 1


def test_sample_negatives_small_pools_and_uniformity() -> None:
    small = sample_negatives(["a", "b", "c"], 8, epoch=1, seed=0, key="q")
    assert len(small) == 8 and sorted(small[:3]) == [0, 1, 2] and set(small) <= {0, 1, 2}
    assert sample_negatives(["a"], 0, epoch=0, seed=0, key="q") == []
    with pytest.raises(ValueError, match="row 'q' has no negatives"):
        sample_negatives([], 4, epoch=0, seed=0, key="q")
    counts = np.zeros(10, dtype=int)
    for e in range(2000):
        for i in sample_negatives(list(range(10)), 4, epoch=e, seed=1, key="q"):
            counts[i] += 1
    assert counts.sum() == 8000 and counts.min() > 700 and counts.max() < 900  # expected 800 each


def test_synthetic_examples_match_the_benchmark_files(tmp_path: Path) -> None:
    bench = generate_synthetic(
        tmp_path / "bench", seed=4, num_docs=200, num_train_queries=40, num_test_queries=10, num_candidates=12
    )
    report = build_synthetic_examples(bench, tmp_path / "train.parquet", num_negatives=4)
    table = read_training_examples(report.path)
    assert report.rows == report.queries == 40 == table.num_rows
    run: dict[str, list[str]] = {}
    for line in bench.candidates_train.read_text().splitlines():
        qid, _, docid, *_ = line.split()
        run.setdefault(qid, []).append(docid)
    teacher = {}
    for line in bench.teacher_train.read_text().splitlines():
        qid, docid, score = line.split("\t")
        teacher[(qid, docid)] = float(score)
    texts = {json.loads(line)["_id"]: json.loads(line)["text"] for line in bench.queries.read_text().splitlines()}
    docs = bench.docs()
    for row in table.to_pylist():
        qid = row["query_id"]
        assert row["query"] == texts[qid]
        assert row["negative_ids"] == run[qid] and row["positive_id"] not in row["negative_ids"]
        assert "negatives" not in row and "positive" not in row  # ids only: texts come from the corpus
        assert all(d in docs for d in [row["positive_id"], *row["negative_ids"]])
        assert row["teacher_pos"] == pytest.approx(teacher[(qid, row["positive_id"])], abs=1e-5)
        assert row["teacher_negs"] == pytest.approx([teacher[(qid, d)] for d in run[qid]], abs=1e-5)
