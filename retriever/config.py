"""One typed configuration schema for every stage, loaded from YAML with dotted CLI overrides.

    cfg = load_config("configs/quickstart.yaml", ["train.lr=2e-4", "sweep.paradigms=[dense]"])

Unknown keys, wrong types and impossible values are errors that name the file, the key path
and what is allowed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from retriever.errors import UserError

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
    init_weights: str | None = Field(
        None,
        description="full weights (a transformers model directory, e.g. MNTP with full fine-tuning) to start from",
    )
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
        256, gt=0, description="(text, position) cells per LM-head chunk: bounds the [cells, vocab] logits memory"
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


# The pyarrow filesystems `train.storage` may name (`pyarrow.fs.FileSystem.from_uri`); `mock` is memory-only.
STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file")


def check_storage_uri(value: str) -> str:
    """`value` when it has the form of a `train.storage` URI (checked offline: nothing is contacted), else a
    ValueError saying what is wrong and what to write instead."""
    from urllib.parse import urlsplit

    example = "s3://bucket/path, gs://bucket/path or file:///abs/path on a mount every node shares"
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if not scheme:
        if value.startswith("/"):
            raise ValueError(
                f"{value!r} is a plain path; write it as a URI, file://{value}, if every node of the cluster mounts "
                "it, or leave train.storage unset for <train.output_dir>/ray on one node"
            )
        raise ValueError(
            f"{value!r} is a relative path (each Ray process would resolve it in its own working directory); give a "
            f"URI: {example}"
        )
    if scheme not in STORAGE_SCHEMES:
        raise ValueError(
            f"{value!r}: unknown filesystem scheme {parts.scheme!r}; use one of {', '.join(STORAGE_SCHEMES)} "
            f"(e.g. {example})"
        )
    if scheme == "file":
        if parts.netloc:
            raise ValueError(
                f"{value!r} names a host ({parts.netloc!r}); a file URI takes three slashes before an absolute "
                f"path: file:///{parts.netloc}{parts.path}"
            )
        if not parts.path.startswith("/"):
            raise ValueError(f"{value!r}: a file URI needs an absolute path, e.g. file:///mnt/shared/ray")
    elif not parts.netloc:
        raise ValueError(
            f"{value!r} names no bucket or host after {parts.scheme}://, e.g. {parts.scheme}://bucket/path"
        )
    return value


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
    max_failures: int = Field(
        0, ge=0, description="worker failures a Ray Train run survives, each resuming from its last checkpoint"
    )
    output_dir: str = Field("runs", description="run folders (exported encoders), sweeps and the default MLflow store")
    storage: str | None = Field(
        None,
        description="where Ray Train keeps checkpoints and run state: a URI (s3://bucket/path, gs://bucket/path, "
        "file:///abs/path on a mount every node shares); default: <output_dir>/ray on each node's own disk, so a run "
        "over several nodes needs it",
    )
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each Ray Train worker holds besides cpus_per_worker and use_gpu's GPU, "
        "e.g. {trainer_slot: 1} or an accelerator type {A100_80G: 1}",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a NaN/inf loss or gradient: `stop` with an error naming the step, or `skip` that optimizer "
        "step (logged as skipped_steps; it still counts toward the budget, its FLOPs were spent)",
    )

    @field_validator("storage")
    @classmethod
    def _check_storage(cls, value: str | None) -> str | None:
        return None if value is None else check_storage_uri(value)

    @field_validator("worker_resources")
    @classmethod
    def _check_worker_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if name.upper() in {"CPU", "GPU"}:
                setting = "train.cpus_per_worker" if name.upper() == "CPU" else "train.use_gpu"
                raise ValueError(
                    f"{name!r} is not a custom resource: set a worker's {name.upper()}s with {setting}; "
                    "worker_resources holds the others (e.g. {trainer_slot: 1})"
                )
            if not name:
                raise ValueError("a resource name is empty")
            if amount <= 0:
                raise ValueError(f"{name!r}: {amount} is not a positive amount (drop the key to hold none)")
        return resources


class MntpConfig(StrictModel):
    """Masked next-token prediction: the optional bidirectional adaptation stage."""

    enabled: bool = False
    corpus: str = Field("synthetic", description="texts to adapt on: `synthetic`, a dataset id, or a text file")
    steps: int = Field(10_000, gt=0)
    batch_size: int = Field(32, gt=0)
    max_length: int = Field(512, gt=1)
    mask_probability: float = Field(0.2, gt=0, lt=1)
    lr: float = Field(5e-5, gt=0)


class BowConfig(StrictModel):
    """Bag-of-words pre-training: each text's own representation (the cell's paradigm) learns to predict the text's
    terms; once per backbone x paradigm before the grid, after MNTP when both run."""

    enabled: bool = False
    corpus: str = Field("synthetic", description="texts: `synthetic`, a dataset id, or a text file")
    steps: int = Field(300, gt=0)
    batch_size: int = Field(64, gt=0, description="texts per step, cut to encoder.passage_max_length tokens")
    lr: float = Field(2e-3, gt=0)
    temperature: float = Field(0.05, gt=0, description="dense: the LM head's logits of the pooled vector / this")


class DataConfig(StrictModel):
    train: str = Field(
        "synthetic", description="training examples: a parquet file, a folder of parquet shards, or `synthetic`"
    )
    docs: str | None = Field(
        None, description="dataset id whose docs give the passage texts when the examples hold ids"
    )
    synthetic_seed: int = 0
    synthetic_docs: int = Field(2000, gt=0)
    synthetic_train_queries: int = Field(800, gt=0)
    synthetic_test_queries: int = Field(200, gt=0)
    synthetic_candidates: int = Field(
        50, gt=0, description="BM25 candidates per training query: the pool of hard negatives and teacher scores"
    )


class EvalConfig(StrictModel):
    datasets: list[str] = Field(default_factory=lambda: ["synthetic/test"])
    top_k: int | None = Field(
        None,
        gt=0,
        description="documents retrieved per query; default: the protocol's depth (1000 MS MARCO / TREC DL, 100 "
        "BEIR). Must reach the protocol's deepest metric cutoff (e.g. 1000 for recall@1000)",
    )
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


# Keys a cell override may not set: the grid's axes (the selectors pick them), the sweep itself, and what every cell
# of a sweep shares (the FLOP budget, where runs, their checkpoints and tracking live).
CELL_FIXED_KEYS = (
    "name",
    "sweep",
    "budget",
    "tracking",
    "train.output_dir",
    "train.storage",
    "backbone.name",
    "encoder.paradigm",
    "loss.name",
)


class CellOverride(StrictModel):
    """Settings of the sweep cells that match every given selector (None = any value of that axis).

    `set` maps dotted keys to values (`train.batch_size: 1024`); a nested mapping is the same as its dotted leaves
    (`backbone.lora: {r: 8}` is `backbone.lora.r: 8`). Keys and values are checked against the config schema when
    the config is loaded.
    """

    backbones: list[str] | None = Field(None, min_length=1)
    paradigms: list[Paradigm] | None = Field(None, min_length=1)
    losses: list[LossName] | None = Field(None, min_length=1)
    set: dict[str, Any] = Field(min_length=1, description="dotted config key -> value for the matching cells")

    @field_validator("set")
    @classmethod
    def _flatten_set(cls, values: dict[str, Any]) -> dict[str, Any]:
        return _dotted_leaves(values)

    def matches(self, backbone: str, paradigm: str, loss: str | None) -> bool:
        """Whether this entry applies; `loss` None (a stage shared by every loss) matches only loss-free entries."""
        return all(
            chosen is None or value in chosen
            for chosen, value in ((self.backbones, backbone), (self.paradigms, paradigm), (self.losses, loss))
        )

    def problems(self) -> list[str]:
        """What is wrong with `set`: fixed or unknown keys and invalid values, each naming its dotted key."""
        if not self.set:
            return ["sets nothing (give at least one dotted key under `set`)"]
        fixed = [k for k in self.set if any(k == f or k.startswith(f + ".") for f in CELL_FIXED_KEYS)]
        if fixed:
            return [
                f"sets {key!r}, which no override may set (fixed per sweep: {', '.join(CELL_FIXED_KEYS)}; the "
                "axes are chosen by the backbones/paradigms/losses selectors)"
                for key in fixed
            ]
        data: dict[str, Any] = {}
        try:
            for key, value in self.set.items():
                _set_path(data, key.split("."), value, f"{key!r}")
            ExperimentConfig.model_validate(data)
        except ConfigError as exc:
            return [f"sets {exc}"]
        except ValidationError as exc:
            return [f"sets {self._describe(where, what)}" for where, what in _errors(exc, ExperimentConfig)]
        return []

    def _describe(self, where: str, what: str) -> str:
        """`'key': what` for an error at the dotted path `where`, naming the `set` key behind it."""
        for key in self.set:
            if key == where:
                return f"{key!r}: {what}"
            if key.startswith(where + ".") or where.startswith(key + "."):
                return f"{key!r}: {where}: {what}"
        return f"{where}: {what}"


class SweepConfig(StrictModel):
    backbones: list[str] = Field(default_factory=lambda: ["tiny-s"], min_length=1)
    paradigms: list[Paradigm] = Field(default_factory=lambda: ["sparse", "dense"], min_length=1)
    losses: list[LossName] = Field(default_factory=lambda: ["cl", "kd", "cl+kd"], min_length=1)
    max_concurrent: int | None = Field(None, gt=0)
    cpus_per_trial: float = Field(0.1, gt=0, description="resources of the Tune driver of one cell")
    baselines: bool = Field(True, description="evaluate BM25 and every backbone x paradigm at step 0 before the grid")
    overrides: list[CellOverride] = Field(
        default_factory=list,
        description="per-cell settings (e.g. batch size per backbone and loss), applied in order: later wins",
    )

    @field_validator("overrides")
    @classmethod
    def _check_overrides(cls, overrides: list[CellOverride]) -> list[CellOverride]:
        problems = [f"override {index} {line}" for index, o in enumerate(overrides) for line in o.problems()]
        if problems:
            raise ValueError("\n    ".join(problems))
        return overrides


class ExperimentConfig(StrictModel):
    name: str = "retriever"
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    budget: BudgetConfig = Field(default_factory=lambda: BudgetConfig(max_steps=100))
    train: TrainConfig = Field(default_factory=TrainConfig)
    mntp: MntpConfig = Field(default_factory=MntpConfig)
    bow: BowConfig = Field(default_factory=BowConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)


# --------------------------------------------------------------------------------------------------------------
# Serving (`retriever serve`): what is served and how the Ray Serve deployments are sized.

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ServedModelConfig(StrictModel):
    name: str = Field(pattern=MODEL_NAME_PATTERN, description="the name clients pass as `model`")
    encoder: str = Field(description="an encoder folder, or an MLflow model URI (models:/<name>@<alias>)")
    index: str = Field(description="the index folder built from this encoder's passage encodings")
    corpus: str | None = Field(None, description="dataset id whose passage texts are returned with the hits")
    query_max_length: int | None = Field(None, gt=0, description="default: the encoder's query length")


class AutoscalingConfig(StrictModel):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _check_range(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class DeploymentConfig(StrictModel):
    num_cpus: float = Field(0.25, gt=0, description="CPUs per replica (fractional on small machines)")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs per replica; default: 1 for the encoder when the cluster has a GPU, else 0"
    )
    max_ongoing_requests: int = Field(64, gt=0)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    max_batch_size: int = Field(32, gt=0, description="dynamic batching: most requests per batch")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="dynamic batching: longest wait to fill a batch")


class RouterDeploymentConfig(DeploymentConfig):
    max_batch_size: int = Field(64, gt=0, description="searches answered together (one call per model and shard)")
    batch_wait_timeout_s: float = Field(
        0.005,
        ge=0,
        description="longest wait of a free batch slot for the searches expected back (as many as were outstanding "
        "before); 0: none",
    )
    max_concurrent_batches: int = Field(
        1,
        gt=0,
        description="batches in flight at once for each model (or hybrid set of models); more overlap one batch's "
        "encoding with another's search, but split a closed loop of clients into smaller batches",
    )


class ServeLimits(StrictModel):
    max_query_chars: int = Field(2000, gt=0)
    max_passage_chars: int = Field(20000, gt=0, description="per passage sent to /encode")
    max_texts: int = Field(64, gt=0, description="texts per /encode call")
    max_body_bytes: int = Field(1_000_000, gt=0)


class ServeConfig(StrictModel):
    models: list[ServedModelConfig] = Field(min_length=1)
    host: str = Field("127.0.0.1", description="interface the HTTP proxy binds; 0.0.0.0 exposes it")
    port: int = Field(8000, gt=0, lt=65536)
    app_name: str = "retriever"
    auth_token_env: str | None = Field(
        None, description="environment variable holding the bearer token; unset = no authentication"
    )
    limits: ServeLimits = Field(default_factory=ServeLimits)
    shard_timeout_s: float = Field(5.0, gt=0, description="how long a search waits for each shard")
    encoder_timeout_s: float = Field(10.0, gt=0, description="how long a request waits for the query encoder")
    on_shard_timeout: Literal["error", "partial"] = Field(
        "error",
        description="error: 503 with Retry-After; partial: the hits of the shards that answered, "
        "flagged `partial` with the missing shards named",
    )
    retry_after_s: int = Field(2, gt=0)
    request_timeout_s: float = Field(30.0, gt=0, description="end-to-end HTTP timeout of the proxy")
    # The router sends each of them one call per batch; their own batching gathers calls of several routers.
    encoder: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(num_cpus=0.5, batch_wait_timeout_s=0))
    shards: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(batch_wait_timeout_s=0))
    router: RouterDeploymentConfig = Field(default_factory=RouterDeploymentConfig)
    max_models_per_replica: int = Field(4, gt=0, description="encoders one QueryEncoder replica keeps loaded")
    access_log: bool = Field(
        False, description="a log line per request in every replica (costs CPU on every hop; errors are logged anyway)"
    )
    ingress: Literal["auto", "haproxy", "proxy"] = Field(
        "auto",
        description="how HTTP reaches the router on the Ray that `retriever serve` starts: haproxy = Serve's HAProxy "
        "in front of router replicas that serve HTTP themselves (fewest hops); proxy = Serve's Python proxy actor; "
        "auto = haproxy when the `haproxy` binary is installed. A cluster's own environment decides for `--address`",
    )

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ServedModelConfig]) -> list[ServedModelConfig]:
        names = [m.name for m in models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"model names must be unique; repeated: {', '.join(repeated)}")
        return models


class FirstStageConfig(StrictModel):
    """Where a query's candidates come from."""

    kind: Literal["bm25", "encoder", "run"] = Field(
        "bm25",
        description="bm25: the corpus's BM25 index (built once); encoder: a trained encoder with its index "
        "folder; run: a TREC run file",
    )
    index: str | None = Field(
        None,
        description="bm25: the saved BM25 index folder (built there when missing; default <out>/_bm25); encoder: "
        "the index folder built from the encoder's passages",
    )
    encoder: str | None = Field(None, description="encoder: the encoder folder whose passages the index holds")
    run: str | None = Field(None, description="run: the TREC run file of candidates")
    query_max_length: int | None = Field(None, gt=0, description="encoder: default the encoder's query length")

    @model_validator(mode="after")
    def _needs(self) -> FirstStageConfig:
        if self.kind == "encoder" and (self.encoder is None or self.index is None):
            raise ValueError("first_stage.kind encoder needs first_stage.encoder and first_stage.index")
        if self.kind == "run" and self.run is None:
            raise ValueError("first_stage.kind run needs first_stage.run (a TREC run file)")
        if self.kind != "run" and self.run is not None:
            raise ValueError(f"first_stage.run is only read with kind run (kind is {self.kind})")
        if self.kind != "encoder" and (self.encoder is not None or self.query_max_length is not None):
            raise ValueError(f"first_stage.encoder and query_max_length are only read with kind encoder ({self.kind})")
        return self


