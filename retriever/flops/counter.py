"""Analytic training FLOPs of one retrieval, MNTP or bag-of-words step.

What is counted is what `torch.utils.flop_counter.FlopCounterMode` counts: matrix products (2 FLOPs per
multiply-add); elementwise work (norms, softmax, RoPE, activations, pooling) and embedding lookups are free.
For one step of a Llama-style encoder (q/k/v/o/gate/up/down linears) over B queries of padded length Lq and
B·(1+n) passages of padded length Lp:

- forward, per token: 2·N_matmul (decoder linears) + 2·r·(d_in + d_out) per LoRA-adapted linear
  + per layer attention QKᵀ and AV, 4·ctx·heads·head_dim with ctx the padded length (bidirectional attention
  computes the full L×L) + for sparse the LM head 2·d·|V| at every position (pads included);
- backward, input gradients: each matmul costs its forward again for every operand that requires a gradient.
  With a frozen embedding nothing upstream of layer 0's q/k/v base projections needs a gradient, so those three
  get none (their LoRA B matrices still do). Attention's QKᵀ and AV get gradients for both operands (2x forward);
  the sparse head routes each vocabulary entry's gradient to its argmax position: its hidden-state and weight
  gradients are scatter-adds of at most texts·|V| rows (elementwise work, free);
- backward, weight gradients: 2·(weights) per token only for trainable weights: LoRA A and B, or every linear
  including the MNTP LM head (the sparse head: see above) when the whole model is fine-tuned;
- gradient checkpointing re-runs each decoder layer's forward during backward. PyTorch's non-reentrant checkpoint
  stops the re-run as soon as the last tensor saved for backward is restored (early stop, on by default), and that
  tensor is saved by the layer's last matmul before it runs: the down projection (its LoRA B when adapted) is not
  recomputed. transformers also makes the embedding output require grad when checkpointing is enabled, which
  gives layer 0's q/k/v their input gradients back;
- scoring: InfoNCE scores every query against all B·(1+n) passages (B·B·(1+n) dot products of dimension D), KD
  and KL only each query's own 1+n candidates; backward costs twice the forward (both operands). D = hidden size
  (dense) or |V| (sparse). Precomputed teacher scores cost 0. With W workers every rank computes the global loss
  (`retriever.distributed`), so scoring is counted W times.

`attention="fused"` counts fused SDPA kernels as FlopCounterMode does on GPU: the same forward, a backward of five
L×L matmuls (scores recomputed, then dP, dV, dQ, dK), always computed in full.

Entry points: `step_flops` (one global retrieval step), `mntp_flops` (one MNTP step: the head only on masked
positions), `bow_flops`, and `StepCostModel` (per-rank costs of the actual batches, for the training loop).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack

from transformers import PretrainedConfig

from retriever.config import DEFAULT_LORA_TARGETS, ExperimentConfig
from retriever.errors import DataFormatError
from retriever.flops.shapes import COMPONENTS, AttentionKernel, BatchShape, ModelShape, check_lora_targets
from retriever.registry import Registry

# ------------------------------------------------------------------------------------------------ breakdown


def _zeros() -> dict[str, int]:
    return dict.fromkeys(COMPONENTS, 0)


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs of one training step by phase and component (components: `COMPONENTS`)."""

    forward: dict[str, int] = field(default_factory=_zeros)
    input_grad: dict[str, int] = field(default_factory=_zeros)
    weight_grad: dict[str, int] = field(default_factory=_zeros)
    recompute: dict[str, int] = field(default_factory=_zeros)
    tokens: int = 0

    @property
    def forward_total(self) -> int:
        return sum(self.forward.values())

    @property
    def backward_total(self) -> int:
        """Input and weight gradients (the recomputed forward of checkpointing is `recompute_total`)."""
        return sum(self.input_grad.values()) + sum(self.weight_grad.values())

    @property
    def recompute_total(self) -> int:
        return sum(self.recompute.values())

    @property
    def total(self) -> int:
        return self.forward_total + self.backward_total + self.recompute_total

    def component(self, name: str) -> int:
        """All phases of one component."""
        if name not in COMPONENTS:
            raise KeyError(f"unknown FLOP component {name!r}; known: {', '.join(COMPONENTS)}")
        return sum(phase[name] for phase in (self.forward, self.input_grad, self.weight_grad, self.recompute))

    def by_component(self) -> dict[str, int]:
        return {name: self.component(name) for name in COMPONENTS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "forward": dict(self.forward),
            "input_grad": dict(self.input_grad),
            "weight_grad": dict(self.weight_grad),
            "recompute": dict(self.recompute),
            "tokens": self.tokens,
            "total": self.total,
        }


