"""Bidirectional attention for decoder-only LMs, without patching module functions.

Recipe (transformers 5.x): clear `is_causal` on every attention module, and give the decoder an explicit 4-D
padding-only mask built by `masking_utils.create_bidirectional_mask(..., allow_is_bidirectional_skip=False)`.
The model's own mask builder returns a prepared 4-D mask unchanged. Without `allow_is_bidirectional_skip=False`
the mask is `None` for an unpadded batch, and attention silently falls back to causal.

Support is gated: model types whose attention modules read `is_causal` at call time and whose mask builder
passes 4-D masks through, with the eager or SDPA attention implementations.
"""

from __future__ import annotations

import inspect

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig

from retriever.errors import UserError

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
SUPPORTED_ATTENTION = frozenset({"eager", "sdpa"})
MIN_TRANSFORMERS = (5, 0)


class BidirectionalUnsupported(UserError, RuntimeError):
    """The model, attention implementation or transformers version cannot run bidirectionally."""


def _transformers_version() -> tuple[int, int]:
    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_supported(config: PretrainedConfig) -> None:
    version = _transformers_version()
    if version < MIN_TRANSFORMERS:
        raise BidirectionalUnsupported(
            f"bidirectional attention needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))}, "
            f"found {transformers.__version__}; install the pinned version (transformers==5.24.0)"
        )
    from transformers import masking_utils

    builder = getattr(masking_utils, "create_bidirectional_mask", None)
    if builder is None or "allow_is_bidirectional_skip" not in inspect.signature(builder).parameters:
        raise BidirectionalUnsupported(
            f"transformers {transformers.__version__} lacks create_bidirectional_mask(allow_is_bidirectional_skip=); "
            "install the pinned version (transformers==5.24.0)"
        )
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BidirectionalUnsupported(
            f"bidirectional attention is not supported for model type {model_type!r} "
            f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}); set backbone.bidirectional=false"
        )
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTENTION:
        raise BidirectionalUnsupported(
            f"bidirectional attention needs attn_implementation in {sorted(SUPPORTED_ATTENTION)}, "
            f"got {implementation!r}"
        )


def set_bidirectional(model: nn.Module, enabled: bool = True) -> int:
    """Set `is_causal` on every attention module; returns how many modules were switched."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "is_causal") and hasattr(module, "q_proj"):
            module.is_causal = not enabled
            switched += 1
    if enabled and switched == 0:
        raise BidirectionalUnsupported(f"no attention modules with `is_causal` found in {type(model).__name__}")
    return switched


def bidirectional_mask(config: PretrainedConfig, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
    """The explicit 4-D padding-only mask (never None, also for unpadded batches of one)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        allow_is_bidirectional_skip=False,
    )


def decoder_states(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, bidirectional: bool):
    """Last-layer token states of a causal LM's decoder, with the padding-only mask when bidirectional."""
    embeds = lm.get_input_embeddings()(input_ids)
    mask = bidirectional_mask(lm.config, embeds, attention_mask) if bidirectional else attention_mask
    # use_cache=False: an encoder never generates; a KV cache would copy every layer's keys and values.
    return lm.get_decoder()(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
