"""Decoder-only backbones: named presets (the paper's Llama-3 shapes, tiny random Llamas) and any HF model.

A backbone reference is a string: a preset name from `BACKBONES`, a Hugging Face hub id, or a local directory.
Paper presets can be built on the meta device for planning without any weights; tiny presets are built from
config with random weights (seeded) for tests and the offline quickstart.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel

from retriever.config import BackboneConfig, ConfigError
from retriever.errors import UnknownNameError, UserError
from retriever.registry import Registry

PresetKind = Literal["paper", "tiny"]


@dataclass(frozen=True)
class BackbonePreset:
    """A named model shape; `hub_id` is where pretrained weights come from (None: random init)."""

    name: str
    kind: PresetKind
    config: dict[str, Any]
    hub_id: str | None = None
    aliases: tuple[str, ...] = field(default=())

    def llama_config(self, vocab_size: int | None = None) -> LlamaConfig:
        kwargs = dict(self.config)
        if vocab_size is not None:
            kwargs["vocab_size"] = vocab_size
        return LlamaConfig(**kwargs)


BACKBONES: Registry[BackbonePreset] = Registry("backbone preset")

_LLAMA3 = dict(
    vocab_size=128_256,
    rms_norm_eps=1e-5,
    rope_theta=500_000.0,
    bos_token_id=128_000,
    eos_token_id=128_001,
    max_position_embeddings=131_072,
    hidden_act="silu",
)
# Llama 3.2 ties its embeddings and stretches RoPE to 128k positions; Llama 3 8B does neither (8k positions).
_LLAMA32 = dict(
    tie_word_embeddings=True,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
_LLAMA3_8K = dict(tie_word_embeddings=False, max_position_embeddings=8192)


def llama_shape(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int) -> dict[str, int]:
    """The LlamaConfig fields that size a model: widths, depth and attention heads (query and key/value)."""
    return dict(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )


def _llama3(
    name: str, hub_id: str, hidden: int, ffn: int, layers: int, heads: int, head_dim: int, **extra: Any
) -> BackbonePreset:
    """A paper preset: the Llama-3 constants, one model's shape (all use 8 key/value heads) and its extras."""
    config = dict(_LLAMA3, **llama_shape(hidden, ffn, layers, heads, kv_heads=8), head_dim=head_dim, **extra)
    return BackbonePreset(name, "paper", config, hub_id=hub_id, aliases=(hub_id,))


def _tiny(name: str, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int) -> BackbonePreset:
    """A tiny random Llama: 4,096-token vocabulary, tied embeddings, 1,024 positions."""
    shape = llama_shape(hidden, ffn, layers, heads, kv_heads)
    config = dict(vocab_size=4096, **shape, tie_word_embeddings=True, max_position_embeddings=1024)
    return BackbonePreset(name, "tiny", config)


for _preset in (
    _llama3("llama-3.2-1b", "meta-llama/Llama-3.2-1B", 2048, 8192, layers=16, heads=32, head_dim=64, **_LLAMA32),
    _llama3("llama-3.2-3b", "meta-llama/Llama-3.2-3B", 3072, 8192, layers=28, heads=24, head_dim=128, **_LLAMA32),
    _llama3("llama-3-8b", "meta-llama/Meta-Llama-3-8B", 4096, 14336, layers=32, heads=32, head_dim=128, **_LLAMA3_8K),
    # Tiny two-layer Llamas that differ in width only (32 / 64 / 128): deeper random-init models learn too slowly
    # per step for the quickstart's budget, and width is what dense vectors need.
    _tiny("tiny-s", hidden=32, ffn=96, layers=2, heads=2, kv_heads=1),
    _tiny("tiny-m", hidden=64, ffn=192, layers=2, heads=2, kv_heads=1),
    _tiny("tiny-l", hidden=128, ffn=384, layers=2, heads=4, kv_heads=2),
):
    BACKBONES.add(_preset.name, _preset)

_ALIASES = {alias: preset.name for _, preset in BACKBONES.items() for alias in preset.aliases}


class BackboneUnavailable(UserError, RuntimeError):
    """The backbone's weights or config cannot be obtained (e.g. offline without a local copy)."""


def find_preset(name: str) -> BackbonePreset | None:
    name = _ALIASES.get(name, name)
    return BACKBONES.get(name) if name in BACKBONES else None


def _is_bare_name(name: str) -> bool:
    """A name that is neither a path nor a hub id of the `org/name` form: a preset, or a typo of one."""
    return "/" not in name and not name.startswith((".", "~")) and not Path(name).expanduser().exists()


