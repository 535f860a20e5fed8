"""Epoch order of the training contexts: a seeded global shuffle per epoch in which rows of one query never share a
global batch (they would be each other's false in-batch negatives)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import make_config

from retriever.data.catalog import synthetic_benchmark
from retriever.data.examples import build_training_examples
from retriever.train.context import LocalContext, canonical_order, epoch_batches
from retriever.train.trainer import run_dir_for, run_training


def examples_table(queries: int = 20, rows_per_query: int = 4) -> pa.Table:
    """Rows of one query next to each other, as `build_training_examples` writes them (qrels order)."""
    query_ids = [f"q{q:03d}" for q in range(queries) for _ in range(rows_per_query)]
    positives = [f"d{q:03d}-{r}" for q in range(queries) for r in range(rows_per_query)]
    return pa.table({"query_id": query_ids, "positive_id": positives})


def epoch_query_ids(ctx: LocalContext, epoch: int, batch_size: int, seed: int = 45) -> list[list[str]]:
    return [list(rows["query_id"]) for rows in ctx.batches(epoch, batch_size, seed)]


def test_no_query_twice_in_a_batch_and_every_epoch_reshuffles(tmp_path):
    table = examples_table()  # 20 queries x 4 rows: a plain shuffle puts some query twice in a batch of 16
    ctx = LocalContext(table, tmp_path)
    epochs = [epoch_query_ids(ctx, epoch, 16) for epoch in range(4)]
    for batches in epochs:
        assert len(batches) == 5 and all(len(batch) == 16 for batch in batches)
        assert all(len(set(batch)) == len(batch) for batch in batches), batches
        assert sorted(q for batch in batches for q in batch) == sorted(table.column("query_id").to_pylist())
    assert len({tuple(map(tuple, batches)) for batches in epochs}) == 4  # the order differs between epochs
    assert epochs[2] == epoch_query_ids(LocalContext(table, tmp_path), 2, 16)  # deterministic in (seed, epoch)
    assert epochs[2] != epoch_query_ids(ctx, 2, 16, seed=46)


def test_remainder_rows_rotate_and_order_ignores_the_file_order():
    table = examples_table(queries=13, rows_per_query=3)  # 39 rows: 4 batches of 9, 3 rows wait each epoch
    left_out = []
    for epoch in range(6):
        batches = epoch_batches(table, 9, seed=1, epoch=epoch)
        assert batches.shape == (4, 9) and len(np.unique(batches)) == 36
        left_out.append(frozenset(set(range(39)) - set(batches.ravel().tolist())))
    assert len(set(left_out)) > 1
    shuffled = table.take(np.random.default_rng(0).permutation(39))
    assert canonical_order(shuffled).equals(canonical_order(table))


def test_blocks_without_queries_are_a_plain_permutation():
    blocks = pa.table({"input_ids": [[i, i + 1] for i in range(20)]})
    first, second = epoch_batches(blocks, 6, seed=3, epoch=0), epoch_batches(blocks, 6, seed=3, epoch=1)
    assert first.shape == second.shape == (3, 6)
    assert len(np.unique(first)) == 18 and not np.array_equal(first, second)


def test_a_query_with_more_rows_than_batches_is_an_error():
    table = examples_table(queries=3, rows_per_query=4)  # 12 rows, batches of 4: 3 batches for 4 rows of a query
    with pytest.raises(ValueError, match=r"query 'q000' has 4 training rows, but an epoch of 12 rows has only 3 "):
        epoch_batches(table, 4, seed=0, epoch=0)


class RecordingContext(LocalContext):
    """The in-process context, recording the query ids of every batch it hands to the loop."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, list[str]]] = []

    def batches(self, epoch, batch_size, seed):
        for rows in super().batches(epoch, batch_size, seed):
            self.seen.append((epoch, list(rows["query_id"])))
            yield rows


def test_training_never_puts_a_query_twice_in_a_batch(tmp_path, monkeypatch):
    """Several positives per query (one row each): every batch the loop trains on holds distinct queries."""
    probe = make_config(tmp_path, "multi-positive")
    bench = synthetic_benchmark(probe)
    run = {}
    for line in bench.candidates_train.read_text().splitlines():
        qid, _, docid, *_ = line.split()
        run.setdefault(qid, []).append(docid)
    qrels = {qid: {docid: 1 for docid in docids[:3]} for qid, docids in sorted(run.items())[:30]}
    path = tmp_path / "examples.parquet"
    report = build_training_examples(
        qrels, bench.candidates_train, bench.queries, bench.docs(), path, num_negatives=3, inline_text=False
    )
    assert report.rows == 90 and report.queries == 30
    cfg = make_config(
        tmp_path,
        "multi-positive",
        backbone={"lora": {"enabled": False}},
        encoder={"paradigm": "dense"},
        budget={"max_steps": 24},
        train={"batch_size": 8, "checkpoint_every": 1000},
        data={"train": str(path), "docs": "synthetic/train"},
    )
    contexts: list[RecordingContext] = []

    def recording(*args, **kwargs):
        contexts.append(RecordingContext(*args, **kwargs))
        return contexts[-1]

    monkeypatch.setattr("retriever.train.context.LocalContext", recording)
    result = run_training(cfg)
    assert result["steps"] == 24 and run_dir_for(cfg).is_dir()
    seen = contexts[0].seen
    assert len(seen) == 24 and {epoch for epoch, _ in seen} == {0, 1, 2}  # 11 batches of 8 per epoch
    assert all(len(set(ids)) == 8 for _, ids in seen)
    first, second = ([ids for epoch, ids in seen if epoch == e] for e in (0, 1))
    assert first != second
