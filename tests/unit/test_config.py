from __future__ import annotations

import re
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
    with pytest.raises(ConfigError, match=r"exp.yaml:2:8: not valid YAML \(mapping values are not allowed here\)"):
        load_config(write(tmp_path, "train:\n  lr: a: b\n"))


def test_an_empty_file_a_folder_or_non_utf8_text_is_not_a_config(tmp_path):
    for text in ("", "\n", "# nothing set yet\n"):
        with pytest.raises(ConfigError, match=r"exp.yaml: the config file is empty"):
            load_config(write(tmp_path, text))
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "a.yaml").write_text("name: a\n")
    with pytest.raises(
        ConfigError, match=r"configs: is a folder, not a config file; pass a YAML file \(one of: a.yaml\)"
    ):
        load_config(folder)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8 text"):
        load_config(latin1)
    assert load_config(None).name == "retriever"  # defaults in code stay available


def test_flatten_for_tracking():
    flat = flatten(ExperimentConfig())
    assert flat["train.lr"] == 1e-4
    assert flat["backbone.lora.r"] == 16
    assert all("." in key or key == "name" for key in flat)


def test_shipped_configs_load():
    from retriever.config import MineConfig

    root = Path(__file__).resolve().parents[2] / "configs"
    schemas = {"mine.yaml": MineConfig}  # the stage configs; every other file is an experiment
    paths = sorted(root.glob("*.yaml"))
    assert {p.name for p in paths} >= {"quickstart.yaml", "paper.yaml", "mine.yaml"}
    for path in paths:
        if path.name in schemas:
            load_config(path, model=schemas[path.name])
        else:
            load_config(path)


OVERRIDES = """
sweep:
  backbones: [tiny-s, tiny-m]
  paradigms: [sparse, dense]
  losses: [cl, kd]
  overrides:
    - losses: [kd]
      set: {train.batch_size: 64, train.seed: 2}
    - backbones: [tiny-m]
      losses: [kd]
      set: {train: {batch_size: 32}, backbone.lora: {r: 8}}
    - paradigms: [dense]
      set: {encoder.pooling: last}
"""


def test_cell_overrides_apply_in_order_later_wins(tmp_path):
    from retriever.config import cell_settings, unmatched_overrides
    from retriever.sweep.grid import cell_config

    cfg = load_config(write(tmp_path, OVERRIDES))
    # Nested mappings are stored as their dotted leaves.
    assert cfg.sweep.overrides[1].set == {"train.batch_size": 32, "backbone.lora.r": 8}
    cells = {
        (b, p, loss): cell_config(cfg, b, p, loss)
        for b in ("tiny-s", "tiny-m")
        for p in ("sparse", "dense")
        for loss in ("cl", "kd")
    }
    batch = {key: cell.train.batch_size for key, cell in cells.items()}
    assert batch == {
        ("tiny-s", "sparse", "cl"): 8,
        ("tiny-s", "dense", "cl"): 8,
        ("tiny-s", "sparse", "kd"): 64,
        ("tiny-s", "dense", "kd"): 64,
        ("tiny-m", "sparse", "cl"): 8,
        ("tiny-m", "dense", "cl"): 8,
        ("tiny-m", "sparse", "kd"): 32,  # the later, more specific entry wins
        ("tiny-m", "dense", "kd"): 32,
    }
    tiny_m_kd = cells[("tiny-m", "dense", "kd")]
    assert (tiny_m_kd.train.seed, tiny_m_kd.backbone.lora.r, tiny_m_kd.encoder.pooling) == (2, 8, "last")
    assert (tiny_m_kd.backbone.name, tiny_m_kd.encoder.paradigm, tiny_m_kd.loss.name) == ("tiny-m", "dense", "kd")
    assert tiny_m_kd.name == "retriever-tiny-m__dense__kd"
    assert (
        cells[("tiny-s", "sparse", "cl")].backbone.lora.r == 16 and cells[("tiny-s", "sparse", "cl")].train.seed == 45
    )
    # The sweep's own config is untouched; cell_settings is what cell_config applies.
    assert cfg.train.batch_size == 8 and cfg.backbone.name == "tiny-s"
    assert cell_settings(cfg, "tiny-m", "dense", "kd").model_dump() == {**tiny_m_kd.model_dump(), "name": cfg.name}
    assert unmatched_overrides(cfg) == []
    narrowed = load_config(write(tmp_path, OVERRIDES), ["sweep.losses=[cl]"])  # narrowing the grid stays valid
    assert unmatched_overrides(narrowed) == [0, 1]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "{losses: [kd], set: {train.batch_sise: 64}}",
            "sets 'train.batch_sise': unknown key; allowed keys here: batch_size, lr",
        ),
        ("{set: {trian.lr: 0.1}}", "sets 'trian.lr': trian: unknown key; allowed keys here: name, backbone"),
        (
            "{set: {backbone: {lora: {rank: 8}}}}",
            "sets 'backbone.lora.rank': unknown key; allowed keys here: enabled, r,",
        ),
        ("{set: {train.batch_size: 0}}", "sets 'train.batch_size': Input should be greater than 0 (got 0)"),
        ("{set: {encoder.pooling: max}}", "sets 'encoder.pooling': Input should be 'mean' or 'last'"),
        ("{set: {budget.flops: 1.0e18}}", "sets 'budget.flops', which no override may set"),
        ("{set: {loss.name: kd}}", "sets 'loss.name', which no override may set"),
    ],
)
def test_cell_override_errors_name_the_key(tmp_path, entry, message):
    """Keys and values of `set` are checked against the config schema at load time; the error names the file, the
    override (by index) and the dotted key."""
    path = write(tmp_path, f"sweep:\n  overrides:\n    - {{set: {{train.lr: 0.2}}}}\n    - {entry}\n")
    with pytest.raises(ConfigError, match=re.escape(f"sweep.overrides: override 1 {message}")) as err:
        load_config(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{losses: [ce], set: {train.lr: 0.1}}", "sweep.overrides.0.losses.0: Input should be 'cl', 'kd' or 'cl+kd'"),
        ("{losses: [kd]}", "sweep.overrides.0.set: Field required"),
        ("{backbones: [], set: {train.lr: 0.1}}", "sweep.overrides.0.backbones: List should have at least 1 item"),
        ("{set: {train.lr: 0.1}, batch: 3}", "sweep.overrides.0.batch: unknown key; allowed keys here: backbones,"),
    ],
)
def test_cell_override_selectors_are_typed(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, f"sweep:\n  overrides:\n    - {entry}\n"))


