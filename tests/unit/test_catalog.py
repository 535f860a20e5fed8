"""Config references resolved before a config travels to Ray workers (retriever.data.catalog)."""

from __future__ import annotations

from pathlib import Path

from retriever.config import ExperimentConfig
from retriever.data.catalog import absolute_paths


def make_config(**sections) -> ExperimentConfig:
    return ExperimentConfig.model_validate(sections)


def test_relative_paths_become_absolute_against_the_start_directory(tmp_path: Path):
    (tmp_path / "models" / "my-llama").mkdir(parents=True)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "examples.parquet").write_bytes(b"")
    (tmp_path / "texts.txt").write_text("a text\n")
    cfg = make_config(
        backbone={"name": "models/my-llama", "tokenizer": "models/my-llama", "init_adapter": "adapter"},
        train={"output_dir": "runs"},
        data={"train": "examples.parquet"},
        mntp={"corpus": "texts.txt"},
        tracking={"tracking_uri": "sqlite:///runs/other.db", "artifact_location": "artifacts"},
    )
    resolved = absolute_paths(cfg, tmp_path)
    base = tmp_path.resolve()
    assert resolved.train.output_dir == str(base / "runs")  # made absolute even though it does not exist yet
    assert resolved.backbone.name == resolved.backbone.tokenizer == str(base / "models" / "my-llama")
    assert resolved.backbone.init_adapter == str(base / "adapter")
    assert resolved.data.train == str(base / "examples.parquet")
    assert resolved.mntp.corpus == str(base / "texts.txt")
    assert resolved.tracking.tracking_uri == f"sqlite:///{base / 'runs' / 'other.db'}"
    assert resolved.tracking.artifact_location == str(base / "artifacts")
    assert cfg.train.output_dir == "runs"  # the input is not changed


def test_ids_presets_and_symbolic_names_stay_as_they_are(tmp_path: Path):
    for name in ("tiny-s", "synthetic", "meta-llama"):
        (tmp_path / name).mkdir()  # even a folder of the same name does not turn them into paths
    cfg = make_config(
        backbone={"name": "tiny-s", "tokenizer": "synthetic"},
        data={"train": "synthetic"},
        mntp={"corpus": "msmarco-passage/dev/small"},
        train={"output_dir": str(tmp_path / "elsewhere")},
        tracking={"tracking_uri": "http://mlflow:5000", "artifact_location": "s3://bucket/artifacts"},
    )
    resolved = absolute_paths(cfg, tmp_path)
    assert resolved.backbone.name == "tiny-s" and resolved.backbone.tokenizer == "synthetic"
    assert resolved.data.train == "synthetic" and resolved.mntp.corpus == "msmarco-passage/dev/small"
    assert resolved.train.output_dir == str(tmp_path / "elsewhere")
    assert resolved.tracking.tracking_uri == "http://mlflow:5000"
    assert resolved.tracking.artifact_location == "s3://bucket/artifacts"
    hub = absolute_paths(make_config(backbone={"name": "meta-llama/Llama-3.2-1B"}), tmp_path)
    assert hub.backbone.name == "meta-llama/Llama-3.2-1B"  # a hub id with no local folder stays an id


def test_cells_with_their_own_data_get_their_training_set_built_before_the_grid(tmp_path: Path):
    """A `sweep.overrides` entry that changes a cell's data (here the candidate pool of the KD cells) gets its own
    benchmark folder and training examples, built once by the sweep's preparation, so no two trials build them."""
    from retriever.data.catalog import synthetic_benchmark
    from retriever.sweep.grid import cell_config, prepare

    cfg = make_config(
        train={"output_dir": str(tmp_path)},
        data={"synthetic_docs": 200, "synthetic_train_queries": 20, "synthetic_test_queries": 12},
        loss={"num_negatives": 2},
        budget={"max_steps": 1},
        sweep={
            "backbones": ["tiny-s"],
            "paradigms": ["dense"],
            "losses": ["cl", "kd"],
            "overrides": [{"losses": ["kd"], "set": {"data.synthetic_candidates": 80}}],
        },
    )
    prepared, _ = prepare(cfg)
    cl, kd = (cell_config(prepared, "tiny-s", "dense", loss) for loss in ("cl", "kd"))
    cl_bench, kd_bench = synthetic_benchmark(cl), synthetic_benchmark(kd)
    assert (cl_bench.num_candidates, kd_bench.num_candidates) == (50, 80)
    assert cl_bench.root != kd_bench.root
    for bench in (cl_bench, kd_bench):
        assert (bench.root / "train-examples-2.parquet").is_file()
    pools = {}
    for bench in (cl_bench, kd_bench):
        ranked: dict[str, int] = {}
        for line in bench.candidates_train.read_text().splitlines():
            qid = line.split()[0]
            ranked[qid] = ranked.get(qid, 0) + 1
        pools[bench.num_candidates] = max(ranked.values())
    assert pools[50] <= 50 < pools[80] <= 80