class TeacherConfig(StrictModel):
    """Who scores the (query, passage) pairs for distillation."""

    kind: Literal["cross_encoder", "file", "none"] = Field(
        "cross_encoder", description="cross_encoder: a sequence-classification model; file: published scores; none"
    )
    model: str = Field(
        "cross-encoder/ms-marco-MiniLM-L6-v2", min_length=1, description="cross_encoder: HF hub id or local folder"
    )
    file: str | None = Field(None, description="file: qid docid score TSV, or MarginMSE lines")
    max_length: int = Field(256, gt=2, description="tokens per (query, passage) pair")
    batch_size: int = Field(64, gt=0, description="pairs per forward pass (pairs of similar length batched together)")
    actors: int = Field(
        1, ge=1, description="teacher actors on Ray (workers > 0); as many as workers on CPU: one actor does both"
    )
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs reserved per teacher actor (threads: torch_threads)")
    gpus_per_actor: float = Field(0.0, ge=0, description="> 0 puts the teacher on a GPU")
    torch_threads: int | None = Field(None, gt=0, description="intra-op threads per teacher (default: torch's)")

    @model_validator(mode="after")
    def _needs(self) -> TeacherConfig:
        if self.kind == "file" and self.file is None:
            raise ValueError("teacher.kind file needs teacher.file")
        if self.kind != "file" and self.file is not None:
            raise ValueError(f"teacher.file is only read with kind file (kind is {self.kind})")
        return self


