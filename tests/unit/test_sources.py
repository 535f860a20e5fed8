"""Sources: local BEIR/TREC/TSV/JSONL collections through ir_datasets, persistence, errors, offline failure."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import ir_datasets
import pytest
from conftest import REPO_ROOT
from ir_datasets.datasets.beir import BeirTitleDoc

from retriever.data.classic import smart_records
from retriever.data.local import (
    DataFormatError,
    register_beir_folder,
    register_trec,
    registry_file,
    unregister_local_dataset,
)
from retriever.data.sources import (
    BEIR_13,
    MSMARCO,
    DocTexts,
    IrDatasetsSource,
    Source,
    SourceUnavailableError,
    UnknownSourceError,
    cranfield_gain,
    doc_text,
    load_source,
    register_source_provider,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private IR_DATASETS_HOME (local registrations and their docs stores are resolved at call time)."""
    h = tmp_path / "irds_home"
    h.mkdir()
    monkeypatch.setenv("IR_DATASETS_HOME", str(h))
    return h


def beir_folder(root: Path) -> Path:
    jsonl(
        root / "corpus.jsonl",
        [
            {"_id": "d1", "title": "Title one", "text": "body one", "metadata": {}},
            {"_id": "d2", "title": "", "text": " body two "},
            {"_id": "d3", "text": "body three"},
        ],
    )
    jsonl(
        root / "queries.jsonl",
        [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}, {"_id": "q9", "text": "train only"}],
    )
    write(root / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td3\t2\nq2\td2\t1\n")
    write(root / "qrels" / "train.tsv", "query-id\tcorpus-id\tscore\nq9\td1\t1\n")
    return root


def run_python(code: str, env_updates: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env_updates}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )


# --------------------------------------------------------------------------------------------------- product ids


def test_product_ids_are_registered_in_ir_datasets() -> None:
    assert len(BEIR_13) == 13
    assert BEIR_13["arguana"] == "beir/arguana"
    assert BEIR_13["webis-touche2020"] == "beir/webis-touche2020/v2"
    assert BEIR_13["fiqa"] == "beir/fiqa/test"
    for dataset_id in [*BEIR_13.values(), *MSMARCO.values()]:
        dataset = ir_datasets.load(dataset_id)
        assert dataset.has_docs() and dataset.has_queries() and dataset.has_qrels(), dataset_id


def test_doc_text_joins_title_and_text() -> None:
    assert doc_text(BeirTitleDoc("a", "the text", "The Title")) == "The Title the text"
    assert doc_text(BeirTitleDoc("b", " the text ", "")) == "the text"
    assert doc_text(ir_datasets.formats.GenericDoc("c", "plain\n")) == "plain"
    assert doc_text(" as given ") == " as given "  # texts given as strings are taken as they are
    with pytest.raises(TypeError, match="cannot turn a int into text"):
        doc_text(7)


class _Store:
    """A docs store with ``get`` and ``get_many`` like ir_datasets' (``get_many`` leaves unknown ids out)."""

    def __init__(self, docs: dict[str, object]) -> None:
        self.docs = docs
        self.get_many_calls = 0

    def get(self, docid: str) -> object:
        return self.docs[docid]  # ir_datasets raises KeyError for an unknown id

    def get_many(self, ids: list[str]) -> dict[str, object]:
        self.get_many_calls += 1
        return {d: self.docs[d] for d in ids if d in self.docs}


