"""The DL19 passage pool (real MS MARCO texts from rank_llm retrieve results) as a local collection."""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import ir_datasets
import pytest
from conftest import shared_path

from retriever.data.passage_pool import load_passage_pool, register_passage_pool
from retriever.data.sources import load_source

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def results_dir() -> Path:
    return shared_path("msmarco_trecdl", "rank_llm_retrieve_results")


def test_pool_is_the_union_of_passages(results_dir: Path) -> None:
    pool = load_passage_pool(results_dir)
    assert len(pool) == 14_581
    # independent reading of the six files: same ids, and each text is the one of the first file (sorted) holding it
    first_text: dict[str, str] = {}
    for path in sorted(results_dir.glob("*/retrieve_results_dl19.json.gz")):
        for entry in json.loads(gzip.decompress(path.read_bytes())):
            for hit in entry["hits"]:
                first_text.setdefault(hit["docid"], hit["content"])
    assert pool == first_text
    assert load_passage_pool(results_dir) == pool  # deterministic


def test_registered_pool_serves_docs_topics_qrels(
    results_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path))
    topics = shared_path("msmarco_trecdl", "topics.dl19-passage.txt")
    qrels_file = shared_path("msmarco_trecdl", "qrels.dl19-passage.txt")
    dataset_id = register_passage_pool("dl19-pool", results_dir, topics, qrels_file)
    assert dataset_id == "local/dl19-pool"
    source = load_source(dataset_id)
    assert source.docs_count() == 14_581
    queries = dict(source.queries())
    assert len(queries) == 43
    assert queries["156493"] == "do goldfish grow"
    qrels = source.qrels()
    assert sum(len(v) for v in qrels.values()) == 9260
    assert set(qrels) == set(queries)
    assert Counter(g for v in qrels.values() for g in v.values()) == {0: 5158, 1: 1601, 2: 1804, 3: 697}
    pool = load_passage_pool(results_dir)
    some = sorted(pool)[:3]
    assert source.doc_texts(some) == {pid: pool[pid].strip() for pid in some}
    assert sum(1 for _ in ir_datasets.load(dataset_id).docs_iter()) == 14_581


def test_the_default_pattern_takes_files_of_any_trec_dl_year(results_dir: Path, tmp_path: Path) -> None:
    # A real DL19 file under the name of another year: rank_llm names its files retrieve_results_<year>.json.gz.
    copy = tmp_path / "results" / "BM25" / "retrieve_results_dl20.json.gz"
    copy.parent.mkdir(parents=True)
    shutil.copyfile(results_dir / "BM25" / "retrieve_results_dl19.json.gz", copy)
    one_file = load_passage_pool(results_dir, "BM25/retrieve_results_dl19.json.gz")
    assert len(one_file) > 1000
    assert load_passage_pool(tmp_path / "results") == one_file
    assert load_passage_pool(tmp_path / "results", "*/retrieve_results_dl20.json.gz") == one_file