class RankRange(StrictModel):
    """Negatives drawn from first-stage ranks ``first``..``last`` (1-based, inclusive)."""

    first: int = Field(1, ge=1)
    last: int = Field(gt=0)
    count: int | None = Field(None, gt=0, description="negatives drawn from the range; default: all of it")

    @model_validator(mode="after")
    def _ordered(self) -> RankRange:
        if self.last < self.first:
            raise ValueError(f"rank range {self.first}..{self.last}: last must be >= first")
        return self


class MineConfig(StrictModel):
    """`retriever mine`: candidates → pool → teacher scores → training-example shards."""

    dataset: str = Field(min_length=1, description="dataset id giving queries, qrels and the corpus")
    queries: str | None = Field(None, description="queries file (TSV or BEIR JSONL) instead of the dataset's")
    qrels: str | None = Field(None, description="qrels file (TREC or BEIR TSV) instead of the dataset's")
    corpus: str | None = Field(None, description="dataset id of the passages (default: dataset)")
    out: str = Field(min_length=1, description="output folder: part-NNNNN.parquet shards and manifest.json")
    first_stage: FirstStageConfig = Field(default_factory=FirstStageConfig)
    pool_size: int = Field(100, gt=0, description="candidates retrieved per query (before removing positives)")
    negatives: list[RankRange] | None = Field(
        None, min_length=1, description="rank ranges to draw negatives from; default: the whole pool"
    )
    false_negative_margin: float | None = Field(
        None,
        description="drop candidates the teacher scores above (positive - margin); needs a teacher; None keeps all",
    )
    seed: int = 0
    inline_text: bool = Field(False, description="store passage texts in the shards (else ids; train with data.docs)")
    queries_per_shard: int = Field(10_000, gt=0, description="the unit of writing and of resuming")
    max_queries: int | None = Field(None, gt=0, description="mine only the first N queries with a positive")
    workers: int = Field(
        1, ge=0, description="0: one process, no Ray; else Ray Data with this many first-stage actors"
    )
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs of one first-stage actor")
    queries_per_batch: int = Field(64, gt=0, description="queries handed to a first-stage or teacher call")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)

    @model_validator(mode="after")
    def _consistent(self) -> MineConfig:
        if self.false_negative_margin is not None and self.teacher.kind == "none":
            raise ValueError("false_negative_margin filters by teacher score: it needs a teacher (teacher.kind)")
        for r in self.negatives or []:
            if r.last > self.pool_size:
                raise ValueError(f"rank range {r.first}..{r.last} reaches past pool_size {self.pool_size}")
        return self