def test_doc_texts_read_passages_one_way_from_any_store() -> None:
    docs = {"d1": BeirTitleDoc("d1", "body one", "Title"), "d2": BeirTitleDoc("d2", " body two ", "")}
    store = _Store(docs)
    texts = DocTexts(store, "the store")
    assert texts["d2"] == "body two"  # the text an index encodes (`doc_text`), not the raw default_text
    assert texts.get_many(["d2", "d1", "d2"]) == {"d2": "body two", "d1": "Title body one"}
    assert store.get_many_calls == 1  # one pass of the store's own get_many
    with pytest.raises(KeyError, match="document 'd9' is not in the store"):
        texts["d9"]
    with pytest.raises(DataFormatError, match=r"query 'q3': unknown document id 'd9' \(not in the store\)"):
        texts.get_many(["d1", "d9"], {"d9": "query 'q3'"})
    mapping = DocTexts({"a": "alpha", "b": "beta"}, "the mapping")
    assert mapping.get_many(["b", "a"]) == {"b": "beta", "a": "alpha"} and mapping["a"] == "alpha"
    with pytest.raises(DataFormatError, match="^unknown document id 'z'"):
        mapping.get_many(["z"])

    class GetOnly:  # a store without get_many whose get raises KeyError for an unknown id, as ir_datasets' does
        def get(self, docid: str) -> object:
            return docs[docid]

    get_only = DocTexts(GetOnly(), "a get-only store")
    assert get_only.get_many(["d1"]) == {"d1": "Title body one"}
    with pytest.raises(DataFormatError, match="query 'q1': unknown document id 'd9'"):
        get_only.get_many(["d9"], {"d9": "query 'q1'"})
    with pytest.raises(TypeError, match="docs must be a mapping or have .get"):
        DocTexts(["a", "b"])


def test_cranfield_codes_become_gains() -> None:
    assert [cranfield_gain(c) for c in (1, 2, 3, 4, -1)] == [4, 3, 2, 1, 0]


# ---------------------------------------------------------------------------------------------------- local data


def test_beir_folder_iterates_joins_titles_and_filters_queries(home: Path, tmp_path: Path) -> None:
    folder = beir_folder(tmp_path / "tiny-beir")
    assert register_beir_folder("tiny-beir", folder) == "local/tiny-beir"
    source = load_source("local/tiny-beir")
    assert isinstance(source, Source) and source.id == "local/tiny-beir"
    assert list(source.docs()) == [("d1", "Title one body one"), ("d2", "body two"), ("d3", "body three")]
    # queries without judgements in the split are left out, as BEIR's loader does
    assert list(source.queries()) == [("q1", "first"), ("q2", "second")]
    assert source.qrels() == {"q1": {"d1": 1, "d3": 2}, "q2": {"d2": 1}}
    assert source.docs_count() == 3
    store = source.docs_store()
    assert store.get("d2").text == " body two "
    assert source.doc_texts(["d3", "d1"]) == {"d3": "body three", "d1": "Title one body one"}
    with pytest.raises(DataFormatError, match=r"^unknown document id 'nope' \(not in dataset"):
        source.doc_texts(["nope"])
    # the same dataset straight from ir_datasets
    assert [q.query_id for q in ir_datasets.load("local/tiny-beir").queries_iter()] == ["q1", "q2"]
    train = load_source(register_beir_folder("tiny-beir-train", folder, split="train"))
    assert list(train.queries()) == [("q9", "train only")]
    assert train.qrels() == {"q9": {"d1": 1}}


def test_trec_collection_tsv_docs_sgml_topics(home: Path, tmp_path: Path) -> None:
    docs = write(tmp_path / "collection.tsv", "7\tseven is a number\n8\teight\twith a tab\n\n")
    topics = write(
        tmp_path / "topics.txt",
        "<top>\n<num> Number: 301\n<title> International Organized\nCrime\n<desc> Description:\nlong text\n</top>\n\n"
        "<top>\n<num> Number: 302 </num>\n<title> Poliomyelitis </title>\n</top>\n",
    )
    qrels = write(tmp_path / "qrels.txt", "301 0 7 1\n301 0 8 0\n302 Q0 8 2\n")
    source = load_source(register_trec("tiny-trec", docs=docs, topics=topics, qrels=qrels))
    assert list(source.docs()) == [("7", "seven is a number"), ("8", "eight\twith a tab")]
    assert list(source.queries()) == [("301", "International Organized Crime"), ("302", "Poliomyelitis")]
    assert source.qrels() == {"301": {"7": 1, "8": 0}, "302": {"8": 2}}


