"""Ray Train epoch order: 2 workers see one global shuffle per epoch (the same global batches as in-process
training), equal batch counts, and no query twice in a global batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle

from retriever.train.context import canonical_order, epoch_batches

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker function below travels by value

EPOCHS, LOCAL_BATCH, SEED = 3, 6, 45


def record_epochs(config: dict) -> None:
    """Train-loop stand-in: the query ids of every batch this rank gets, per epoch, written to a JSON file."""
    import ray.train

    from retriever.train.context import RayTrainContext

    ctx = RayTrainContext()
    seen = [
        [list(map(str, rows["query_id"])) for rows in ctx.batches(epoch, config["local_batch"], config["seed"])]
        for epoch in range(config["epochs"])
    ]
    Path(config["out"], f"rank{ctx.rank}.json").write_text(json.dumps(seen))
    ray.train.report({"done": 1})


def test_two_workers_train_on_global_batches_without_repeated_queries(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # 30 queries x 3 positives, rows of one query next to each other (qrels order), over several files and blocks.
    query_ids = [f"q{q:03d}" for q in range(30) for _ in range(3)]
    table = pa.table({"query_id": query_ids, "positive_id": [f"d{i:03d}" for i in range(90)]})
    data = tmp_path / "examples"
    data.mkdir()
    for part in range(3):
        pq.write_table(table.slice(30 * part, 30), data / f"part-{part}.parquet")
    trainer = TorchTrainer(
        record_epochs,
        train_loop_config={"epochs": EPOCHS, "local_batch": LOCAL_BATCH, "seed": SEED, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="epoch-order", storage_path=str(tmp_path / "ray")),
        datasets={"train": ray.data.read_parquet(str(data))},
    )
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = epoch_batches(canonical_order(table), 2 * LOCAL_BATCH, SEED, 0)
    assert len(ranks[0][0]) == len(ranks[1][0]) == len(expected) == 7  # 90 rows // 12 per global batch
    epochs = []
    for epoch in range(EPOCHS):
        assert len(ranks[0][epoch]) == len(ranks[1][epoch])  # equal counts: report is a barrier
        global_batches = [a + b for a, b in zip(ranks[0][epoch], ranks[1][epoch])]
        assert all(len(set(batch)) == len(batch) == 2 * LOCAL_BATCH for batch in global_batches), global_batches
        # The same global batches as the in-process context computes from all rows (a global shuffle).
        want = np.array(canonical_order(table).column("query_id").to_pylist())[
            epoch_batches(canonical_order(table), 2 * LOCAL_BATCH, SEED, epoch)
        ]
        assert global_batches == want.tolist()
        epochs.append(global_batches)
    assert epochs[0] != epochs[1] != epochs[2]
