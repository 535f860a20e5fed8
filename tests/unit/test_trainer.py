"""The training entry point: examples that hold passage ids train with the texts of `data.docs`, ids without docs
fail before training, a worker's UserError is found inside Ray's errors, and what each Ray Train worker holds."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
from conftest import make_config

from retriever.data.catalog import synthetic_benchmark
from retriever.data.examples import build_synthetic_examples
from retriever.train.errors import NoValidCheckpointError
from retriever.train.trainer import _user_error_in, resources_per_worker, run_dir_for, run_training


def ids_only_examples(cfg, out):
    """The synthetic benchmark's training examples, which hold passage ids only (no `positive` / `negatives`)."""
    build_synthetic_examples(synthetic_benchmark(cfg), out, num_negatives=cfg.loss.num_negatives)
    assert {"positive", "negatives"}.isdisjoint(pq.read_schema(out).names)
    return out


def test_ids_only_examples_train_with_the_texts_of_data_docs(tmp_path):
    probe = make_config(tmp_path, "ids-only", budget={"max_steps": 3})
    path = ids_only_examples(probe, tmp_path / "examples.parquet")
    # The synthetic benchmark registered as a local BEIR folder: its docs store gives the passage texts.
    cfg = make_config(
        tmp_path,
        "ids-only",
        loss={"name": "cl+kd"},
        budget={"max_steps": 3},
        data={"train": str(path), "docs": "synthetic/train"},
    )
    reports: list[dict[str, float]] = []
    result = run_training(cfg, on_report=reports.append)
    losses = [m["loss/total"] for m in reports if "loss/total" in m]
    assert result["steps"] == 3 and len(losses) == 3
    assert all(math.isfinite(value) for value in losses)


def test_ids_without_data_docs_fail_before_training(tmp_path):
    probe = make_config(tmp_path, "no-docs")
    path = ids_only_examples(probe, tmp_path / "examples.parquet")
    cfg = make_config(tmp_path, "no-docs", data={"train": str(path)})
    with pytest.raises(ValueError, match=r"hold passage ids, not texts; set data\.docs"):
        run_training(cfg)
    assert not run_dir_for(cfg).exists()  # nothing was built or checkpointed


class WorkerGroupError(Exception):
    """Shaped as Ray Train's: the workers' exceptions by rank (Ray may wrap each again, as the cause)."""

    def __init__(self, message: str, worker_failures: dict[int, BaseException]) -> None:
        super().__init__(message)
        self.worker_failures = worker_failures


def test_a_workers_user_error_is_found_inside_rays_error():
    bad_state = NoValidCheckpointError("no valid checkpoint to resume 'x' from")
    wrapped = RuntimeError("task failed")
    wrapped.__cause__ = bad_state
    assert _user_error_in(WorkerGroupError("failed", {0: RuntimeError("peer"), 1: wrapped})) is bad_state
    assert _user_error_in(WorkerGroupError("failed", {0: RuntimeError("a bug")})) is None


def test_a_ray_worker_holds_its_cpus_its_gpu_and_the_custom_resources(tmp_path):
    cfg = make_config(tmp_path, "resources", train={"cpus_per_worker": 2, "worker_resources": {"trainer_slot": 1}})
    assert resources_per_worker(cfg.train) == {"CPU": 2.0, "trainer_slot": 1.0}
    cfg.train.use_gpu = True
    cfg.train.worker_resources = {"A100_80G": 1}
    assert resources_per_worker(cfg.train) == {"CPU": 2.0, "GPU": 1, "A100_80G": 1.0}
    cfg.train.worker_resources = {}
    assert resources_per_worker(cfg.train) == {"CPU": 2.0, "GPU": 1}