class ConfigError(UserError, ValueError):
    """A configuration problem, with where it was found and how to fix it."""


AnyConfig = TypeVar("AnyConfig", bound=BaseModel)


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
        raise ConfigError(f"override {text!r}: value is not valid YAML ({_yaml_problem(exc)})") from None
    return path, value


def _set_path(data: dict[str, Any], path: list[str], value: Any, what: str) -> None:
    """Set `data[path[0]]...[path[-1]] = value`, creating missing sections; `what` names the setting in errors."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{what}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def _dotted_leaves(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"backbone.lora": {"r": 8}}` → `{"backbone.lora.r": 8}` (config leaves are scalars and lists)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if any(not part for part in str(key).split(".")):
            raise ValueError(f"{name!r}: empty part in dotted key")
        if isinstance(value, Mapping):
            out.update(_dotted_leaves(value, f"{name}."))
        else:
            out[name] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        _set_path(merged, path, value, f"override {text!r}")
    return merged


def cell_settings(cfg: ExperimentConfig, backbone: str, paradigm: str, loss: str) -> ExperimentConfig:
    """`cfg` for one sweep cell: its axes set, then every matching `sweep.overrides` entry applied in order (later
    wins). Shared by the sweep (`retriever.sweep.cell_config`) and the planner, so plans equal what runs."""
    return _with_overrides(cfg, backbone, paradigm, loss)


def stage_settings(cfg: ExperimentConfig, backbone: str, paradigm: str) -> ExperimentConfig:
    """`cfg` for a pre-training stage of one backbone x paradigm (shared by all its losses): the overrides that
    select no loss and match both axes, applied in order."""
    return _with_overrides(cfg, backbone, paradigm, None)


def _with_overrides(cfg: ExperimentConfig, backbone: str, paradigm: str, loss: str | None) -> ExperimentConfig:
    data = cfg.model_dump(mode="json")
    data["backbone"]["name"], data["encoder"]["paradigm"] = backbone, paradigm
    if loss is not None:
        data["loss"]["name"] = loss
    for index, override in enumerate(cfg.sweep.overrides):
        if override.matches(backbone, paradigm, loss):
            for key, value in override.set.items():
                _set_path(data, key.split("."), copy.deepcopy(value), f"sweep.overrides[{index}] key {key!r}")
    where = f"cell ({backbone}, {paradigm}, {loss})" if loss else f"stage ({backbone}, {paradigm})"
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


def unmatched_overrides(cfg: ExperimentConfig) -> list[int]:
    """Indices of `sweep.overrides` that match no cell of the grid (a typo in a selector, or a narrowed grid)."""
    cells = [(b, p, loss) for b in cfg.sweep.backbones for p in cfg.sweep.paradigms for loss in cfg.sweep.losses]
    return [i for i, o in enumerate(cfg.sweep.overrides) if not any(o.matches(*cell) for cell in cells)]


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section behind a field's type: `X`, `list[X]` or `X | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_section_model, get_args(annotation)) if m is not None), None)


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the section that holds the key at `loc` (list indices are skipped)."""
    current: type[BaseModel] = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(str(part))
        section = _section_model(getattr(field, "annotation", None))
        if section is None:
            return []
        current = section
    return list(current.model_fields)


