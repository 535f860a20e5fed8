"""The training entry point: examples that hold passage ids train with the texts of `data.docs`, ids without docs
fail before training, a folder of parquet shards trains as the file it was cut from, a worker's UserError is found
inside Ray's errors, and what each Ray Train worker holds."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_config

from retriever.data.catalog import synthetic_benchmark
from retriever.data.examples import build_synthetic_examples
from retriever.errors import DataFormatError
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


def test_a_folder_of_shards_trains_as_the_file_it_was_cut_from(tmp_path):
    probe = make_config(tmp_path, "shards", budget={"max_steps": 4})
    path = ids_only_examples(probe, tmp_path / "examples.parquet")
    # Two contiguous halves whose name order is the file's order, and a manifest that is not a shard.
    whole = pq.read_table(path)
    folder = tmp_path / "shards"
    folder.mkdir()
    half = whole.num_rows // 2
    pq.write_table(whole.slice(0, half), folder / "part-00000.parquet")
    pq.write_table(whole.slice(half), folder / "part-00001.parquet")
    (folder / "manifest.json").write_text('{"shards": 2}')
    texts = ["kotibo suka butefi fufa", "guvasar ragarer mile"]
    runs = {}
    for name, train in (("from-file", path), ("from-folder", folder)):
        cfg = make_config(
            tmp_path,
            name,
            loss={"name": "cl+kd"},
            budget={"max_steps": 4},
            data={"train": str(train), "docs": "synthetic/train"},
        )
        reports: list[dict[str, float]] = []
        result = run_training(cfg, on_report=reports.append, probe_texts=texts)
        runs[name] = result, [m["loss/total"] for m in reports if "loss/total" in m]
    (from_file, file_losses), (from_folder, folder_losses) = runs["from-file"], runs["from-folder"]
    assert from_folder["steps"] == from_file["steps"] == 4 and len(folder_losses) == 4
    assert (from_folder["flops"], from_folder["tokens"]) == (from_file["flops"], from_file["tokens"])
    assert folder_losses == file_losses
    assert from_folder["probe_encodings"] == from_file["probe_encodings"]


def test_bad_training_folders_fail_before_training(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text("{}")
    cfg = make_config(tmp_path, "empty", data={"train": str(empty), "docs": "synthetic/train"})
    with pytest.raises(DataFormatError, match=r"empty'?: .*a folder without training-example shards \(no \*\.parquet"):
        run_training(cfg)
    cfg = make_config(tmp_path, "absent", data={"train": str(tmp_path / "absent"), "docs": "synthetic/train"})
    with pytest.raises(FileNotFoundError, match=r"absent'?: no such file or folder; .*a folder of parquet shards"):
        run_training(cfg)
    # A folder of id-only shards without data.docs (its first shard has no text columns).
    probe = make_config(tmp_path, "no-docs")
    folder = tmp_path / "ids"
    folder.mkdir()
    ids_only_examples(probe, folder / "part-0.parquet")
    cfg = make_config(tmp_path, "no-docs", data={"train": str(folder)})
    with pytest.raises(ValueError, match=r"ids: the training examples hold passage ids, not texts"):
        run_training(cfg)
    # A shard of the wrong type is named by the trainer's read.
    whole = pq.read_table(folder / "part-0.parquet")
    pq.write_table(whole.set_column(0, "query_id", pa.array(range(whole.num_rows))), folder / "part-1.parquet")
    cfg = make_config(tmp_path, "bad-shard", data={"train": str(folder), "docs": "synthetic/train"})
    with pytest.raises(ValueError, match=r"ids/part-1.parquet: not a training-examples parquet: column 'query_id'"):
        run_training(cfg)
    assert not run_dir_for(cfg).exists()