# ---------------------------------------------------------------------------------- paradigms, losses, scoring


@dataclass(frozen=True)
class ParadigmCost:
    """What a paradigm adds on top of the decoder: the representation size and whether the LM head runs."""

    dimension: Callable[[ModelShape], int]
    lm_head: bool


PARADIGM_COSTS: Registry[ParadigmCost] = Registry("paradigm")
PARADIGM_COSTS.add("dense", ParadigmCost(lambda shape: shape.hidden_size, lm_head=False))
PARADIGM_COSTS.add("sparse", ParadigmCost(lambda shape: shape.vocab_size, lm_head=True))

# Scoring kind → dot products per step for (queries B, passages per query k).
SCORING: Registry[Callable[[int, int], int]] = Registry("scoring")
SCORING.add("all", lambda b, k: b * b * k)  # InfoNCE: every query against every passage of the batch
SCORING.add("own", lambda b, k: b * k)  # MarginMSE / KL: each query against its own candidates

# Distillation loss of the "kd" objective → passages per query for n hard negatives.
KD_PASSAGES: Registry[Callable[[int], int]] = Registry("distillation loss")
KD_PASSAGES.add("margin_mse", lambda n: 2)  # the positive and one sampled negative
KD_PASSAGES.add("kl", lambda n: 1 + n)


@dataclass(frozen=True)
class LossCost:
    """How an objective shapes a step: passages per query (from kd, num_negatives) and the score matrices it builds."""

    passages_per_query: Callable[[str, int], int]
    scoring: tuple[str, ...]


LOSS_COSTS: Registry[LossCost] = Registry("loss")
LOSS_COSTS.add("cl", LossCost(lambda kd, n: 1 + n, ("all",)))
LOSS_COSTS.add("kd", LossCost(lambda kd, n: KD_PASSAGES.get(kd)(n), ("own",)))
# ½·InfoNCE over the batch + ½·KL over each query's own candidates: both score matrices are built.
LOSS_COSTS.add("cl+kd", LossCost(lambda kd, n: 1 + n, ("all", "own")))


def passages_per_query(loss: str, kd: str, num_negatives: int) -> int:
    """1 + n for cl, cl+kd and kd=kl; 2 for kd=margin_mse."""
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    return LOSS_COSTS.get(loss).passages_per_query(kd, num_negatives)


# ---------------------------------------------------------------------------------------------- the counter


class _Phases:
    """Mutable accumulator behind `FlopBreakdown`."""

    def __init__(self) -> None:
        self.forward, self.input_grad, self.weight_grad, self.recompute = _zeros(), _zeros(), _zeros(), _zeros()


class _Layer:
    """One decoder layer's cost as its matmuls run; tracks which outputs require grad."""

    def __init__(self, p: _Phases, tokens: int, lora_rank: int | None, lora_targets: frozenset[str]) -> None:
        self.p, self.tokens, self.rank, self.targets = p, tokens, lora_rank, lora_targets
        self.full = lora_rank is None
        self.forward = _zeros()  # kept apart for the checkpoint re-run
        # The matmul whose saved inputs end an early-stopped re-run: the layer's last one (component, FLOPs).
        self.last_saving: tuple[str, int] = ("linear", 0)

    def linear(self, din: int, dout: int, name: str, in_grad: bool) -> bool:
        """Base linear (+ LoRA); returns whether the output requires grad."""
        p, base = self.p, 2 * self.tokens * din * dout
        self.forward["linear"] += base
        p.input_grad["linear"] += base if in_grad else 0
        p.weight_grad["linear"] += base if self.full else 0
        self.last_saving = ("linear", base)
        if self.rank is None or name not in self.targets:
            return in_grad or self.full
        a, b = 2 * self.tokens * din * self.rank, 2 * self.tokens * self.rank * dout
        self.forward["lora"] += a + b
        p.weight_grad["lora"] += a + b
        # B's input (A's output) always requires grad; A's input only when x does.
        p.input_grad["lora"] += b + (a if in_grad else 0)
        self.last_saving = ("lora", b)
        return True


class TrainingOptions(TypedDict, total=False):
    """How the weights train and how a step runs: the keyword options of `step_flops` and `mntp_flops`.

    `lora_rank` (default 16): LoRA of that rank on `lora_targets` (default `DEFAULT_LORA_TARGETS`) over a frozen
    base; None is full fine-tuning (every weight trainable). `gradient_checkpointing` (default False) re-runs each
    layer's forward in backward, stopping early as PyTorch does unless `checkpoint_early_stop` is False.
    `attention` (default "eager") is the kernel whose FLOPs are counted. `embedding_output_requires_grad` defaults
    to what the project's encoder does: true with full fine-tuning or gradient checkpointing (transformers then
    calls `enable_input_require_grads`).
    """

    lora_rank: int | None
    lora_targets: Sequence[str]
    gradient_checkpointing: bool
    attention: AttentionKernel
    embedding_output_requires_grad: bool | None
    checkpoint_early_stop: bool