def test_trec_collection_jsonl_docs_tsv_topics_gzip(home: Path, tmp_path: Path) -> None:
    import gzip

    docs = jsonl(
        tmp_path / "docs.jsonl", [{"id": "a", "contents": "alpha"}, {"id": 5, "title": "T", "contents": "five"}]
    )
    topics = tmp_path / "topics.tsv.gz"
    with gzip.open(topics, "wt", encoding="utf-8") as f:
        f.write("q1\tfind alpha\r\nq2\tfind five\r\n")
    qrels = write(tmp_path / "qrels.beir.tsv", "query-id\tcorpus-id\tscore\nq1\ta\t1\nq2\t5\t3\n")
    source = load_source(register_trec("tiny-jsonl", docs=docs, topics=topics, qrels=qrels))
    assert list(source.docs()) == [("a", "alpha"), ("5", "T five")]
    assert list(source.queries()) == [("q1", "find alpha"), ("q2", "find five")]
    assert source.qrels() == {"q1": {"a": 1}, "q2": {"5": 3}}


def test_reregistering_replaces_and_changed_files_get_a_fresh_docs_store(home: Path, tmp_path: Path) -> None:
    docs = write(tmp_path / "c.tsv", "1\told text\n")
    source = load_source(register_trec("changing", docs=docs))
    assert source.docs_store().get("1").text == "old text"
    write(docs, "1\tnew and longer text\n2\tsecond\n")
    source = load_source(register_trec("changing", docs=docs))
    assert source.docs_store().get("1").text == "new and longer text"
    assert source.docs_count() == 2
    other = write(tmp_path / "other.tsv", "9\tnine\n")
    assert list(load_source(register_trec("changing", docs=other)).docs()) == [("9", "nine")]
    assert unregister_local_dataset("local/changing") is True
    with pytest.raises(UnknownSourceError, match="local/changing"):
        load_source("local/changing")


def test_sources_pickle_by_id(home: Path, tmp_path: Path) -> None:
    source = load_source(register_beir_folder("pickled", beir_folder(tmp_path / "p")))
    clone = pickle.loads(pickle.dumps(source))
    assert clone.id == "local/pickled" and list(clone.docs()) == list(source.docs())
    hub = pickle.loads(pickle.dumps(load_source(MSMARCO["dl19"], download=False)))
    assert isinstance(hub, IrDatasetsSource) and hub.id == MSMARCO["dl19"] and hub.download is False