def _errors(exc: ValidationError, model: type[BaseModel]) -> list[tuple[str, str]]:
    """(dotted key path, what is wrong) per validation error."""
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "<top level>"
        if err["type"] == "extra_forbidden":
            out.append((where, f"unknown key; allowed keys here: {', '.join(_allowed_keys(model, loc))}"))
        elif err["type"] == "value_error" and "error" in err.get("ctx", {}):
            out.append((where, str(err["ctx"]["error"])))  # our validators' messages say what to do
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            out.append((where, f"{err['msg']}{shown}"))
    return out


def format_validation_error(exc: ValidationError, source: str, model: type[BaseModel] = ExperimentConfig) -> str:
    """One line for one problem (`source: invalid configuration: key.path: what`), else one line per problem."""
    problems = _errors(exc, model)
    if len(problems) == 1:
        return f"{source}: invalid configuration: {problems[0][0]}: {problems[0][1]}"
    lines = [f"{source}: invalid configuration ({len(problems)} problems):"]
    lines.extend(f"  {where}: {what}" for where, what in problems)
    return "\n".join(lines)


def config_from_dict(
    data: dict[str, Any],
    source: str = "<config>",
    overrides: list[str] | None = None,
    model: type[AnyConfig] = ExperimentConfig,  # type: ignore[assignment]
) -> AnyConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    merged = apply_overrides(data, overrides or [])
    where = source if not overrides else f"{source} (with overrides {' '.join(overrides)})"
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where, model)) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    model: type[AnyConfig] = ExperimentConfig,  # type: ignore[assignment]
) -> AnyConfig:
    """Load a config (an experiment's by default, or `model`'s) from YAML, or the defaults when `path` is None,
    and apply overrides."""
    if path is None:
        return config_from_dict({}, "<defaults>", overrides, model)
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.y*ml"))
        hint = f"one of: {', '.join(inside[:10])}" if inside else "e.g. configs/quickstart.yaml"
        raise ConfigError(f"{path}: is a folder, not a config file; pass a YAML file ({hint})")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (pass a YAML file, e.g. configs/quickstart.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{_yaml_location(path, exc)}: not valid YAML ({_yaml_problem(exc)})") from None
    if data is None:
        # An empty file is a mistake (a truncated copy, the wrong file), not a request for the defaults.
        raise ConfigError(
            f"{path}: the config file is empty (no settings); start from configs/quickstart.yaml, or set at least "
            "one section (e.g. `backbone: {name: tiny-s}`)"
        )
    return config_from_dict(data, str(path), overrides, model)


def _yaml_location(path: Path, exc: yaml.YAMLError) -> str:
    """`file:line:column` of a YAML error (the file alone when PyYAML gives no position)."""
    mark = getattr(exc, "problem_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What PyYAML found wrong, in one line (its own text spans several lines and names `<unicode string>`)."""
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    return "; ".join(p for p in parts if p) or " ".join(str(exc).split())


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