@dataclass(frozen=True)
class _Setup:
    """How the weights train and how the step runs (shared by every pass of a step)."""

    lora_rank: int | None
    lora_targets: frozenset[str]
    embeds_require_grad: bool
    checkpointing: bool
    early_stop: bool
    attention: AttentionKernel

    @classmethod
    def make(
        cls,
        *,
        lora_rank: int | None = 16,
        lora_targets: Sequence[str] = tuple(DEFAULT_LORA_TARGETS),
        gradient_checkpointing: bool = False,
        attention: AttentionKernel = "eager",
        embedding_output_requires_grad: bool | None = None,
        checkpoint_early_stop: bool = True,
    ) -> _Setup:
        """Validate `TrainingOptions` (these are their defaults) and resolve what they leave implicit."""
        if lora_rank is not None:
            if lora_rank <= 0:
                raise ValueError(f"lora_rank must be positive (or None for full fine-tuning), got {lora_rank}")
            check_lora_targets(lora_targets)
        if attention not in ("eager", "fused"):
            raise ValueError(f"attention must be 'eager' or 'fused', got {attention!r}")
        if embedding_output_requires_grad is None:
            # The project's encoders: a trainable embedding, or transformers' enable_input_require_grads hook that
            # activation_checkpointing_enable installs.
            embedding_output_requires_grad = lora_rank is None or gradient_checkpointing
        return cls(
            lora_rank,
            frozenset(lora_targets) if lora_rank is not None else frozenset(),
            embedding_output_requires_grad,
            gradient_checkpointing,
            checkpoint_early_stop,
            attention,
        )


def _encode(
    p: _Phases, shape: ModelShape, setup: _Setup, texts: int, length: int, head_positions: int, routed: bool = False
) -> None:
    """Add the cost of running `texts` sequences padded to `length` through the decoder (forward, backward,
    recompute), then the LM head on `head_positions` of their final states. `routed`: the sparse max-pooled head,
    whose backward only touches each text's argmax position per vocabulary entry."""
    tokens = texts * length
    full = setup.lora_rank is None
    dims = shape.layer_linears()
    attn_mm = 2 * texts * shape.num_heads * length * length * shape.head_dim  # one of QKᵀ / AV
    x_grad = setup.embeds_require_grad
    for _ in range(shape.num_layers):
        layer = _Layer(p, tokens, setup.lora_rank, setup.lora_targets)
        normed = x_grad or full  # a trainable RMSNorm weight makes the normed input require grad
        q, k, v = (layer.linear(*dims[name], name, normed) for name in ("q_proj", "k_proj", "v_proj"))
        layer.forward["attention"] += 2 * attn_mm
        scores = q or k
        if setup.attention == "eager":
            p.input_grad["attention"] += attn_mm * (int(q) + int(k) + int(scores) + int(v))
        elif q or k or v:
            p.input_grad["attention"] += 5 * attn_mm
        o = layer.linear(*dims["o_proj"], "o_proj", scores or v)
        h = x_grad or o
        normed = h or full
        gate = layer.linear(*dims["gate_proj"], "gate_proj", normed)
        up = layer.linear(*dims["up_proj"], "up_proj", normed)
        down = layer.linear(*dims["down_proj"], "down_proj", gate or up)
        x_grad = h or down
        for name, value in layer.forward.items():
            p.forward[name] += value
        if setup.checkpointing and x_grad:  # layers whose output needs no gradient are never re-run
            for name, value in layer.forward.items():
                p.recompute[name] += value
            if setup.early_stop:
                component, flops = layer.last_saving
                p.recompute[component] -= flops
    head = 2 * head_positions * shape.hidden_size * shape.vocab_size
    p.forward["lm_head"] += head
    if routed:
        return  # both gradients are scatter-adds of at most texts x |V| rows: no product
    p.input_grad["lm_head"] += head if (x_grad or full) else 0
    p.weight_grad["lm_head"] += head if full else 0  # the (tied or untied) head trains only when all weights do