def test_registrations_persist_for_a_fresh_process(home: Path, tmp_path: Path) -> None:
    register_beir_folder("persisted", beir_folder(tmp_path / "b"))
    assert "local/persisted" in json.loads(registry_file().read_text())["datasets"]
    result = run_python(
        """
        import json, ir_datasets
        from retriever.data.sources import load_source
        s = load_source("local/persisted")
        print(json.dumps({
            "docs": list(s.docs()), "queries": list(s.queries()), "qrels": s.qrels(),
            "direct": [d.doc_id for d in ir_datasets.load("local/persisted").docs_iter()],
        }))
        """,
        {"IR_DATASETS_HOME": str(home)},
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["docs"] == [["d1", "Title one body one"], ["d2", "body two"], ["d3", "body three"]]
    assert out["queries"] == [["q1", "first"], ["q2", "second"]]
    assert out["qrels"] == {"q1": {"d1": 1, "d3": 2}, "q2": {"d2": 1}}
    assert out["direct"] == ["d1", "d2", "d3"]


def test_registration_by_another_process_is_found_later(home: Path, tmp_path: Path) -> None:
    docs = write(tmp_path / "late.tsv", "x\tregistered elsewhere\n")
    result = run_python(
        f"from retriever.data.local import register_trec; register_trec('late-arrival', docs={str(docs)!r})",
        {"IR_DATASETS_HOME": str(home)},
    )
    assert result.returncode == 0, result.stderr
    # this process imported the module before the registration existed: the lookup reads the registry file
    assert list(load_source("local/late-arrival").docs()) == [("x", "registered elsewhere")]


# --------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("filename", "content", "kind", "where", "message"),
    [
        ("docs.jsonl", '{"_id": "a", "text": "ok"}\n{"_id": "b", "text": \n', "docs", 2, "invalid JSON"),
        ("docs.jsonl", '{"_id": "a", "text": "ok"}\n\n{"title": "no id", "text": "x"}\n', "docs", 3, "missing an id"),
        ("docs.jsonl", '{"_id": "a", "text": "ok"}\n["a list"]\n', "docs", 2, "expected a JSON object"),
        ("docs.tsv", "1\tfine\n2 no tab here\n", "docs", 2, "2 tab-separated columns"),
        ("docs.tsv", "1\tfine\n2\tx\n1\tagain\n", "docs", 3, "duplicate docs id '1'"),
        ("qrels.txt", "1 0 a 1\n1 0 b\n", "qrels", 2, "expected 4 columns"),
        ("qrels.txt", "1 0 a 1\n1 0 b high\n", "qrels", 2, "relevance must be an integer"),
        ("qrels.tsv", "query-id\tcorpus-id\tscore\nq\td\t1\nq\td\n", "qrels", 3, "expected 3 columns"),
        ("topics.txt", "<top>\n<num> Number: 1\n<title> t\n", "topics", 1, "never closed"),
        ("topics.txt", "<top>\n<title> no number\n</top>\n", "topics", 1, "without <num>"),
    ],
)
def test_malformed_files_name_file_and_line(
    home: Path, tmp_path: Path, filename: str, content: str, kind: str, where: int, message: str
) -> None:
    path = write(tmp_path / filename, content)
    with pytest.raises(DataFormatError, match=message) as info:
        register_trec("bad", **{kind: path})
    assert str(info.value).startswith(f"{path}:{where}: ")
    assert not registry_file().exists()  # nothing half-registered


def test_duplicates_name_both_locations(home: Path, tmp_path: Path) -> None:
    docs = write(tmp_path / "dup.tsv", "1\tfine\n2\tx\n1\tagain\n")
    with pytest.raises(DataFormatError, match=f"duplicate docs id '1' \\(first at {docs}:1\\)"):
        register_trec("dup-docs", docs=docs)
    qrels = write(tmp_path / "dup.qrels", "q 0 a 1\nq 0 b 0\nq 0 a 2\n")
    with pytest.raises(DataFormatError, match=f"^{qrels}:3: duplicate qrels judgement .*first at {qrels}:1"):
        register_trec("dup-qrels", qrels=qrels)


