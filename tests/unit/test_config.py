from __future__ import annotations

from pathlib import Path

import pytest

from retriever.config import ConfigError, ExperimentConfig, flatten, load_config, parse_override


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_match_the_paper_recipe():
    cfg = load_config()
    assert cfg.backbone.lora.r == 16 and cfg.backbone.lora.alpha == 32 and cfg.backbone.lora.dropout == 0.05
    assert cfg.backbone.lora.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert (cfg.encoder.query_max_length, cfg.encoder.passage_max_length) == (64, 128)
    assert cfg.encoder.temperature == 0.01 and cfg.encoder.add_bos is True
    assert (cfg.loss.flops_query, cfg.loss.flops_passage, cfg.loss.num_negatives) == (0.05, 0.04, 16)
    assert (cfg.train.lr, cfg.train.warmup_ratio) == (1e-4, 0.04)


def test_yaml_and_dotted_overrides(tmp_path):
    path = write(tmp_path, "backbone:\n  name: tiny-m\ntrain:\n  lr: 3.0e-4\n")
    cfg = load_config(path, ["train.lr=2e-4", "sweep.paradigms=[dense]", "encoder.add_bos=false"])
    assert cfg.backbone.name == "tiny-m"
    assert cfg.train.lr == 2e-4
    assert cfg.sweep.paradigms == ["dense"]
    assert cfg.encoder.add_bos is False


def test_unknown_key_names_file_path_and_allowed_keys(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "train.lrr: unknown key" in message
    assert "lr," in message and "warmup_ratio" in message


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"trian: unknown key; allowed keys here: name, backbone"):
        load_config(write(tmp_path, "trian: {}\n"))


def test_wrong_type_and_impossible_values(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr: .*number.*'fast'"):
        load_config(write(tmp_path, "train:\n  lr: fast\n"))
    with pytest.raises(ConfigError, match=r"train\.lr: Input should be greater than 0"):
        load_config(None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"encoder\.paradigm: Input should be 'dense' or 'sparse'"):
        load_config(None, ["encoder.paradigm=hybrid"])
    with pytest.raises(ConfigError, match=r"sweep\.losses\.1: Input should be 'cl', 'kd' or 'cl\+kd'"):
        load_config(None, ["sweep.losses=[cl, ce]"])


def test_override_errors_say_what_was_expected(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="with overrides train.bogus=1"):
        load_config(None, ["train.bogus=1"])
    with pytest.raises(ConfigError, match="'lr' is a value, not a section"):
        load_config(write(tmp_path, "train:\n  lr: 0.1\n"), ["train.lr.x=1"])
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


def test_budget_needs_exactly_one_of_flops_and_steps(tmp_path):
    with pytest.raises(ConfigError, match="set exactly one of budget.flops or budget.max_steps"):
        load_config(write(tmp_path, "budget:\n  flops: 1.0e15\n  max_steps: 10\n"))
    cfg = load_config(write(tmp_path, "budget:\n  flops: 1.0e15\n"))
    assert cfg.budget.flops == 1e15 and cfg.budget.max_steps is None


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_flatten_for_tracking():
    flat = flatten(ExperimentConfig())
    assert flat["train.lr"] == 1e-4
    assert flat["backbone.lora.r"] == 16
    assert all("." in key or key == "name" for key in flat)


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[2] / "configs"
    for path in sorted(root.glob("*.yaml")):
        load_config(path)