def _unavailable(name: str, what: str, exc: Exception) -> UserError:
    """The error for a reference that could not be loaded: a bare name that is neither a preset nor a folder is
    most likely a mistyped preset (hub ids are `org/name`), so it gets the list of presets, not download advice."""
    path = Path(name).expanduser()
    if path.exists() or path.is_absolute() or name.startswith((".", "~")):
        found = "no such folder" if not path.exists() else f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}"
        return BackboneUnavailable(
            f"backbone {name!r}: cannot load its {what} from this local path ({found}); a model folder holds "
            "config.json and *.safetensors (as written by save_pretrained)"
        )
    if _is_bare_name(name):
        close = difflib.get_close_matches(name, BACKBONES.names(), n=1)
        return UnknownNameError(
            f"unknown backbone {name!r}; known: {', '.join(BACKBONES.names())}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + "; or give a Hugging Face hub id (org/name) or a local model directory"
        )
    return BackboneUnavailable(_unavailable_message(name, what, exc))


def _unavailable_message(name: str, what: str, exc: Exception) -> str:
    from huggingface_hub import constants

    mode = "offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "from the Hugging Face hub"
    where = constants.HF_HUB_CACHE
    return (
        f"backbone {name!r}: cannot load its {what} {mode}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}\n"
        f"  fix: download it with `huggingface-cli download {name}` (cache: {where}), "
        f"or put the model files (config.json, *.safetensors, tokenizer files) in a directory and pass that "
        f"directory as backbone.name."
    )


def backbone_config(name: str, vocab_size: int | None = None) -> PretrainedConfig:
    """The model config of a reference, without weights (presets need no download)."""
    preset = find_preset(name)
    if preset is not None:
        return preset.llama_config(vocab_size)
    try:
        # A bare name is only looked up in the local cache: a mistyped preset must not wait on the hub.
        config = AutoConfig.from_pretrained(name, local_files_only=_is_bare_name(name))
    except (OSError, ValueError) as exc:
        raise _unavailable(name, "config", exc) from None
    if vocab_size is not None:
        config.vocab_size = vocab_size
    return config


def build_meta_model(name: str, vocab_size: int | None = None) -> PreTrainedModel:
    """The model on the meta device: shapes and parameter counts, no memory, no weights."""
    config = backbone_config(name, vocab_size)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_backbone(
    name: str,
    *,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    vocab_size: int | None = None,
    seed: int = 0,
    random_init: bool | None = None,
) -> PreTrainedModel:
    """A causal LM for a backbone reference.

    Tiny presets (and `random_init=True`) give seeded random weights built from config; paper presets load their
    hub weights; anything else is loaded by `AutoModelForCausalLM.from_pretrained` (hub id or local directory).
    `vocab_size` resizes a random model to its tokenizer.
    """
    torch_dtype = _DTYPES[dtype]
    preset = find_preset(name)
    if random_init is None:
        random_init = preset is not None and preset.kind == "tiny"
    if random_init:
        config = backbone_config(name, vocab_size)
        config._attn_implementation = attn_implementation
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        finally:
            torch.random.set_rng_state(generator_state)
        return model.to(torch_dtype)
    source = preset.hub_id if preset is not None and preset.hub_id else name
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn_implementation, local_files_only=_is_bare_name(source)
        )
    except (OSError, ValueError) as exc:
        raise _unavailable(source, "weights", exc) from None


def load_configured_backbone(config: BackboneConfig, tokenizer_size: int) -> PreTrainedModel:
    """The causal LM a backbone config starts from: `init_weights` (a pre-training stage's full weights) when set,
    else the preset or model `name` (random presets sized to the tokenizer)."""
    random = is_random_preset(config.name) and config.init_weights is None
    return load_backbone(
        config.init_weights or config.name,
        dtype=config.dtype,
        attn_implementation=config.attn_implementation,
        vocab_size=tokenizer_size if random else None,
        seed=config.seed,
    )


def is_random_preset(name: str) -> bool:
    preset = find_preset(name)
    return preset is not None and preset.kind == "tiny"


def tokenizer_reference(name: str, tokenizer: str | None) -> str:
    """Where a backbone's tokenizer comes from: the configured one, else the preset's hub id or the model itself."""
    if tokenizer:
        return tokenizer
    preset = find_preset(name)
    if preset is None:
        return name
    if preset.hub_id is None:
        raise ConfigError(
            f"backbone {name!r} has random weights and no tokenizer of its own: set backbone.tokenizer to a "
            "tokenizer directory or file (or `synthetic` for one trained on the synthetic benchmark)"
        )
    return preset.hub_id