def test_bad_beir_header_and_missing_beir_file(home: Path, tmp_path: Path) -> None:
    folder = beir_folder(tmp_path / "b")
    qrels = write(folder / "qrels" / "test.tsv", "qid\tdocid\tscore\nq1\td1\t1\n")
    with pytest.raises(DataFormatError, match="expected the BEIR header") as info:
        register_beir_folder("bad-header", folder)
    assert str(info.value).startswith(f"{qrels}:1: ")
    (folder / "queries.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=str(folder / "queries.jsonl")):
        register_beir_folder("no-queries", folder)


def test_non_utf8_line_is_located(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "docs.tsv"
    path.write_bytes(b"1\tfine\n2\tfine too\n3\tbad \xff byte\n")
    with pytest.raises(DataFormatError, match="not valid UTF-8") as info:
        register_trec("latin", docs=path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_smart_text_before_first_record_is_located(tmp_path: Path) -> None:
    path = write(tmp_path / "X.ALL", "stray\n.I 1\n.W\ntext\n")
    with pytest.raises(DataFormatError, match=r"expected '\.I <id>'") as info:
        list(smart_records(path))
    assert str(info.value).startswith(f"{path}:1: ")
    good = write(tmp_path / "Y.ALL", ".I 001\n.T\nA title\n.W\nline one\nline two\n.I 2\n.W\nx\n")
    assert list(smart_records(good)) == [(1, "001", {"T": "A title", "W": "line one\nline two"}), (7, "2", {"W": "x"})]


def test_unknown_id_and_missing_entity(home: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownSourceError, match="no-such-dataset") as info:
        load_source("no-such-dataset/at-all")
    assert "beir/scifact/test" in str(info.value)
    source = load_source(register_trec("docs-only", docs=write(tmp_path / "d.tsv", "1\tx\n")))
    with pytest.raises(ValueError, match="has no qrels"):
        source.qrels()


def test_deleted_local_file_fails_with_its_path(home: Path, tmp_path: Path) -> None:
    docs = write(tmp_path / "gone.tsv", "1\tx\n")
    source = load_source(register_trec("gone", docs=docs))
    docs.unlink()
    with pytest.raises(SourceUnavailableError, match=str(docs)):
        source.docs()


def test_source_provider_prefix() -> None:
    class Fixed(Source):
        def __init__(self, dataset_id: str) -> None:
            self.id = dataset_id

        def docs(self):
            return iter([("d", "text")])

        def queries(self):
            return iter([("q", "query")])

        def qrels(self):
            return {"q": {"d": 1}}

        def docs_store(self):
            raise NotImplementedError

        def docs_count(self) -> int:
            return 1

    register_source_provider("unit-test-provider", Fixed)
    source = load_source("unit-test-provider/x")
    assert isinstance(source, Fixed) and source.id == "unit-test-provider/x"
    assert not isinstance(source, IrDatasetsSource)


# ------------------------------------------------------------------------------------------- offline fast failure


def test_missing_download_fails_fast_naming_the_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty_home"
    result = run_python(
        """
        import json, time
        from retriever.data.sources import SourceUnavailableError, load_source
        out = {}
        for dataset_id, entity in [("vaswani", "docs"), ("beir/scifact/test", "docs"), ("beir/scifact/test", "qrels"),
                                   ("msmarco-passage/trec-dl-2019/judged", "queries")]:
            start = time.perf_counter()
            try:
                getattr(load_source(dataset_id), entity)()
                out[dataset_id + ":" + entity] = None
            except SourceUnavailableError as exc:
                out[dataset_id + ":" + entity] = [str(exc), time.perf_counter() - start]
        print(json.dumps(out))
        """,
        # downloads disabled the way a user would, without relying on the test environment
        {"IR_DATASETS_HOME": str(empty), "RETRIEVER_OFFLINE": "1", "IR_DATASETS_DL_TRIES": "3"},
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {
        "vaswani:docs": [empty / "vaswani" / "docs.txt", empty / "vaswani" / "npl.tar.gz"],
        "beir/scifact/test:docs": [empty / "beir" / "scifact" / "source.zip"],
        "beir/scifact/test:qrels": [
            empty / "beir" / "scifact" / "test.qrels",
            empty / "beir" / "scifact" / "source.zip",
        ],
        "msmarco-passage/trec-dl-2019/judged:queries": [
            empty / "msmarco-passage" / "trec-dl-2019" / "queries.tsv",
            empty / "msmarco-passage" / "trec-dl-2019" / "qrels",
        ],
    }
    for key, paths in expected.items():
        assert out[key] is not None, key
        message, seconds = out[key]
        assert seconds < 1.0, (key, seconds)
        assert f"IR_DATASETS_HOME={empty}" in message
        assert "RETRIEVER_OFFLINE=1" in message
        for path in paths:
            assert f"- {path}\n" in message, (key, path, message)
    assert "'doc-text' extracted from the archive http://ir.dcs.gla.ac.uk" in out["vaswani:docs"][0]
    assert "import-classic" in out["vaswani:docs"][0]
    # nothing was fetched or created in place of the data
    assert not (empty / "vaswani" / "docs.txt").exists()


def test_download_false_overrides_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RETRIEVER_OFFLINE", "IR_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    source = load_source("beir/scifact/test", download=False)
    start = time.perf_counter()
    with pytest.raises(SourceUnavailableError, match="download=False"):
        source.queries()
    assert time.perf_counter() - start < 1.0
    # the document count of a hub dataset is known from ir_datasets' metadata without any file
    assert source.docs_count() == 5183
