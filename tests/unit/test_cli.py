"""The command line (`retriever.cli`): every stage a subcommand over its library function, bad input a one-line
error with exit status 2."""

from __future__ import annotations

import json

import pytest
from conftest import REPO_ROOT, TINY_CORPUS

from retriever.cli import COMMANDS, build_parser, main
from retriever.config import BackboneConfig, EncoderConfig
from retriever.models.encoders import build_encoder
from retriever.trec import read_run

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart.yaml")


def test_every_command_has_help_and_a_function_or_subcommands(capsys):
    parser = build_parser()
    for name in COMMANDS.names():
        with pytest.raises(SystemExit) as done:
            parser.parse_args([name, "--help"])
        assert done.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: retriever {name}")
    assert build_parser().parse_args(["data", "list"]).func.__name__ == "_list_local"


def test_plan_prints_every_cell_and_the_pre_training_stages(capsys):
    assert main(["plan", QUICKSTART]) == 0
    text = capsys.readouterr().out
    assert "bag-of-words once per backbone x paradigm" in text
    assert main(["plan", QUICKSTART, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 18  # 3 backbones x 2 paradigms x 3 losses
    assert {(r["backbone"], r["paradigm"], r["loss"]) for r in rows} == {
        (b, p, loss)
        for b in ("tiny-s", "tiny-m", "tiny-l")
        for p in ("sparse", "dense")
        for loss in ("cl", "kd", "cl+kd")
    }
    assert all(r["steps"] > 0 for r in rows)


def test_bad_input_is_one_line_on_stderr_with_status_2(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "absent.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "absent.yaml" in err and "Traceback" not in err
    assert main(["plan", QUICKSTART, "train.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_encode_index_search_and_evaluate_from_the_command_line(tiny_tokenizer_dir, tmp_path, capsys):
    backbone = BackboneConfig(name="tiny-s", tokenizer=str(tiny_tokenizer_dir), seed=3, lora={"enabled": False})
    build_encoder(backbone, EncoderConfig(paradigm="sparse", passage_max_length=32)).save(tmp_path / "encoder")
    docs = tmp_path / "docs.tsv"
    docs.write_text("".join(f"d{i}\t{text}\n" for i, text in enumerate(TINY_CORPUS[:10])))
    topics = tmp_path / "topics.tsv"
    topics.write_text("q1\tquick brown fox\nq2\tsparse vectors\n")
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("q1 0 d0 1\nq2 0 d2 1\n")
    dataset = f"local/cli-{tmp_path.name}"
    assert main(["data", "register-trec", dataset.split("/")[1], "--docs", str(docs), "--topics", str(topics)]) == 0
    assert capsys.readouterr().out.strip() == dataset

    encoder = str(tmp_path / "encoder")
    assert main(["encode", encoder, "--dataset", dataset, "--out", str(tmp_path / "docs")]) == 0
    assert "encoded 10 texts" in capsys.readouterr().out
    query_args = ["--dataset", dataset, "--kind", "query", "--out", str(tmp_path / "queries")]
    assert main(["encode", encoder, *query_args]) == 0
    assert main(["index", str(tmp_path / "docs"), "--out", str(tmp_path / "index"), "--shards", "2"]) == 0
    run = tmp_path / "run.trec"
    assert main(["search", str(tmp_path / "index"), "--queries", str(tmp_path / "queries"), "--out", str(run)]) == 0
    assert sorted(read_run(run)) == ["q1", "q2"]
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--qrels", str(qrels), "--protocol", "synthetic", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["queries_evaluated"] == 2 and set(summary["metrics"]) == {"ndcg@10", "mrr@10", "recall@100"}
    # The finished encoding is never overwritten by accident.
    assert main(["encode", encoder, "--dataset", dataset, "--out", str(tmp_path / "docs")]) == 2
    assert "an encodings folder already exists; pass --overwrite" in capsys.readouterr().err


def _results_file(path, hits):
    """A rank_llm retrieve-results file (gzip JSON) with one query and `hits` as (docid, text)."""
    import gzip

    entry = {
        "query": {"text": "q", "qid": "q1"},
        "hits": [
            {"qid": "q1", "docid": d, "rank": i + 1, "score": 1.0, "content": t} for i, (d, t) in enumerate(hits)
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(json.dumps([entry]).encode()))


def test_register_pool_takes_every_trec_dl_year_or_the_given_pattern(tmp_path, monkeypatch, capsys):
    from retriever.data.sources import load_source

    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path / "home"))
    results = tmp_path / "results"
    _results_file(results / "BM25" / "retrieve_results_dl20.json.gz", [("p1", "first"), ("p2", "second")])
    _results_file(results / "SPLADE" / "retrieve_results_dl21.json.gz", [("p2", "other"), ("p3", "third")])
    _results_file(results / "retrieve_results_covid.json.gz", [("p4", "top level")])
    (results / "BM25" / "trec_results_dl20.txt.gz").write_bytes(b"not a results file")
    topics = tmp_path / "topics.tsv"
    topics.write_text("q1\tq\n")
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("q1 0 p1 1\n")
    common = ["--topics", str(topics), "--qrels", str(qrels)]

    assert main(["data", "register-pool", "all-years", str(results), *common]) == 0
    assert capsys.readouterr().out.strip() == "local/all-years"
    assert dict(load_source("local/all-years").docs()) == {
        "p1": "first",
        "p2": "second",
        "p3": "third",
        "p4": "top level",
    }

    pattern = "*/retrieve_results_dl21.json.gz"
    assert main(["data", "register-pool", "dl21", str(results), "--pattern", pattern, *common]) == 0
    assert dict(load_source("local/dl21").docs()) == {"p2": "other", "p3": "third"}
