"""Import llama2.c checkpoints (legacy format) and their tokenizers as Hugging Face Llama directories.

Checkpoint layout (llama2.c ``export.py`` legacy/version 0): a header of 7 little-endian int32
``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len`` (a negative ``vocab_size`` means the
classifier is stored separately at the end, a positive one that it is tied to the token embeddings), then float32
tensors: tok_embeddings[vocab, dim], attention_norm[L, dim], wq[L, dim, dim], wk[L, kv_dim, dim],
wv[L, kv_dim, dim], wo[L, dim, dim], ffn_norm[L, dim], w1[L, hidden, dim], w2[L, dim, hidden], w3[L, hidden, dim],
norm[dim], freq_cos[seq_len, head_dim/2], freq_sin[seq_len, head_dim/2] and, when not tied, wcls[vocab, dim].

Tokenizer layout (llama2.c ``tokenizer.py``): int32 max_token_len, then per token float32 score, int32 byte length
and the UTF-8 bytes, with SentencePiece's "▁" written as a plain space. Ids 0/1/2 are <unk>/<s>/</s> and
3..258 the byte-fallback tokens <0x00>..<0xFF>.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

from retriever.errors import DataFormatError
from retriever.models.backbone import llama_shape
from retriever.models.tokenizers import fast_tokenizer
from retriever.outputs import atomic_directory

logger = logging.getLogger(__name__)

HEADER_FORMAT = "<7i"
HEADER_BYTES = struct.calcsize(HEADER_FORMAT)
# llama2.c's newer export versions start with this magic ("ak42" read as a little-endian int32).
_VERSIONED_MAGIC = 0x616B3432
# llama2.c hard-codes these in run.c (RoPE base) and model.py (norm epsilon).
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-5
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
N_BYTE_TOKENS = 256
SPACE = "▁"
# Sanity bound for header fields: anything larger is certainly not a real model and means a garbage file.
_MAX_FIELD = 1 << 24


@dataclass(frozen=True)
class Llama2cHeader:
    """The 7-int header of a legacy llama2.c checkpoint; ``vocab_size`` is made positive."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Name and shape of every stored tensor, in file order."""
        L, d, h, kv = self.n_layers, self.dim, self.hidden_dim, self.kv_dim
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("tok_embeddings", (self.vocab_size, d)),
            ("attention_norm", (L, d)),
            ("wq", (L, d, d)),
            ("wk", (L, kv, d)),
            ("wv", (L, kv, d)),
            ("wo", (L, d, d)),
            ("ffn_norm", (L, d)),
            ("w1", (L, h, d)),
            ("w2", (L, d, h)),
            ("w3", (L, h, d)),
            ("norm", (d,)),
            ("freq_cos", (self.seq_len, self.head_dim // 2)),
            ("freq_sin", (self.seq_len, self.head_dim // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("wcls", (self.vocab_size, d)))
        return shapes

    def expected_file_size(self) -> int:
        n_floats = sum(int(np.prod(shape)) for _, shape in self.tensor_shapes())
        return HEADER_BYTES + 4 * n_floats

    def describe(self) -> str:
        return (
            f"dim={self.dim} hidden_dim={self.hidden_dim} n_layers={self.n_layers} n_heads={self.n_heads} "
            f"n_kv_heads={self.n_kv_heads} vocab_size={self.vocab_size} seq_len={self.seq_len} "
            f"classifier={'shared' if self.shared_classifier else 'separate'}"
        )


def read_llama2c_header(path: Path) -> Llama2cHeader:
    """Read and validate the header of a legacy llama2.c checkpoint (including the file size it implies)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint {path} does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataFormatError(
            f"{path}: {size} bytes is too short for a llama2.c checkpoint (the header alone is {HEADER_BYTES} bytes)"
        )
    with path.open("rb") as handle:
        raw = handle.read(HEADER_BYTES)
    fields = struct.unpack(HEADER_FORMAT, raw)
    if fields[0] == _VERSIONED_MAGIC:
        raise DataFormatError(
            f"{path}: this is a versioned llama2.c checkpoint (magic 'ak42'); only the legacy format (version 0, "
            "written by llama2.c export.py --version 0 / legacy_export) is supported. Re-export it with "
            "`python export.py out.bin --version 0 --checkpoint ckpt.pt`."
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = fields
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "|vocab_size|", "seq_len")
    # The header's fields in Llama2cHeader's order.
    values = (dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab_size), seq_len)
    bad = [f"{name}={value}" for name, value in zip(names, values) if not 0 < value <= _MAX_FIELD]
    if bad:
        raise DataFormatError(
            f"{path}: header fields out of range ({', '.join(bad)}); the file is not a legacy llama2.c checkpoint "
            f"or is corrupt (header read: {fields})"
        )
    problems = []
    if dim % n_heads:
        problems.append(f"dim {dim} is not divisible by n_heads {n_heads}")
    elif (dim // n_heads) % 2:
        problems.append(f"head_dim {dim // n_heads} is odd, RoPE needs pairs")
    if n_heads % n_kv_heads:
        problems.append(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    if problems:
        raise DataFormatError(f"{path}: inconsistent llama2.c header {fields}: {'; '.join(problems)}")
    header = Llama2cHeader(*values, shared_classifier=vocab_size > 0)
    expected = header.expected_file_size()
    if size != expected:
        if size < expected:
            hint = "the file is truncated (an interrupted download or copy?)"
        else:
            hint = "the file has trailing data (not a legacy llama2.c checkpoint, or a different export version?)"
        raise DataFormatError(
            f"{path}: size {size} bytes does not match its header ({header.describe()}), which implies "
            f"{expected} bytes: {hint}"
        )
    return header


def read_llama2c_weights(path: Path) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """All tensors of a legacy llama2.c checkpoint as float32 arrays (memory-mapped), keyed by llama2.c name."""
    header = read_llama2c_header(path)
    data = np.memmap(path, dtype="<f4", mode="r", offset=HEADER_BYTES)
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in header.tensor_shapes():
        count = int(np.prod(shape))
        tensors[name] = data[offset : offset + count].reshape(shape)
        offset += count
    if not all(np.isfinite(tensors[name]).all() for name in ("tok_embeddings", "norm")):
        raise DataFormatError(f"{path}: non-finite values in the embeddings or final norm; the checkpoint is corrupt")
    return header, tensors


def interleaved_to_half_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute q/k projection rows from llama2.c's interleaved RoPE pairs to HF's rotate-half layout.

    The same permutation as ``permute`` in transformers' convert_llama_weights_to_hf.py: within each head, output
    row 2i (first of pair i) goes to row i and row 2i+1 to row i + head_dim/2.
    """
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def llama2c_config(header: Llama2cHeader) -> LlamaConfig:
    """The HF config equivalent to a llama2.c header (llama2.c's RoPE base, norm epsilon and special ids)."""
    shape = llama_shape(header.dim, header.hidden_dim, header.n_layers, header.n_heads, header.n_kv_heads)
    return LlamaConfig(
        vocab_size=header.vocab_size,
        **shape,
        head_dim=header.head_dim,
        max_position_embeddings=header.seq_len,
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=header.shared_classifier,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def llama2c_state_dict(header: Llama2cHeader, tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map llama2.c tensors to ``LlamaForCausalLM`` parameter names (q/k rows permuted for rotate-half RoPE)."""

    def t(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))

    state: dict[str, torch.Tensor] = {"model.embed_tokens.weight": t(tensors["tok_embeddings"])}
    for i in range(header.n_layers):
        prefix = f"model.layers.{i}."
        state[prefix + "input_layernorm.weight"] = t(tensors["attention_norm"][i])
        state[prefix + "self_attn.q_proj.weight"] = interleaved_to_half_rotary(t(tensors["wq"][i]), header.n_heads)
        state[prefix + "self_attn.k_proj.weight"] = interleaved_to_half_rotary(t(tensors["wk"][i]), header.n_kv_heads)
        state[prefix + "self_attn.v_proj.weight"] = t(tensors["wv"][i])
        state[prefix + "self_attn.o_proj.weight"] = t(tensors["wo"][i])
        state[prefix + "post_attention_layernorm.weight"] = t(tensors["ffn_norm"][i])
        state[prefix + "mlp.gate_proj.weight"] = t(tensors["w1"][i])
        state[prefix + "mlp.down_proj.weight"] = t(tensors["w2"][i])
        state[prefix + "mlp.up_proj.weight"] = t(tensors["w3"][i])
    state["model.norm.weight"] = t(tensors["norm"])
    state["lm_head.weight"] = state["model.embed_tokens.weight"] if header.shared_classifier else t(tensors["wcls"])
    return state


def _check_rope_tables(path: Path, header: Llama2cHeader, tensors: dict[str, np.ndarray]) -> None:
    # run.c ignores the stored tables and recomputes RoPE with base 10000; say so if the file disagrees.
    half = header.head_dim // 2
    freqs = 1.0 / ROPE_THETA ** (np.arange(0, header.head_dim, 2, dtype=np.float64)[:half] / header.head_dim)
    angles = np.outer(np.arange(header.seq_len, dtype=np.float64), freqs)
    if not (
        np.allclose(tensors["freq_cos"], np.cos(angles), atol=1e-3)
        and np.allclose(tensors["freq_sin"], np.sin(angles), atol=1e-3)
    ):
        logger.warning(
            "%s: stored RoPE tables do not match theta=%s; like llama2.c's run.c, the converted model uses theta=%s",
            path,
            ROPE_THETA,
            ROPE_THETA,
        )


def load_llama2c_model(checkpoint: Path) -> LlamaForCausalLM:
    """A float32 ``LlamaForCausalLM`` holding the weights of a legacy llama2.c checkpoint."""
    checkpoint = Path(checkpoint)
    header, tensors = read_llama2c_weights(checkpoint)
    _check_rope_tables(checkpoint, header, tensors)
    config = llama2c_config(header)
    state = llama2c_state_dict(header, tensors)
    # Build on the meta device so a large checkpoint is not held twice (random init + real weights).
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    if header.shared_classifier:
        model.tie_weights()
    # Buffers (RoPE inverse frequencies) were created on meta: rebuild them on the CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.to(torch.float32)
    model.eval()
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = EOS_ID
    return model


# ----------------------------------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class Llama2cVocab:
    """Tokens (raw bytes as stored) and merge scores of a llama2.c tokenizer file."""

    max_token_length: int
    pieces: list[bytes]
    scores: list[float]


def read_llama2c_tokenizer(path: Path, vocab_size: int | None = None) -> Llama2cVocab:
    """Parse a llama2.c ``tokenizer.bin``; ``vocab_size`` (from the checkpoint header) must match when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c tokenizer {path} does not exist")
    data = path.read_bytes()
    if len(data) < 4:
        raise DataFormatError(f"{path}: {len(data)} bytes is too short for a llama2.c tokenizer file")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len <= 1 << 16:
        raise DataFormatError(f"{path}: max_token_length {max_len} is out of range; not a llama2.c tokenizer file")
    pieces: list[bytes] = []
    scores: list[float] = []
    offset = 4
    while offset < len(data) and (vocab_size is None or len(pieces) < vocab_size):
        if offset + 8 > len(data):
            raise DataFormatError(f"{path}: truncated record for token {len(pieces)} at byte {offset}")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if not 0 <= length <= max_len or offset + length > len(data):
            raise DataFormatError(
                f"{path}: token {len(pieces)} at byte {offset - 8} has length {length} (max_token_length {max_len}, "
                f"{len(data) - offset} bytes left); the file is truncated or not a llama2.c tokenizer"
            )
        pieces.append(data[offset : offset + length])
        scores.append(score)
        offset += length
    if vocab_size is not None and len(pieces) != vocab_size:
        raise DataFormatError(
            f"{path}: holds {len(pieces)} tokens but the checkpoint's vocab_size is {vocab_size}; "
            "the tokenizer does not belong to this checkpoint"
        )
    if offset != len(data):
        raise DataFormatError(
            f"{path}: {len(data) - offset} trailing bytes after {len(pieces)} tokens; the tokenizer does not match "
            "the checkpoint's vocab_size or the file is corrupt"
        )
    if len(pieces) < len(SPECIAL_TOKENS) + N_BYTE_TOKENS:
        raise DataFormatError(
            f"{path}: only {len(pieces)} tokens; a llama2.c tokenizer has <unk>, <s>, </s> and 256 byte tokens first"
        )
    return Llama2cVocab(max_token_length=max_len, pieces=pieces, scores=scores)


def _byte_token(value: int) -> str:
    return f"<0x{value:02X}>"


def llama2c_tokenizer(
    path: Path, vocab_size: int | None = None, model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """An HF fast tokenizer that encodes exactly like llama2.c's ``encode`` (SentencePiece-style BPE).

    Spaces become "▁", a dummy-prefix "▁" is prepended to non-empty text, merges are ranked by the score of the
    merged piece (highest first, as run.c picks the best-scoring pair), and characters missing from the vocabulary
    fall back to the <0xNN> byte tokens. BOS is added by the post-processor; pad = eos.
    """
    path = Path(path)
    vocab_file = read_llama2c_tokenizer(path, vocab_size)
    vocab: dict[str, int] = {}
    scores: dict[str, float] = {}
    byte_tokens = {_byte_token(b) for b in range(N_BYTE_TOKENS)}
    for token_id, (raw, score) in enumerate(zip(vocab_file.pieces, vocab_file.scores)):
        if token_id < len(SPECIAL_TOKENS):
            piece = SPECIAL_TOKENS[token_id]
        else:
            try:
                piece = raw.decode("utf-8").replace(" ", SPACE)
            except UnicodeDecodeError as error:
                raise DataFormatError(f"{path}: token {token_id} ({raw!r}) is not valid UTF-8") from error
        if piece in vocab:
            raise DataFormatError(f"{path}: token {token_id} {piece!r} duplicates token {vocab[piece]}")
        vocab[piece] = token_id
        if token_id >= len(SPECIAL_TOKENS) and piece not in byte_tokens:
            scores[piece] = score
    missing = sorted(byte_tokens - vocab.keys())
    if missing:
        raise DataFormatError(f"{path}: byte-fallback tokens missing from the vocabulary, e.g. {missing[:3]}")
    # Only normal pieces take part in merges, ranked by the merged piece's score (best first).
    merges = generate_merges(vocab, scores, skip_tokens=[*SPECIAL_TOKENS, *byte_tokens])
    model = BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True, dropout=None)
    backend = Tokenizer(model)
    # run.c always prepends one space to non-empty text (even one that already starts with a space) and does no
    # other normalization, so Prepend + Replace (not Metaspace, which skips the prefix before a leading space).
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(Regex(" "), SPACE)])
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    unk, bos, eos = SPECIAL_TOKENS
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return fast_tokenizer(backend, bos, eos, unk=unk, pad_with_eos=True, **extra)


def convert_llama2c(checkpoint: Path, tokenizer: Path, out_dir: Path, *, overwrite: bool = False) -> Path:
    """Convert a legacy llama2.c checkpoint and its tokenizer into an HF ``LlamaForCausalLM`` + tokenizer directory.

    Returns ``out_dir``, loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``;
    it is written whole (an existing model folder is replaced only with ``overwrite``).
    """
    checkpoint, tokenizer, out_dir = Path(checkpoint), Path(tokenizer), Path(out_dir)
    header = read_llama2c_header(checkpoint)
    # Read the tokenizer before the weights: a mismatched pair fails before any heavy work.
    hf_tokenizer = llama2c_tokenizer(tokenizer, vocab_size=header.vocab_size, model_max_length=header.seq_len)
    model = load_llama2c_model(checkpoint)
    with atomic_directory(
        out_dir, overwrite=overwrite, what="a model folder", ours=lambda d: (d / "config.json").is_file()
    ) as work:
        model.save_pretrained(work)
        hf_tokenizer.save_pretrained(work)
    logger.info("converted %s (%s) to %s", checkpoint, header.describe(), out_dir)
    return out_dir
