"""`retriever mine` in one process (`workers: 0`): valid examples, the same rows as the examples builder from the same
files, false-negative filtering, rank-range sampling, resuming and bad inputs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_config, mine_settings, mining_world

from retriever.bm25 import Bm25Index
from retriever.checksums import sha256_file
from retriever.config import ConfigError, MineConfig, RankRange
from retriever.data.examples import build_training_examples, read_training_examples, training_example_files
from retriever.errors import DataFormatError
from retriever.mining.run import mine, select_negatives
from retriever.mining.teacher import CrossEncoderTeacher

COLUMNS = ["query_id", "positive_id", "negative_ids", "teacher_pos", "teacher_negs"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    return mining_world(tmp_path_factory.mktemp("mining"))


def settings(world: SimpleNamespace, out: Path, **values) -> MineConfig:
    return mine_settings(world, out, **values)


def rows(out: Path) -> list[dict]:
    return read_training_examples(out).select(COLUMNS).to_pylist()


def same_rows(a: list[dict], b: list[dict]) -> None:
    assert [(r["query_id"], r["positive_id"], r["negative_ids"]) for r in a] == [
        (r["query_id"], r["positive_id"], r["negative_ids"]) for r in b
    ]
    for x, y in zip(a, b):
        assert x["teacher_pos"] == pytest.approx(y["teacher_pos"], abs=1e-5)
        assert np.allclose(x["teacher_negs"], y["teacher_negs"], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def mined(world) -> SimpleNamespace:
    out = world.root / "mined"
    report = mine(settings(world, out))
    return SimpleNamespace(out=out, report=report, rows=rows(out))


def test_mined_examples_are_bm25_candidates_scored_by_the_teacher(world, mined) -> None:
    report = mined.report
    assert (report.shards, report.shards_written, report.queries) == (3, 3, 150)
    manifest = json.loads((mined.out / "manifest.json").read_text())
    assert manifest["complete"] and sorted(manifest["shards"]) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert manifest["inputs"]["teacher"]["sha256"] and manifest["inputs"]["first_stage"]["num_docs"] == len(world.docs)
    assert all(entry["sha256"] == sha256_file(mined.out / name) for name, entry in manifest["shards"].items())
    queries = world.bench.query_texts()
    positives = {}
    with world.bench.qrels_train.open() as f:
        for line in list(f)[1:]:
            qid, docid, _ = line.split("\t")
            positives.setdefault(qid, []).append(docid)
    bm25 = Bm25Index(world.docs.items())
    teacher = CrossEncoderTeacher(world.teacher, max_length=96, batch_size=1)
    pools = {q: [d for d in bm25.top_k(queries[q], 8) if d not in positives[q]] for q in list(positives)[:150]}
    expected = [(q, d, pools[q]) for q in pools for d in positives[q] if pools[q]]  # no pool, no row
    assert [(r["query_id"], r["positive_id"], r["negative_ids"]) for r in mined.rows] == expected
    assert report.rows == len(expected) and report.rows_without_negatives == 150 - len(expected)
    for row in mined.rows[:30]:
        qid = row["query_id"]
        expected = pools[qid]
        # one pair at a time, no length buckets: the plain loop the actor-pool scores must equal
        pairs = [row["positive_id"], *expected]
        scores = [float(teacher.score([queries[qid]], [world.docs[d]])[0]) for d in pairs]
        assert row["teacher_pos"] == pytest.approx(scores[0], abs=1e-5)
        assert np.allclose(row["teacher_negs"], scores[1:], atol=1e-5, rtol=0)


def test_a_run_and_a_teacher_file_give_the_rows_of_the_examples_builder(world, tmp_path) -> None:
    bench = world.bench
    out = tmp_path / "from-files"
    cfg = settings(
        world,
        out,
        pool_size=bench.num_candidates,
        max_queries=None,
        first_stage={"kind": "run", "index": None, "run": str(bench.candidates_train)},
        teacher={"kind": "file", "file": str(bench.teacher_train)},
    )
    mine(cfg)
    built = tmp_path / "built.parquet"
    build_training_examples(
        bench.qrels_train, bench.candidates_train, bench.queries, world.docs, built,
        teacher=bench.teacher_train, inline_text=False,
    )  # fmt: skip
    assert rows(out) == pq.read_table(built).select(COLUMNS).to_pylist()


def test_false_negatives_within_the_margin_of_the_positive_or_above_it_are_dropped() -> None:
    scores = [6.0, 4.9, 4.5, 4.4, 1.0]  # candidates in rank order; the positive scores 5.0
    args = ("q1", "d1", scores, 5.0)
    assert select_negatives(*args, None, None, 0, 5) == [0, 1, 2, 3, 4]
    assert select_negatives(*args, 0.0, None, 0, 5) == [1, 2, 3, 4]  # only the one above the positive
    assert select_negatives(*args, 0.5, None, 0, 5) == [3, 4]  # 4.5 is exactly at positive - margin: dropped
    assert select_negatives(*args, -1.5, None, 0, 5) == [0, 1, 2, 3, 4]  # a negative margin keeps ones above it


def test_negatives_are_drawn_from_rank_ranges_by_seed() -> None:
    ranges = [RankRange(first=1, last=3, count=2), RankRange(first=4, last=10, count=3)]
    picked = select_negatives("q1", "d1", [0.0] * 10, None, None, ranges, 7, 10)
    assert len(picked) == 5 and sum(i < 3 for i in picked) == 2 and all(i < 10 for i in picked)
    assert picked == sorted(picked) == select_negatives("q1", "d1", [0.0] * 10, None, None, ranges, 7, 10)
    draws = {tuple(select_negatives("q1", "d1", [0.0] * 10, None, None, ranges, seed, 10)) for seed in range(20)}
    assert len(draws) > 5  # the seed decides the draw
    whole = [RankRange(first=2, last=4)]
    assert select_negatives("q1", "d1", [0.0] * 10, None, None, whole, 0, 10) == [1, 2, 3]
    # filtering first, then the ranges: rank 2 is a false negative, the range keeps what is left of it
    assert select_negatives("q1", "d1", [0, 9, 0, 0, 0], 5.0, 1.0, whole, 0, 5) == [2, 3]


def test_a_margin_and_rank_ranges_shape_the_mined_pool(world, mined, tmp_path) -> None:
    out = tmp_path / "shaped"
    mine(settings(world, out, false_negative_margin=0.0, negatives=[{"first": 1, "last": 8, "count": 3}]))
    shaped = {(r["query_id"], r["positive_id"]): r for r in rows(out)}
    assert shaped
    for row in mined.rows:
        key = (row["query_id"], row["positive_id"])
        kept = [(d, s) for d, s in zip(row["negative_ids"], row["teacher_negs"]) if s < row["teacher_pos"]]
        if not kept:
            assert key not in shaped  # no negative left: the pair is left out
            continue
        got = shaped[key]
        assert len(got["negative_ids"]) == min(3, len(kept))
        assert set(zip(got["negative_ids"], got["teacher_negs"])) <= set(kept)


def test_a_finished_job_is_reused_and_a_corrupt_shard_is_mined_again(world, mined, tmp_path) -> None:
    out = tmp_path / "resumed"
    cfg = settings(world, out, max_queries=64)  # stops after the first shard, as a stopped job would
    assert mine(cfg).shards_written == 1
    assert json.loads((out / "manifest.json").read_text())["complete"]
    report = mine(settings(world, out, workers=0, queries_per_batch=5))  # execution settings may change
    assert (report.shards_reused, report.shards_written, report.shards_redone) == (1, 2, 0)
    shard = out / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])  # a torn copy
    (out / "part-00002.parquet").unlink()
    (out / ".partial-abcd1234-manifest.json").write_text('{"cut": ')  # a manifest update cut short
    report = mine(settings(world, out))
    assert not (out / ".partial-abcd1234-manifest.json").exists()
    assert (report.shards_reused, report.shards_written, report.shards_redone) == (1, 2, 2)
    same_rows(rows(out), mined.rows)


def test_other_settings_are_refused_and_overwrite_starts_over(world, mined, tmp_path) -> None:
    out = tmp_path / "changed"
    mine(settings(world, out, max_queries=64))
    with pytest.raises(ConfigError, match=r"other settings \(pool_size: 8 then, 5 now\).*--overwrite"):
        mine(settings(world, out, pool_size=5))
    report = mine(settings(world, out, pool_size=5), overwrite=True)
    assert report.shards_written == 3 and all(len(r["negative_ids"]) <= 5 for r in rows(out))


def test_an_unfinished_folder_is_refused_by_the_trainer(world, mined, tmp_path) -> None:
    out = tmp_path / "unfinished"
    mine(settings(world, out, max_queries=64))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataFormatError, match=r"mining has not finished \(1 shards written.*run the same"):
        training_example_files(out)


def _untouched(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}


def test_bad_inputs_get_clear_errors_and_leave_finished_shards_untouched(world, mined, tmp_path) -> None:
    before = _untouched(mined.out)
    with pytest.raises(FileNotFoundError, match=r"queries: .*missing.tsv: no such file"):
        mine(settings(world, mined.out, queries=str(tmp_path / "missing.tsv")))
    bad_teacher = tmp_path / "teacher.tsv"
    bad_teacher.write_text("train-000001\tdoc-000001\t1.5\ntrain-000001\tdoc-000002\tnot-a-number\n")
    with pytest.raises(DataFormatError, match=r"teacher.tsv:2: .*teacher score \(column 3\)"):
        mine(settings(world, mined.out, teacher={"kind": "file", "file": str(bad_teacher)}))
    pickled = tmp_path / "scores.pkl"
    pickled.write_bytes(pickle.dumps({("q", "d"): 1.0}))
    with pytest.raises(DataFormatError, match=r"scores.pkl: a Python pickle.*convert"):
        mine(settings(world, mined.out, teacher={"kind": "file", "file": str(pickled)}))
    assert _untouched(mined.out) == before


def test_a_run_naming_unknown_documents_stops_at_its_shard(world, tmp_path) -> None:
    run = tmp_path / "run.trec"
    lines = world.bench.candidates_train.read_text().splitlines()
    late_query = lines[-1].split()[0]  # in the last shard
    lines.append(f"{late_query} Q0 doc-unknown 999 0.1 bad")
    run.write_text("\n".join(lines) + "\n")
    out = tmp_path / "unknown"
    cfg = settings(
        world, out, max_queries=None, pool_size=1000, first_stage={"kind": "run", "index": None, "run": str(run)},
        teacher={"kind": "none"},
    )  # fmt: skip
    with pytest.raises(DataFormatError, match=rf"query '{late_query}': unknown document id 'doc-unknown'"):
        mine(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and "part-00000.parquet" in manifest["shards"]
    assert pq.read_table(out / "part-00000.parquet").num_rows == manifest["shards"]["part-00000.parquet"]["rows"]


def test_kd_trains_and_evaluates_on_mined_examples(world, mined, tmp_path) -> None:
    from retriever.pipeline import evaluate_encoder
    from retriever.train.trainer import run_training

    cfg = make_config(
        world.root,
        "kd-on-mined",
        loss={"name": "kd", "num_negatives": 3},
        budget={"max_steps": 3},
        data={"train": str(mined.out), "docs": "synthetic/train"},
    )
    reports: list[dict[str, float]] = []
    result = run_training(cfg, on_report=reports.append)
    kd = [m["loss/kd"] for m in reports if "loss/kd" in m]
    assert result["steps"] == 3 and len(kd) == 3 and all(np.isfinite(kd)) and max(kd) > 0
    metrics = evaluate_encoder(result["export_dir"], ["synthetic/test"], cfg, tmp_path / "eval")
    assert 0 < metrics["synthetic/test"]["ndcg@10"] <= 1


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"first_stage": {"kind": "encoder"}}, "kind encoder needs first_stage.encoder and first_stage.index"),
        ({"first_stage": {"kind": "run"}}, "kind run needs first_stage.run"),
        ({"teacher": {"kind": "file"}}, "teacher.kind file needs teacher.file"),
        ({"teacher": {"kind": "none"}, "false_negative_margin": 1.0}, "needs a teacher"),
        ({"negatives": [{"first": 5, "last": 20}]}, "reaches past pool_size 8"),
        ({"negatives": [{"first": 5, "last": 2}]}, "last must be >= first"),
        ({"pool": 3}, "pool: unknown key"),
    ],
)
def test_inconsistent_settings_are_refused(world, tmp_path, values, message) -> None:
    with pytest.raises(ConfigError, match=message):
        settings(world, tmp_path / "x", **values)


def test_the_shipped_mining_config_is_valid() -> None:
    from conftest import REPO_ROOT

    from retriever.config import load_config

    cfg = load_config(REPO_ROOT / "configs" / "mine.yaml", model=MineConfig)
    assert (cfg.dataset, cfg.teacher.model, cfg.pool_size) == (
        "msmarco-passage/train/judged",
        "cross-encoder/ms-marco-MiniLM-L6-v2",
        100,
    )


def test_a_trained_encoder_and_its_index_shards_give_the_candidates_of_a_search(serving_world, tmp_path) -> None:
    from conftest import SERVE_QUERIES

    from retriever.index import search_to_run

    sparse = serving_world["sparse"]
    queries, qrels = tmp_path / "queries.tsv", tmp_path / "qrels.tsv"
    queries.write_text("".join(f"q{i}\t{text}\n" for i, text in enumerate(SERVE_QUERIES)))
    qrels.write_text("".join(f"q{i} 0 d{i:02d} 1\n" for i in range(len(SERVE_QUERIES))))
    cfg = mine_settings(
        SimpleNamespace(dataset=serving_world["corpus"], bm25=None, teacher=None),
        tmp_path / "out",
        queries=str(queries),
        qrels=str(qrels),
        pool_size=10,
        first_stage={"kind": "encoder", "encoder": str(sparse["encoder"]), "index": str(sparse["index3"])},
        teacher={"kind": "none", "model": "unused"},
    )
    report = mine(cfg)
    run = search_to_run(sparse["index3"], sparse["queries"], 10)  # the same queries, encoded by `retriever encode`
    expected = [
        (f"q{i}", f"d{i:02d}", [d for d in run[f"q{i}"] if d != f"d{i:02d}"]) for i in range(len(SERVE_QUERIES))
    ]
    out = tmp_path / "out"
    assert [(r["query_id"], r["positive_id"], r["negative_ids"]) for r in rows(out)] == expected
    assert report.rows == len(SERVE_QUERIES)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["first_stage"]["encoder_sha256"] and manifest["inputs"]["queries"]["sha256"]
    assert all(r["teacher_pos"] is None for r in rows(out))


def test_the_command_prints_its_report_and_refuses_bad_settings_by_name(world, mined, tmp_path, capsys) -> None:
    import yaml

    from retriever.cli import main

    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump(settings(world, mined.out).model_dump(mode="json")))
    assert main(["mine", str(config)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["shards_reused"], report["shards_written"], report["rows"]) == (3, 0, mined.report.rows)
    assert main(["mine", str(config), "pool_size=0"]) == 2
    assert "pool_size: Input should be greater than 0" in capsys.readouterr().err
    assert main(["mine", str(config), "teacher.kind=none"]) == 2  # valid, but not what the folder was mined with
    assert "was mined with other settings (teacher.kind: 'cross_encoder' then, 'none' now)" in capsys.readouterr().err
