"""One typed configuration schema for every stage, loaded from YAML with dotted CLI overrides.

    cfg = load_config("configs/quickstart.yaml", ["train.lr=2e-4", "sweep.paradigms=[dense]"])

Unknown keys, wrong types and impossible values are errors that name the file, the key path
and what is allowed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

Paradigm = Literal["dense", "sparse"]
LossName = Literal["cl", "kd", "cl+kd"]


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class LoraConfig(StrictModel):
    enabled: bool = True
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), min_length=1)


class BackboneConfig(StrictModel):
    """Which decoder-only LM, and how it is adapted."""

    name: str = Field("tiny-s", min_length=1, description="preset name (`retriever backbones`), HF hub id or path")
    tokenizer: str | None = Field(None, description="tokenizer path or hub id; default: the backbone's own")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    bidirectional: bool = True
    gradient_checkpointing: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)
    init_adapter: str | None = Field(None, description="LoRA adapter directory to continue training (e.g. MNTP)")
    seed: int = Field(0, description="seed for randomly initialised (tiny) backbones")


class EncoderConfig(StrictModel):
    """The retrieval paradigm and how texts become vectors."""

    paradigm: Paradigm = "sparse"
    pooling: Literal["mean", "last"] = Field("mean", description="dense pooling; `last` = last (EOS) token")
    add_bos: bool = True
    query_max_length: int = Field(64, gt=0)
    passage_max_length: int = Field(128, gt=0)
    temperature: float = Field(0.01, gt=0, description="dense training logits are divided by this")
    sparse_chunk_tokens: int = Field(
        2048, gt=0, description="(text, position) cells per LM-head chunk: bounds the [cells, vocab] logits memory"
    )


class LossConfig(StrictModel):
    name: LossName = "cl"
    kd: Literal["margin_mse", "kl"] = Field("margin_mse", description="the distillation term used by `kd`")
    cl_weight: float = Field(0.5, ge=0, description="weight of InfoNCE in cl+kd")
    kd_weight: float = Field(0.5, ge=0, description="weight of KL in cl+kd")
    num_negatives: int = Field(16, ge=1, description="hard negatives per query (cl, cl+kd, kl)")
    flops_query: float = Field(0.05, ge=0, description="sparse FLOPS regularizer weight on queries")
    flops_passage: float = Field(0.04, ge=0, description="sparse FLOPS regularizer weight on passages")
    flops_ramp_fraction: float = Field(1 / 3, gt=0, le=1, description="quadratic ramp length / planned steps")


class BudgetConfig(StrictModel):
    """Training compute per sweep cell: a FLOP budget (preferred) or a step count."""

    flops: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_of(self) -> BudgetConfig:
        if (self.flops is None) == (self.max_steps is None):
            raise ValueError("set exactly one of budget.flops or budget.max_steps")
        return self


class TrainConfig(StrictModel):
    batch_size: int = Field(8, gt=0, description="queries per optimizer step, over all workers")
    lr: float = Field(1e-4, gt=0)
    warmup_ratio: float = Field(0.04, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)
    seed: int = 45
    num_workers: int = Field(0, ge=0, description="Ray Train workers; 0 = in-process")
    cpus_per_worker: float = Field(0.5, gt=0)
    use_gpu: bool = False
    strategy: Literal["fsdp", "ddp", "deepspeed"] = "fsdp"
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage (strategy: deepspeed)")
    mixed_precision: Literal["no", "bf16"] = "no"
    pad_to_max_length: bool = Field(True, description="fixed shapes make the FLOP plan exact")
    checkpoint_every: int = Field(100, gt=0, description="steps between checkpoints")
    log_every: int = Field(1, gt=0)
    max_failures: int = Field(0, ge=0)
    output_dir: str = "runs"


class MntpConfig(StrictModel):
    """Masked next-token prediction: the optional bidirectional adaptation stage."""

    enabled: bool = False
    corpus: str = Field("synthetic", description="texts to adapt on: `synthetic`, a dataset id, or a text file")
    steps: int = Field(10_000, gt=0)
    batch_size: int = Field(32, gt=0)
    max_length: int = Field(512, gt=1)
    mask_probability: float = Field(0.2, gt=0, lt=1)
    lr: float = Field(5e-5, gt=0)


class DataConfig(StrictModel):
    train: str = Field("synthetic", description="training examples parquet, or `synthetic`")
    docs: str | None = Field(None, description="docs store (parquet/jsonl) when examples hold ids")
    synthetic_seed: int = 0
    synthetic_docs: int = Field(2000, gt=0)
    synthetic_train_queries: int = Field(800, gt=0)
    synthetic_test_queries: int = Field(200, gt=0)


class EvalConfig(StrictModel):
    datasets: list[str] = Field(default_factory=lambda: ["synthetic/test"])
    top_k: int = Field(1000, gt=0)
    query_max_length: int | None = Field(None, gt=0, description="default: the protocol's (64)")
    passage_max_length: int | None = Field(None, gt=0, description="default: the protocol's (192 / 512)")
    batch_size: int = Field(64, gt=0)
    sparse_index: Literal["exact", "seismic"] = "exact"
    dense_index: Literal["flat", "hnsw"] = "flat"
    num_shards: int = Field(1, gt=0, description="index shards per corpus")
    encode_actors: int = Field(0, ge=0, description="Ray Data encoder actors; 0 = encode in this process")
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)


class TrackingConfig(StrictModel):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="default: sqlite:///<output_dir>/mlflow.db")
    experiment: str = "retriever"
    artifact_location: str | None = None


class SweepConfig(StrictModel):
    backbones: list[str] = Field(default_factory=lambda: ["tiny-s"], min_length=1)
    paradigms: list[Paradigm] = Field(default_factory=lambda: ["sparse", "dense"], min_length=1)
    losses: list[LossName] = Field(default_factory=lambda: ["cl", "kd", "cl+kd"], min_length=1)
    max_concurrent: int | None = Field(None, gt=0)
    cpus_per_trial: float = Field(0.1, gt=0, description="resources of the Tune driver of one cell")


class ExperimentConfig(StrictModel):
    name: str = "retriever"
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    budget: BudgetConfig = Field(default_factory=lambda: BudgetConfig(max_steps=100))
    train: TrainConfig = Field(default_factory=TrainConfig)
    mntp: MntpConfig = Field(default_factory=MntpConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)


class ConfigError(ValueError):
    """A configuration problem, with where it was found and how to fix it."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=2e-4` → (["train", "lr"], 0.0002). Values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE, e.g. train.lr=2e-4")
    path = [part for part in key.strip().split(".")]
    if any(not part for part in path):
        raise ConfigError(f"override {text!r}: empty part in key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return merged


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the section that holds the key at `loc`."""
    current: type[BaseModel] = model
    for part in loc[:-1]:
        field = current.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            current = annotation
        else:
            return []
    return list(current.model_fields)


def format_validation_error(exc: ValidationError, source: str, model: type[BaseModel] = ExperimentConfig) -> str:
    lines = [f"{source}: invalid configuration ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "<top level>"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            lines.append(f"  {where}: unknown key; allowed keys here: {', '.join(allowed)}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {where}: {err['msg']}{shown}")
    return "\n".join(lines)


def config_from_dict(
    data: dict[str, Any], source: str = "<config>", overrides: list[str] | None = None
) -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    merged = apply_overrides(data, overrides or [])
    where = source if not overrides else f"{source} (with overrides {' '.join(overrides)})"
    try:
        return ExperimentConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment config from YAML (or defaults when `path` is None) and apply overrides."""
    if path is None:
        return config_from_dict({}, "<defaults>", overrides)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (pass a YAML file, e.g. configs/quickstart.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return config_from_dict(data, str(path), overrides)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1e-4}}` → `{"train.lr": 1e-4}` (for MLflow params)."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
