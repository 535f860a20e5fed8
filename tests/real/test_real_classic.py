"""The classic collections (../shared/data/classic) offline through ir_datasets and load_source: exact counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO_ROOT, shared_path

pytestmark = pytest.mark.real

# ir_datasets binds the cache paths of its built-in datasets (vaswani, cranfield) when it is imported, so a
# temporary IR_DATASETS_HOME needs a fresh process.
PROGRAM = """
import json, sys
from collections import Counter
import ir_datasets
from retriever.data.sources import import_classic, load_source

src, home = sys.argv[1], sys.argv[2]
first = import_classic(src, home)
second = import_classic(src, home)  # idempotent
out = {"imported": first, "again": second, "sets": {}}
for dataset_id in first:
    ds = ir_datasets.load(dataset_id)
    source = load_source(dataset_id)
    qrels = source.qrels()
    queries = dict(source.queries())
    out["sets"][dataset_id] = {
        "irds": [sum(1 for _ in ds.docs_iter()), sum(1 for _ in ds.queries_iter()), sum(1 for _ in ds.qrels_iter())],
        "irds_raw_relevance": sorted(Counter(q.relevance for q in ds.qrels_iter()).items()),
        "docs_count": source.docs_count(),
        "docs": sum(1 for _ in source.docs()),
        "queries": len(queries),
        "qrels": sum(len(v) for v in qrels.values()),
        "judged": len(qrels),
        "judged_known": len(set(qrels) & set(queries)),
        "gains": sorted(Counter(g for v in qrels.values() for g in v.values()).items()),
        "first_doc": next(iter(source.docs())),
        "query": {q: queries[q] for q in ("1", "3") if q in queries},
        "pairs": {f"1 {d}": qrels.get("1", {}).get(d) for d in ("184", "12", "486", "13", "28")},
        "lookup": source.doc_texts(["5"])["5"][:40],
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def classic(tmp_path_factory: pytest.TempPathFactory) -> dict:
    src = shared_path("classic")
    home = tmp_path_factory.mktemp("irds_classic")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "IR_DATASETS_HOME": str(home), "RETRIEVER_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROGRAM), str(src), str(home)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["home"] = Path(home)
    return out


def test_imported_ids(classic: dict) -> None:
    assert classic["imported"] == ["vaswani", "cranfield", "classic/med", "classic/cisi"]
    assert classic["again"] == classic["imported"]
    home = classic["home"]
    for name in ("docs.txt", "queries.txt", "qrels.txt"):
        assert (home / "vaswani" / name).is_file() and (home / "cranfield" / name).is_file()
    assert set(json.loads((home / "retriever_local.json").read_text())["datasets"]) == {"classic/med", "classic/cisi"}


@pytest.mark.parametrize(
    ("dataset_id", "docs", "queries", "qrels", "judged"),
    [
        ("vaswani", 11429, 93, 2083, 93),
        ("cranfield", 1400, 225, 1837, 225),
        ("classic/med", 1033, 30, 696, 30),
        ("classic/cisi", 1460, 112, 3114, 76),
    ],
)
def test_exact_counts(classic: dict, dataset_id: str, docs: int, queries: int, qrels: int, judged: int) -> None:
    got = classic["sets"][dataset_id]
    assert got["irds"] == [docs, queries, qrels]
    assert (got["docs_count"], got["docs"], got["queries"], got["qrels"]) == (docs, docs, queries, qrels)
    assert got["judged"] == judged
    assert got["judged_known"] == judged  # every judged query id is a query id


def test_cranfield_query_ids_and_relevance_scale(classic: dict) -> None:
    got = classic["sets"]["cranfield"]
    # cran.qry numbers its queries 001, 002, 004, ...; the qrels number them 1..225 in file order
    assert got["query"]["3"].startswith("what problems of heat conduction in composite slabs")
    # ir_datasets keeps the raw codes (1 = complete answer ... 4 = minimum interest, -1 = no interest)
    assert got["irds_raw_relevance"] == [[-1, 225], [1, 128], [2, 387], [3, 734], [4, 363]]
    # load_source turns them into gains where larger = more relevant
    assert got["gains"] == [[0, 225], [1, 363], [2, 734], [3, 387], [4, 128]]
    # cran.qrels lines "1 184 2", "1 12 3", "1 486 -1", "1 13 4"; no line "1 28"
    assert got["pairs"] == {"1 184": 3, "1 12": 2, "1 486": 0, "1 13": 1, "1 28": None}
    # MED.REL "1 0 13 1"; CISI.REL "1 28 0 0.000000"
    assert classic["sets"]["classic/med"]["pairs"]["1 13"] == 1
    assert classic["sets"]["classic/cisi"]["pairs"]["1 28"] == 1


def test_texts(classic: dict) -> None:
    sets = classic["sets"]
    assert sets["vaswani"]["first_doc"][0] == "1"
    assert sets["vaswani"]["first_doc"][1].startswith("compact memories have flexible capacities")
    assert sets["cranfield"]["first_doc"][1].startswith("experimental investigation of the aerodynamics of a\nwing")
    assert sets["classic/med"]["first_doc"][0] == "1"
    assert sets["classic/med"]["first_doc"][1].startswith("correlation between maternal and fetal plasma levels")
    assert sets["classic/cisi"]["first_doc"][1].startswith(
        "18 Editions of the Dewey Decimal Classifications The present study is a history of the DEWEY"
    )
    assert sets["classic/med"]["query"]["1"] == "the crystalline lens in vertebrates, including humans."
    assert sets["classic/cisi"]["query"]["3"] == "What is information science? Give definitions where possible."
    assert sets["classic/med"]["lookup"].startswith("free fatty acid concentration in mater")