def _score(p: _Phases, dimension: int, queries: int, per_query: int, scoring: Sequence[str], copies: int) -> None:
    """Score matrices of dimension D, forward + gradients for both operands, computed `copies` times."""
    for kind in scoring:
        dots = SCORING.get(kind)(queries, per_query)
        p.forward["scoring"] += copies * 2 * dots * dimension
        p.input_grad["scoring"] += copies * 4 * dots * dimension


def _breakdown(p: _Phases, tokens: int) -> FlopBreakdown:
    return FlopBreakdown(p.forward, p.input_grad, p.weight_grad, p.recompute, tokens=tokens)


def step_flops(
    shape: ModelShape,
    paradigm: str,
    batch: BatchShape,
    *,
    scoring: Sequence[str] = ("all",),
    world_size: int = 1,
    **training: Unpack[TrainingOptions],
) -> FlopBreakdown:
    """FLOPs of one training step (forward + backward of queries and passages, and the loss's score matrices),
    summed over all workers; `batch` is the global batch.

    `scoring` lists the score matrices the loss builds ("all": B x B·(1+n), "own": B x (1+n); see `LOSS_COSTS`).
    With `world_size` W every rank scores the gathered global batch, so scoring counts W times. `training`: see
    `TrainingOptions` (by default LoRA of rank 16 over a frozen base, eager attention, no checkpointing).
    """
    cost = PARADIGM_COSTS.get(paradigm)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    setup = _Setup.make(**training)
    p = _Phases()
    for texts, length in ((batch.queries, batch.query_length), (batch.passages, batch.passage_length)):
        head_positions = texts * length if cost.lm_head else 0
        _encode(p, shape, setup, texts, length, head_positions=head_positions, routed=cost.lm_head)
    _score(p, cost.dimension(shape), batch.queries, batch.passages_per_query, scoring, world_size)
    return _breakdown(p, batch.tokens)


def mntp_flops(
    shape: ModelShape,
    rows: int,
    length: int,
    predicted: int,
    **training: Unpack[TrainingOptions],
) -> FlopBreakdown:
    """FLOPs of one masked next-token prediction step: the bidirectional decoder over `rows` x `length` tokens and
    the LM head only on the `predicted` (masked) positions; `training`: see `TrainingOptions`."""
    if rows <= 0 or length <= 0 or not 0 <= predicted <= rows * length:
        raise ValueError(
            f"mntp_flops: need rows, length > 0 and 0 <= predicted <= rows*length, got {rows}, {length}, {predicted}"
        )
    setup = _Setup.make(**training)
    p = _Phases()
    _encode(p, shape, setup, rows, length, head_positions=predicted)
    return _breakdown(p, rows * length)


def bow_flops(
    shape: ModelShape,
    paradigm: str,
    texts: int,
    length: int,
    **training: Unpack[TrainingOptions],
) -> FlopBreakdown:
    """FLOPs of one bag-of-words pre-training step: the encoder over `texts` x `length` tokens, then the LM head on
    what the paradigm predicts from (sparse: every position, max-pooled with the routed backward; dense: each
    text's pooled vector); `training`: see `TrainingOptions`."""
    if texts <= 0 or length <= 0:
        raise ValueError(f"bow_flops: need texts, length > 0, got {texts}, {length}")
    sparse = PARADIGM_COSTS.get(paradigm).lm_head
    setup = _Setup.make(**training)
    p = _Phases()
    _encode(p, shape, setup, texts, length, head_positions=texts * length if sparse else texts, routed=sparse)
    return _breakdown(p, texts * length)


def attention_kernel(attn_implementation: str) -> AttentionKernel:
    # sdpa runs fused kernels (flash / memory-efficient, on CPU too) whose backward recomputes the scores.
    return "eager" if attn_implementation == "eager" else "fused"


def _adapter_lora(directory: str) -> tuple[int, list[str]]:
    """(r, target_modules) of a saved peft LoRA adapter that training will continue."""
    path = Path(directory) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone.init_adapter is not a LoRA adapter directory (file missing)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: not valid JSON ({exc}); save the adapter again") from None
    targets = data.get("target_modules") if isinstance(data, dict) else None
    if not isinstance(targets, list):
        raise DataFormatError(f"{path}: target_modules is {targets!r}; the FLOP model needs an explicit list of names")
    if not isinstance(data.get("r"), int):
        raise DataFormatError(f"{path}: 'r' is {data.get('r')!r}; expected the LoRA rank (an integer)")
    return int(data["r"]), [str(t) for t in targets]


def lora_setup(cfg: ExperimentConfig) -> tuple[int | None, tuple[str, ...]]:
    """(rank, targets) training will use: a continued adapter's, the configured LoRA's, or (None, ()) for full
    fine-tuning."""
    if cfg.backbone.init_adapter:
        rank, targets = _adapter_lora(cfg.backbone.init_adapter)
        return rank, tuple(targets)
    if cfg.backbone.lora.enabled:
        return cfg.backbone.lora.r, tuple(cfg.backbone.lora.target_modules)
    return None, ()


