"""Dense and sparse retrieval encoders behind one contract: `encode_queries`, `encode_passages`, `score`.

Both run the (optionally bidirectional, LoRA-adapted) decoder over left-padded texts and differ only in how the
token states become one vector:

- dense: L2-normalise every token state, mean over non-pad tokens (norm <= 1); or the last token (`last`).
  Training logits are dot products divided by the temperature (`score_scale` = 1/T).
- sparse: LM-head logits * hidden_size^(-1/4), pads excluded, max over positions, log(1 + ReLU(.)): a
  vocabulary-sized vector; training logits are plain dot products. The head runs in chunks of positions with a
  running max and a custom backward, so memory is bounded by `sparse_chunk_tokens` x vocabulary, not by
  batch x length x vocabulary.

The encoder is an `nn.Module` whose `forward(input_ids, attention_mask)` returns representations, so it can be the
root of FSDP sharding. A saved encoder directory holds everything needed to rebuild it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from pydantic import ValidationError
from torch import nn
from transformers import PreTrainedModel

from retriever.config import BackboneConfig, ConfigError, EncoderConfig, format_validation_error
from retriever.errors import UserError
from retriever.models.backbone import is_random_preset, load_backbone, load_configured_backbone, tokenizer_reference
from retriever.models.bidirectional import check_supported, decoder_states, set_bidirectional
from retriever.models.lora import apply_lora, base_model, load_adapter
from retriever.models.tokenizers import load_tokenizer, prepare_for_retrieval, tokenize
from retriever.registry import Registry

ENCODER_FORMAT_VERSION = 1
TextKind = Literal["query", "passage"]
RESAVE = "copy the encoder directory again, or re-save the encoder"


class EncoderFormatError(UserError, ValueError):
    """An encoder directory that is incomplete, edited or written by another format version."""


class RetrievalEncoder(nn.Module):
    """Shared machinery; subclasses implement `represent(hidden, attention_mask)`."""

    paradigm: ClassVar[str]

    def __init__(
        self,
        model: PreTrainedModel | PeftModel,
        tokenizer: Any,
        settings: EncoderConfig,
        backbone: BackboneConfig,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = prepare_for_retrieval(tokenizer, settings.add_bos)
        self.settings = settings
        self.backbone = backbone
        self.lm = base_model(model)
        self.bidirectional = backbone.bidirectional
        if self.bidirectional:
            check_supported(self.lm.config)
            set_bidirectional(self.lm, True)

    # -- the differentiable path --------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer token states [batch, length, hidden]."""
        return decoder_states(self.lm, input_ids, attention_mask, self.bidirectional)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.represent(self.hidden_states(input_ids, attention_mask), attention_mask)

    def represent(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def score_scale(self) -> float:
        """Training logits = dot product x score_scale."""
        return 1.0

    @staticmethod
    def score(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
        """Relevance of every query to every passage: [n_queries, n_passages] dot products."""
        return queries @ passages.T

    # -- texts -------------------------------------------------------------------------------------------
    def max_length(self, kind: TextKind) -> int:
        return self.settings.query_max_length if kind == "query" else self.settings.passage_max_length

    def tokenize(
        self, texts: Sequence[str], kind: TextKind, max_length: int | None = None, pad_to_max_length: bool = False
    ) -> dict[str, torch.Tensor]:
        return tokenize(
            self.tokenizer,
            list(texts),
            max_length=max_length or self.max_length(kind),
            add_bos=self.settings.add_bos,
            pad_to_max_length=pad_to_max_length,
        )

    @torch.no_grad()
    def encode(
        self, texts: Sequence[str], kind: TextKind, batch_size: int = 32, max_length: int | None = None
    ) -> torch.Tensor:
        """Representations of `texts` (eval mode, no gradients), batched; rows follow the input order."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        try:
            outputs = []
            for start in range(0, len(texts), batch_size):
                batch = self.tokenize(texts[start : start + batch_size], kind, max_length)
                batch = {key: value.to(device) for key, value in batch.items()}
                outputs.append(self(**batch).float().cpu())
            if not outputs:
                return torch.empty(0, self.dimension)
            return torch.cat(outputs)
        finally:
            self.train(was_training)

    def encode_queries(self, texts: Sequence[str], batch_size: int = 32, max_length: int | None = None):
        return self.encode(texts, "query", batch_size, max_length)

    def encode_passages(self, texts: Sequence[str], batch_size: int = 32, max_length: int | None = None):
        return self.encode(texts, "passage", batch_size, max_length)

    @property
    def dimension(self) -> int:
        raise NotImplementedError

    # -- persistence -------------------------------------------------------------------------------------
    def save(
        self,
        directory: str | Path,
        include_backbone: bool | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write encoder.json, the tokenizer, the LoRA adapter and (for random-init backbones) the base weights.

        `state_dict` (keys relative to `self.model`) replaces the live parameters, e.g. a full state gathered
        from FSDP shards on rank 0.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        has_adapter = isinstance(self.model, PeftModel)
        if include_backbone is None:
            include_backbone = is_random_preset(self.backbone.name) or not has_adapter
        self.tokenizer.save_pretrained(directory / "tokenizer")
        if has_adapter:
            self.model.save_pretrained(directory / "adapter", state_dict=state_dict)
        if include_backbone:
            self._save_base_weights(directory / "backbone", state_dict)
        meta = {
            "format_version": ENCODER_FORMAT_VERSION,
            "paradigm": self.paradigm,
            "encoder": self.settings.model_dump(mode="json"),
            "backbone": self.backbone.model_dump(mode="json"),
            "has_adapter": has_adapter,
            "has_backbone_weights": include_backbone,
            "vocab_size": int(self.lm.config.vocab_size),
            "hidden_size": int(self.lm.config.hidden_size),
        }
        (directory / "encoder.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return directory

    def _save_base_weights(self, directory: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        """The base model's own weights (without adapters) in transformers format."""
        state = state_dict if state_dict is not None else self.model.state_dict()
        if not isinstance(self.model, PeftModel):
            self.lm.save_pretrained(directory, state_dict=state)
            return
        # peft keys look like base_model.model.<lm key with .base_layer>; adapters are saved separately.
        prefix = "base_model.model."
        base = {
            key[len(prefix) :].replace(".base_layer.", "."): value
            for key, value in state.items()
            if key.startswith(prefix) and "lora_" not in key
        }
        clone = type(self.lm)(self.lm.config)
        clone.load_state_dict(base)
        clone.to(self.lm.dtype).save_pretrained(directory)


ENCODERS: Registry[type[RetrievalEncoder]] = Registry("paradigm")


@ENCODERS.register("dense")
class DenseEncoder(RetrievalEncoder):
    paradigm = "dense"

    def represent(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.settings.pooling == "last":
            # Left padding puts every text's last token in the last position.
            return F.normalize(hidden[:, -1], dim=-1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (F.normalize(hidden, dim=-1) * mask).sum(dim=1)
        return summed / mask.sum(dim=1).clamp(min=1.0)

    @property
    def score_scale(self) -> float:
        return 1.0 / self.settings.temperature

    @property
    def dimension(self) -> int:
        return int(self.lm.config.hidden_size)


class _ChunkedMaxLogits(torch.autograd.Function):
    """max over positions of hidden @ weight.T, computed for a chunk of texts at a time.

    Forward runs one [vocab, d] x [d, texts x positions] product per chunk of texts and keeps the max and its argmax
    ([batch, vocab]); no [batch, length, vocab] tensor is ever stored. Backward routes each non-zero gradient of a
    (text, vocabulary entry) to its argmax position only, as two sparse-dense products (hidden-state and weight
    gradients), instead of two dense products over every position (the naive head's backward).
    """

    @staticmethod
    def forward(ctx, hidden, weight, texts_per_chunk):  # type: ignore[override]
        batch, length, dim = hidden.shape
        values, where = [], []
        for start in range(0, batch, texts_per_chunk):
            part = hidden[start : start + texts_per_chunk]
            # [vocab, texts, positions]: one 2-D product, and the max runs over the contiguous last axis (several
            # times faster than over the middle axis of [texts, positions, vocab]).
            logits = torch.mm(weight, part.reshape(-1, dim).t()).view(-1, part.shape[0], length)
            best, index = logits.max(dim=-1)
            values.append(best.t())
            where.append(index.t())
        where_all = torch.cat(where)
        ctx.save_for_backward(hidden, weight, where_all)
        return torch.cat(values)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        hidden, weight, where = ctx.saved_tensors
        batch, length, dim = hidden.shape
        grad = grad.to(hidden.dtype)
        # Only entries with a gradient matter (relu and the FLOPS regularizer zero most of them). They form a
        # sparse [batch x positions, vocab] matrix with one entry per (text, term) at the term's argmax position;
        # two sparse-dense products give both gradients.
        text, term = torch.nonzero(grad, as_tuple=True)
        rows = where[text, term] + text * length  # each entry's argmax state in hidden viewed as [batch*length, d]
        routed = torch.sparse_coo_tensor(
            torch.stack([rows, term]), grad[text, term], (batch * length, weight.shape[0]), check_invariants=False
        )
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.sparse.mm(routed, weight).view_as(hidden)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.sparse.mm(routed.t(), hidden.reshape(-1, dim))
        return grad_hidden, grad_weight, None


def sparse_max_logits(hidden: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor, chunk_tokens: int):
    """relu(max over valid positions of the LM-head logits), memory bounded by chunk_tokens x vocabulary.

    Pad positions get zero states, hence zero logits: they can only win where every real logit is <= 0, where the
    relu gives 0 anyway, and their zeroed states pass no gradient back. This avoids masking [batch, len, vocab].
    """
    texts_per_chunk = max(1, chunk_tokens // max(1, hidden.shape[1]))
    masked = hidden * valid.unsqueeze(-1).to(hidden.dtype)
    return torch.relu(_ChunkedMaxLogits.apply(masked, weight, texts_per_chunk))


@ENCODERS.register("sparse")
class SparseEncoder(RetrievalEncoder):
    paradigm = "sparse"

    def represent(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.log1p(self.term_activations(hidden, attention_mask))

    def term_activations(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """relu(max over positions of the LM-head logits) * hidden_size^(-1/4): the representation before log1p."""
        head = self.lm.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ConfigError(
                f"backbone {self.backbone.name!r}: its LM head has a bias; sparse encoders need one without"
            )
        peak = sparse_max_logits(hidden, head.weight, attention_mask, self.settings.sparse_chunk_tokens)
        # max commutes with the positive scale and the monotone log1p(relu(.)).
        return peak * self.lm.config.hidden_size**-0.25

    @property
    def dimension(self) -> int:
        return int(self.lm.config.vocab_size)

    @staticmethod
    def to_terms(reps: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text: (token ids int32 ascending, weights float32) of the non-zero entries, for indexing."""
        out = []
        for row in reps.detach().float().cpu():
            ids = torch.nonzero(row, as_tuple=False).squeeze(1)
            out.append((ids.numpy().astype(np.int32), row[ids].numpy().astype(np.float32)))
        return out

    def encode_terms(
        self, texts: Sequence[str], kind: TextKind, batch_size: int = 32, max_length: int | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        terms: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, len(texts), batch_size):
            terms.extend(self.to_terms(self.encode(texts[start : start + batch_size], kind, batch_size, max_length)))
        return terms


def build_encoder(
    backbone: BackboneConfig, settings: EncoderConfig, *, tokenizer: Any = None, trainable: bool = True
) -> RetrievalEncoder:
    """Backbone (+ bidirectional + LoRA or a continued adapter) wrapped as the configured paradigm."""
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_reference(backbone.name, backbone.tokenizer))
    model = load_configured_backbone(backbone, len(tokenizer))
    if backbone.init_adapter:
        model = load_adapter(model, backbone.init_adapter, trainable=trainable)
    elif backbone.lora.enabled:
        model = apply_lora(model, backbone.lora)
    if backbone.gradient_checkpointing:
        base_model(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return ENCODERS.get(settings.paradigm)(model, tokenizer, settings, backbone)


def read_encoder_meta(directory: str | Path) -> dict[str, Any]:
    """The `encoder.json` of an encoder directory, checked for format version and the fields `load_encoder` uses."""
    meta_path = Path(directory) / "encoder.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory}: not an encoder directory (encoder.json missing)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"{meta_path}:{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else str(meta_path)
        raise EncoderFormatError(f"{where}: not valid JSON ({exc}); {RESAVE}") from None
    if not isinstance(meta, dict):
        raise EncoderFormatError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}; {RESAVE}")
    if meta.get("format_version") != ENCODER_FORMAT_VERSION:
        raise EncoderFormatError(
            f"{meta_path}: encoder format version {meta.get('format_version')!r} is not supported "
            f"(this version reads {ENCODER_FORMAT_VERSION})"
        )
    paradigm = meta.get("paradigm")
    if paradigm not in ENCODERS:
        got = "missing 'paradigm'" if paradigm is None else f"unknown paradigm {paradigm!r}"
        raise EncoderFormatError(f"{meta_path}: {got} (expected one of {', '.join(ENCODERS.names())}); {RESAVE}")
    size_key = "hidden_size" if paradigm == "dense" else "vocab_size"
    for key, ok in (
        (size_key, lambda v: isinstance(v, int) and v > 0),
        ("has_adapter", lambda v: isinstance(v, bool)),
        ("has_backbone_weights", lambda v: isinstance(v, bool)),
    ):
        if not ok(meta.get(key)):
            raise EncoderFormatError(f"{meta_path}: {key!r} is {meta.get(key)!r}; {RESAVE}")
    for key, model in (("encoder", EncoderConfig), ("backbone", BackboneConfig)):
        try:
            model.model_validate(meta.get(key))
        except ValidationError as exc:
            message = format_validation_error(exc, f"{meta_path}: {key!r}", model)
            raise EncoderFormatError(
                f"{message}\n  ({RESAVE})" if "\n" in message else f"{message}; {RESAVE}"
            ) from None
    # The parts load_encoder reads: a half-copied directory fails here, before any output is started.
    for part, needed, holds in (
        ("tokenizer", True, "a tokenizer"),
        ("backbone", meta["has_backbone_weights"], "its backbone weights"),
        ("adapter", meta["has_adapter"], "a LoRA adapter"),
    ):
        if needed and not (Path(directory) / part).is_dir():
            raise EncoderFormatError(
                f"{Path(directory) / part}: missing; the encoder directory is incomplete (encoder.json says it has "
                f"{holds}); {RESAVE}"
            )
    return meta


def load_encoder(directory: str | Path, *, trainable: bool = False) -> RetrievalEncoder:
    """Rebuild an encoder from a directory written by `RetrievalEncoder.save`."""
    directory = Path(directory)
    meta = read_encoder_meta(directory)
    settings = EncoderConfig.model_validate(meta["encoder"])
    backbone = BackboneConfig.model_validate(meta["backbone"])
    tokenizer = load_tokenizer(directory / "tokenizer")
    if meta["has_backbone_weights"]:
        model = load_backbone(
            str(directory / "backbone"), dtype=backbone.dtype, attn_implementation=backbone.attn_implementation
        )
    else:
        model = load_backbone(backbone.name, dtype=backbone.dtype, attn_implementation=backbone.attn_implementation)
    if meta["has_adapter"]:
        model = load_adapter(model, directory / "adapter", trainable=trainable)
    encoder = ENCODERS.get(meta["paradigm"])(model, tokenizer, settings, backbone)
    encoder.train(trainable)
    return encoder
