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
