"""`retriever mine` on Ray Data actor pools: the same examples as one process, and teacher scores equal to a plain
loop over the same pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import mine_settings, mining_world
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from retriever.data.examples import read_training_examples
from retriever.mining.ray_data import fused
from retriever.mining.run import mine

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_actor_pools_mine_the_examples_of_one_process(ray_cluster, tmp_path) -> None:
    world = mining_world(tmp_path)
    local = mine(mine_settings(world, tmp_path / "local"))
    theirs = read_training_examples(tmp_path / "local").to_pylist()
    # small batches, so queries cross actors and blocks in any order: 2 workers each running the first stage and
    # the teacher (fused), then 2 first-stage actors feeding 1 teacher actor (two pools)
    for name, teacher_actors in (("fused", 2), ("pools", 1)):
        settings = mine_settings(
            world, tmp_path / name, workers=2, queries_per_batch=16, teacher={"actors": teacher_actors}
        )
        assert fused(settings) == (name == "fused")
        distributed = mine(settings)
        assert (distributed.shards_written, distributed.rows, distributed.pairs_scored) == (
            local.shards_written,
            local.rows,
            local.pairs_scored,
        )
        ours = read_training_examples(tmp_path / name).to_pylist()
        assert [(r["query_id"], r["positive_id"], r["negative_ids"]) for r in ours] == [
            (r["query_id"], r["positive_id"], r["negative_ids"]) for r in theirs
        ]
    # the teacher's scores: the plain loop a user would write, one pair at a time, no batching at all
    tokenizer = AutoTokenizer.from_pretrained(world.teacher)
    model = AutoModelForSequenceClassification.from_pretrained(world.teacher).eval()
    queries = world.bench.query_texts()
    got, expected = [], []
    with torch.inference_mode():
        for row in ours[:40]:
            for docid, score in zip(
                [row["positive_id"], *row["negative_ids"]], [row["teacher_pos"], *row["teacher_negs"]]
            ):
                pair = tokenizer(queries[row["query_id"]], world.docs[docid], truncation=True, max_length=96,
                                 return_tensors="pt")  # fmt: skip
                expected.append(float(model(**pair).logits[0, 0]))
                got.append(score)
    assert len(got) > 200
    assert np.abs(np.array(got) - np.array(expected)).max() <= 1e-5
