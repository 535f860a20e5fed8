"""Shapes the FLOP counter works on: a decoder's dimensions (`ModelShape`) and a step's batch (`BatchShape`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

from transformers import PretrainedConfig

from retriever.config import ConfigError

AttentionKernel = Literal["eager", "fused"]
COMPONENTS = ("linear", "lora", "attention", "lm_head", "scoring")
# Model types whose decoder layers are q/k/v/o attention + gate/up/down MLP with standard attention.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that determine its matmul FLOPs."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "tie_word_embeddings" and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"ModelShape.{f.name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelShape: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelShape:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"the FLOP model covers Llama-style decoders (model types {', '.join(sorted(SUPPORTED_MODEL_TYPES))}) "
                f"with q/k/v/o and gate/up/down linears; got model type {model_type!r} (set backbone.name to a "
                "Llama-style model)"
            )
        heads = int(config.num_attention_heads)
        return cls(
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            vocab_size=int(config.vocab_size),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @classmethod
    def from_name(cls, name: str, vocab_size: int | None = None) -> ModelShape:
        """From a preset name, hub id or local model directory (no weights are loaded)."""
        from retriever.models.backbone import backbone_config

        return cls.from_config(backbone_config(name, vocab_size))

    def layer_linears(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of every linear of one decoder layer, in execution order."""
        d, kv, ffn = self.hidden_size, self.num_kv_heads * self.head_dim, self.intermediate_size
        q = self.num_heads * self.head_dim
        shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, ffn), (d, ffn), (ffn, d)]
        return dict(zip(LAYER_LINEARS, shapes))

    @property
    def matmul_parameters(self) -> int:
        """N_matmul: weights of all decoder-layer linears (embedding and LM head excluded)."""
        return self.num_layers * sum(din * dout for din, dout in self.layer_linears().values())

    @property
    def lm_head_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    def lora_parameters(self, rank: int, targets: Sequence[str]) -> int:
        """Trainable LoRA parameters: r·(d_in + d_out) per adapted linear per layer."""
        linears = self.layer_linears()
        check_lora_targets(targets)
        return self.num_layers * sum(rank * (linears[t][0] + linears[t][1]) for t in set(targets))


def check_lora_targets(targets: Sequence[str]) -> None:
    unknown = sorted(set(targets) - set(LAYER_LINEARS))
    if unknown:
        raise ConfigError(
            f"LoRA targets {unknown} are not decoder-layer linears of a Llama-style model; the FLOP model knows "
            f"{', '.join(LAYER_LINEARS)} (set backbone.lora.target_modules to names among them)"
        )


@dataclass(frozen=True)
class BatchShape:
    """One step's padded shapes: `queries` texts of `query_length`, `queries * passages_per_query` passages."""

    queries: int
    passages_per_query: int
    query_length: int
    passage_length: int

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BatchShape.{f.name} must be a positive integer, got {value!r}")

    @property
    def passages(self) -> int:
        return self.queries * self.passages_per_query

    @property
    def tokens(self) -> int:
        """Tokens the encoder computes per step, padding included."""
        return self.queries * self.query_length + self.passages * self.passage_length