@pytest.mark.parametrize(
    "uri",
    [
        "file:///mnt/shared/ray",
        "s3://bucket/checkpoints",
        "s3://bucket/checkpoints?region=eu-west-1",
        "gs://bucket",
        "abfss://container@account.dfs.core.windows.net/ray",
    ],
)
def test_train_storage_takes_a_uri(uri):
    assert load_config(None, [f"train.storage={uri}"]).train.storage == uri
    assert load_config(None).train.storage is None  # unset: <output_dir>/ray, one node


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("runs/ray", "train.storage: 'runs/ray' is a relative path (each Ray process would resolve it in its own"),
        ("/mnt/shared/ray", "'/mnt/shared/ray' is a plain path; write it as a URI, file:///mnt/shared/ray, if every"),
        ("ftp://host/ray", "unknown filesystem scheme 'ftp'; use one of s3, gs, gcs, abfs, abfss, hdfs, viewfs, file"),
        ("file://mnt/shared/ray", "names a host ('mnt'); a file URI takes three slashes before an absolute path: "),
        ("file:ray", "'file:ray': a file URI needs an absolute path, e.g. file:///mnt/shared/ray"),
        ("s3:///checkpoints", "'s3:///checkpoints' names no bucket or host after s3://, e.g. s3://bucket/path"),
    ],
)
def test_a_train_storage_that_is_not_a_usable_uri_says_what_to_write(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [f"train.storage={value}"])


def test_worker_resources_are_custom_resources_with_positive_amounts(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  worker_resources: {trainer_slot: 1, A100_80G: 0.5}\n"))
    assert cfg.train.worker_resources == {"trainer_slot": 1.0, "A100_80G": 0.5}
    assert load_config(None, ["train.worker_resources.trainer_slot=2"]).train.worker_resources == {"trainer_slot": 2}
    for name, setting in (("CPU", "train.cpus_per_worker"), ("gpu", "train.use_gpu")):
        expected = rf"train\.worker_resources: '{name}' is not a custom resource: .*{setting}"
        with pytest.raises(ConfigError, match=expected):
            load_config(None, [f"train.worker_resources={{{name}: 1}}"])
    with pytest.raises(ConfigError, match=r"'trainer_slot': 0.0 is not a positive amount \(drop the key"):
        load_config(None, ["train.worker_resources={trainer_slot: 0}"])
    with pytest.raises(ConfigError, match=r"train\.worker_resources\.trainer_slot: Input should be a valid number"):
        load_config(None, ["train.worker_resources={trainer_slot: many}"])


def test_the_storage_of_a_sweep_is_shared_by_its_cells(tmp_path):
    path = write(tmp_path, "sweep:\n  overrides:\n    - {set: {train.storage: 'file:///elsewhere'}}\n")
    with pytest.raises(ConfigError, match=re.escape("override 0 sets 'train.storage', which no override may set")):
        load_config(path)