def planned_lora(cfg: ExperimentConfig) -> tuple[int | None, tuple[str, ...], str | None]:
    """`lora_setup` for planning ahead: a continued adapter whose directory does not exist yet (e.g. the MNTP stage
    has not run) is assumed to be the configured `backbone.lora`; the third value names it (None: nothing assumed)."""
    adapter = cfg.backbone.init_adapter
    if adapter and not Path(adapter).exists():
        return cfg.backbone.lora.r, tuple(cfg.backbone.lora.target_modules), adapter
    rank, targets = lora_setup(cfg)
    return rank, targets, None


@dataclass(frozen=True)
class StepCostModel:
    """Per-rank FLOPs of the training loop's steps, from the shapes of each step's actual batch.

    Summed over ranks (the loop all-reduces them) this equals `step_flops` of the global batch: each rank encodes
    its own texts and scores the gathered global batch.
    """

    shape: ModelShape
    paradigm: str
    scoring: tuple[str, ...]
    lora_rank: int | None
    lora_targets: tuple[str, ...]
    gradient_checkpointing: bool
    attention: AttentionKernel
    world_size: int = 1

    @classmethod
    def _for(
        cls,
        cfg: ExperimentConfig,
        config: PretrainedConfig,
        paradigm: str,
        scoring: tuple[str, ...],
    ) -> StepCostModel:
        rank, targets = lora_setup(cfg)
        return cls(
            shape=ModelShape.from_config(config),
            paradigm=paradigm,
            scoring=scoring,
            lora_rank=rank,
            lora_targets=targets,
            gradient_checkpointing=cfg.backbone.gradient_checkpointing,
            attention=attention_kernel(cfg.backbone.attn_implementation),
            world_size=max(1, cfg.train.num_workers),
        )

    @classmethod
    def for_experiment(cls, cfg: ExperimentConfig, config: PretrainedConfig) -> StepCostModel:
        """Retrieval training of `cfg` on a model with `config` (the built encoder's, so the vocabulary is real)."""
        return cls._for(cfg, config, cfg.encoder.paradigm, LOSS_COSTS.get(cfg.loss.name).scoring)

    @classmethod
    def for_mntp(cls, cfg: ExperimentConfig, config: PretrainedConfig) -> StepCostModel:
        """MNTP of `cfg`: the decoder alone (no scoring), through LoRA or full fine-tuning as the task trains it."""
        return cls._for(cfg, config, "dense", ())

    @classmethod
    def for_bow(cls, cfg: ExperimentConfig, config: PretrainedConfig) -> StepCostModel:
        """Bag-of-words pre-training of `cfg`'s paradigm (no scoring)."""
        return cls._for(cfg, config, cfg.encoder.paradigm, ())

    def _options(self) -> TrainingOptions:
        return {
            "lora_rank": self.lora_rank,
            "lora_targets": self.lora_targets,
            "gradient_checkpointing": self.gradient_checkpointing,
            "attention": self.attention,
        }

    def step_breakdown(
        self, *, queries: int, query_length: int, passages_per_query: int, passage_length: int
    ) -> FlopBreakdown:
        """This rank's step: its `queries` texts and their passages, plus the loss over all ranks' gathered batch."""
        local = BatchShape(queries, passages_per_query, query_length, passage_length)
        encoding = step_flops(self.shape, self.paradigm, local, scoring=(), **self._options())
        p = _Phases()
        p.forward, p.input_grad = dict(encoding.forward), dict(encoding.input_grad)
        p.weight_grad, p.recompute = dict(encoding.weight_grad), dict(encoding.recompute)
        dim = PARADIGM_COSTS.get(self.paradigm).dimension(self.shape)
        _score(p, dim, queries * self.world_size, passages_per_query, self.scoring, copies=1)
        return _breakdown(p, local.tokens)

    def step_flops(self, *, queries: int, query_length: int, passages_per_query: int, passage_length: int) -> int:
        return self.step_breakdown(
            queries=queries,
            query_length=query_length,
            passages_per_query=passages_per_query,
            passage_length=passage_length,
        ).total

    def mntp_step_flops(self, *, rows: int, length: int, predicted: int) -> int:
        return mntp_flops(self.shape, rows, length, predicted, **self._options()).total

    def bow_step_flops(self, *, texts: int, length: int) -> int:
        return bow_flops(self.shape, self.paradigm, texts, length, **self._options()).total
