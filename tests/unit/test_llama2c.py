"""llama2.c import: synthetic checkpoints written here, checked against a numpy port of llama2.c's run.c."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from retriever.models.llama2c import (
    convert_llama2c,
    llama2c_config,
    llama2c_tokenizer,
    load_llama2c_model,
    read_llama2c_header,
    read_llama2c_tokenizer,
    read_llama2c_weights,
)

# ------------------------------------------------------------------------------------------ llama2.c file writers


def write_checkpoint(
    path: Path,
    *,
    dim: int,
    hidden_dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    vocab_size: int,
    seq_len: int,
    shared: bool,
    seed: int,
) -> dict[str, np.ndarray]:
    """Random weights in llama2.c's legacy layout (as export.py legacy_export writes them); returns the tensors."""
    rng = np.random.default_rng(seed)
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim

    def rand(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {
        "tok_embeddings": rand(vocab_size, dim),
        "attention_norm": 1.0 + rand(n_layers, dim, scale=0.1),
        "wq": rand(n_layers, dim, dim),
        "wk": rand(n_layers, kv_dim, dim),
        "wv": rand(n_layers, kv_dim, dim),
        "wo": rand(n_layers, dim, dim),
        "ffn_norm": 1.0 + rand(n_layers, dim, scale=0.1),
        "w1": rand(n_layers, hidden_dim, dim),
        "w2": rand(n_layers, dim, hidden_dim),
        "w3": rand(n_layers, hidden_dim, dim),
        "norm": 1.0 + rand(dim, scale=0.1),
    }
    freqs = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2)[: head_dim // 2] / head_dim))
    angles = np.outer(np.arange(seq_len), freqs)
    w["freq_cos"] = np.cos(angles).astype(np.float32)
    w["freq_sin"] = np.sin(angles).astype(np.float32)
    if not shared:
        w["wcls"] = rand(vocab_size, dim)
    header = (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size if shared else -vocab_size, seq_len)
    with path.open("wb") as handle:
        handle.write(struct.pack("<7i", *header))
        for array in w.values():
            handle.write(array.astype("<f4").tobytes())
    return w


def write_tokenizer(path: Path, pieces: list[tuple[bytes, float]]) -> None:
    """llama2.c tokenizer.bin: int32 max_token_length, then (float score, int32 len, bytes) per token."""
    with path.open("wb") as handle:
        handle.write(struct.pack("<i", max(len(p) for p, _ in pieces)))
        for piece, score in pieces:
            handle.write(struct.pack("<fi", score, len(piece)))
            handle.write(piece)


def synthetic_vocab(vocab_size: int) -> list[tuple[bytes, float]]:
    """<unk>, <s>, </s>, 256 byte tokens, then characters and merged pieces with decreasing scores (as in llama2.c)."""
    pieces: list[tuple[bytes, float]] = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0)]
    pieces += [(f"<0x{b:02X}>".encode(), 0.0) for b in range(256)]
    merged = [" t", "he", " a", " the", "in", " s", "er", " w", "an", " an", " and", "ou", "on", " o", " th", "the"]
    merged += [" b", "at", " h", "ing", " ing", " i", " in", "is", " is", "it", " it", "er ", "ll", " ll", "é", "ée"]
    chars = [" ", "e", "t", "a", "h", "o", "n", "s", "i", "r", "d", "l", "w", "g", "b", "u", ".", ",", "é"]
    next_score = 0.0
    for piece in merged:
        pieces.append((piece.encode(), next_score))
        next_score -= 1.0
    for char in chars:
        if char.encode() not in {p for p, _ in pieces}:
            pieces.append((char.encode(), next_score))
            next_score -= 1.0
    assert len(pieces) <= vocab_size
    filler = 0
    while len(pieces) < vocab_size:  # unreachable pieces, so the vocab size matches the checkpoint's
        pieces.append((f"<x{filler}>".encode(), next_score))
        next_score -= 1.0
        filler += 1
    return pieces


# --------------------------------------------------------------------------------------- reference implementations


def run_c_encode(text: str, pieces: list[tuple[bytes, float]], bos: bool = True) -> list[int]:
    """A direct port of llama2.c run.c ``encode``: dummy prefix, per-codepoint lookup or byte fallback, then
    repeatedly merge the adjacent pair whose concatenation has the best score (first one on ties)."""
    lookup = {piece: index for index, (piece, _) in enumerate(pieces)}
    tokens = [1] if bos else []
    if not text:
        return tokens
    tokens.append(lookup[b" "])
    for char in text:
        raw = char.encode("utf-8")
        if raw in lookup:
            tokens.append(lookup[raw])
        else:
            tokens.extend(byte + 3 for byte in raw)
    start = 1 if bos else 0
    while True:
        best_score, best_index, best_id = -1e10, -1, -1
        for i in range(start, len(tokens) - 1):
            merged = pieces[tokens[i]][0] + pieces[tokens[i + 1]][0]
            if merged in lookup and pieces[lookup[merged]][1] > best_score:
                best_score, best_index, best_id = pieces[lookup[merged]][1], i, lookup[merged]
        if best_index == -1:
            return tokens
        tokens[best_index : best_index + 2] = [best_id]


def rmsnorm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * weight


def run_c_logits(w: dict[str, np.ndarray], n_heads: int, n_kv_heads: int, tokens: list[int]) -> np.ndarray:
    """llama2.c run.c ``forward`` for every position (float64): RoPE on interleaved pairs, GQA, SwiGLU FFN."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    n_layers, dim = w["attention_norm"].shape
    head_size = dim // n_heads
    kv_dim = n_kv_heads * head_size
    group = n_heads // n_kv_heads
    T = len(tokens)
    x = w["tok_embeddings"][tokens]
    pos = np.arange(T)[:, None]
    for layer in range(n_layers):
        xb = rmsnorm(x, w["attention_norm"][layer])
        q = xb @ w["wq"][layer].T
        k = xb @ w["wk"][layer].T
        v = xb @ w["wv"][layer].T
        for i in range(0, dim, 2):  # exactly run.c's loop: the pair (i, i+1) turns by pos * freq(i % head_size)
            freq = 1.0 / 10000.0 ** ((i % head_size) / head_size)
            cos, sin = np.cos(pos[:, 0] * freq), np.sin(pos[:, 0] * freq)
            targets = (q, k) if i < kv_dim else (q,)
            for vec in targets:
                v0, v1 = vec[:, i].copy(), vec[:, i + 1].copy()
                vec[:, i] = v0 * cos - v1 * sin
                vec[:, i + 1] = v0 * sin + v1 * cos
        out = np.zeros((T, dim))
        for h in range(n_heads):
            kvh = h // group
            qh = q[:, h * head_size : (h + 1) * head_size]
            kh = k[:, kvh * head_size : (kvh + 1) * head_size]
            vh = v[:, kvh * head_size : (kvh + 1) * head_size]
            scores = qh @ kh.T / np.sqrt(head_size)
            scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
            out[:, h * head_size : (h + 1) * head_size] = scores @ vh
        x = x + out @ w["wo"][layer].T
        xb = rmsnorm(x, w["ffn_norm"][layer])
        h1, h3 = xb @ w["w1"][layer].T, xb @ w["w3"][layer].T
        x = x + (h1 / (1.0 + np.exp(-h1)) * h3) @ w["w2"][layer].T
    x = rmsnorm(x, w["norm"])
    return x @ w.get("wcls", w["tok_embeddings"]).T


# ---------------------------------------------------------------------------------------------------------- tests

SHAPES = {
    "gqa_tied": dict(dim=32, hidden_dim=56, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, seq_len=24),
    "mha_separate": dict(dim=24, hidden_dim=40, n_layers=3, n_heads=3, n_kv_heads=3, vocab_size=330, seq_len=16),
    "mqa_separate": dict(dim=32, hidden_dim=48, n_layers=1, n_heads=4, n_kv_heads=1, vocab_size=340, seq_len=40),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_converted_logits_equal_run_c_forward(tmp_path: Path, name: str) -> None:
    shape = SHAPES[name]
    shared = name.endswith("tied")
    ckpt, tok = tmp_path / "model.bin", tmp_path / "tok.bin"
    weights = write_checkpoint(ckpt, **shape, shared=shared, seed=len(name))
    write_tokenizer(tok, synthetic_vocab(shape["vocab_size"]))

    out = convert_llama2c(ckpt, tok, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        shape["dim"],
        shape["hidden_dim"],
        shape["n_layers"],
    )
    assert (config.num_attention_heads, config.num_key_value_heads) == (shape["n_heads"], shape["n_kv_heads"])
    assert config.max_position_embeddings == shape["seq_len"]
    assert config.vocab_size == shape["vocab_size"]
    assert config.tie_word_embeddings is shared
    assert config.rms_norm_eps == 1e-5 and config.rope_parameters["rope_theta"] == 10000.0
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    if not shared:
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)

    tokens = [1, 270, 5, 299, 17, 260, 3, 288, 290, 261, 262, 263]
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double().numpy()
    reference = run_c_logits(weights, shape["n_heads"], shape["n_kv_heads"], tokens)
    assert np.abs(reference).max() > 1.0  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_in_memory_model_is_complete(tmp_path: Path, shared: bool) -> None:
    """Built on the meta device, the loaded model must hold only real CPU tensors, tied iff the header says so."""
    ckpt = tmp_path / "model.bin"
    weights = write_checkpoint(ckpt, **SHAPES["gqa_tied"], shared=shared, seed=3)
    model = load_llama2c_model(ckpt)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is shared
    tokens = [1, 300, 4, 77]
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double().numpy()
    np.testing.assert_allclose(logits, run_c_logits(weights, 4, 2, tokens), rtol=1e-5, atol=1e-5)


def test_permutation_is_what_makes_rope_agree(tmp_path: Path) -> None:
    """Without the q/k row permutation the HF model computes something else (the test above is sensitive to it)."""
    shape = SHAPES["gqa_tied"]
    ckpt = tmp_path / "model.bin"
    weights = write_checkpoint(ckpt, **shape, shared=True, seed=7)
    header, tensors = read_llama2c_weights(ckpt)
    model = AutoModelForCausalLM.from_config(llama2c_config(header), dtype=torch.float32).eval()
    state = {
        "model.embed_tokens.weight": tensors["tok_embeddings"],
        "model.norm.weight": tensors["norm"],
        "lm_head.weight": tensors["tok_embeddings"],
    }
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        for hf, l2c in [
            ("input_layernorm", "attention_norm"),
            ("self_attn.q_proj", "wq"),  # unpermuted on purpose
            ("self_attn.k_proj", "wk"),
            ("self_attn.v_proj", "wv"),
            ("self_attn.o_proj", "wo"),
            ("post_attention_layernorm", "ffn_norm"),
            ("mlp.gate_proj", "w1"),
            ("mlp.down_proj", "w2"),
            ("mlp.up_proj", "w3"),
        ]:
            state[p + hf + ".weight"] = tensors[l2c][i]
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    tokens = [1, 270, 5, 299, 17, 260]
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double().numpy()
    reference = run_c_logits(weights, shape["n_heads"], shape["n_kv_heads"], tokens)
    np.testing.assert_allclose(logits[0], reference[0], rtol=1e-5, atol=1e-5)  # position 0: RoPE is the identity
    assert np.abs(logits[1:] - reference[1:]).max() > 1e-2


def test_header_reading(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.bin"
    write_checkpoint(ckpt, **SHAPES["mqa_separate"], shared=False, seed=1)
    header = read_llama2c_header(ckpt)
    assert (header.dim, header.hidden_dim, header.n_layers, header.n_heads, header.n_kv_heads) == (32, 48, 1, 4, 1)
    assert (header.vocab_size, header.seq_len, header.shared_classifier) == (340, 40, False)
    assert (header.head_dim, header.kv_dim) == (8, 8)
    floats = 340 * 32 + 32 + 32 * 32 + 8 * 32 * 2 + 32 * 32 + 32 + 48 * 32 * 3 + 32 + 40 * 4 * 2 + 340 * 32
    assert header.expected_file_size() == 28 + 4 * floats == ckpt.stat().st_size


def test_truncated_checkpoint_fails_clearly(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.bin"
    write_checkpoint(ckpt, **SHAPES["gqa_tied"], shared=True, seed=2)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=r"model\.bin: size .* does not match its header .* truncated"):
        read_llama2c_header(ckpt)
    ckpt.write_bytes(data + b"\0" * 8)
    with pytest.raises(ValueError, match="trailing data"):
        read_llama2c_header(ckpt)
    # A separate-classifier header on a tied file: the size check catches the missing wcls.
    ckpt.write_bytes(data[:20] + struct.pack("<i", -320) + data[24:])
    with pytest.raises(ValueError, match="classifier=separate.*truncated"):
        convert_llama2c(ckpt, tmp_path / "unused.bin", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_garbage_and_other_formats_fail_clearly(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="not a legacy llama2.c checkpoint|inconsistent llama2.c header"):
        read_llama2c_header(garbage)
    short = tmp_path / "short.bin"
    short.write_bytes(b"\1\2\3")
    with pytest.raises(ValueError, match="too short"):
        read_llama2c_header(short)
    versioned = tmp_path / "v1.bin"
    versioned.write_bytes(struct.pack("<Ii", 0x616B3432, 1) + bytes(248))
    with pytest.raises(ValueError, match="versioned llama2.c checkpoint"):
        read_llama2c_header(versioned)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(struct.pack("<7i", 30, 8, 1, 4, 4, 10, 4))
    with pytest.raises(ValueError, match="dim 30 is not divisible by n_heads 4"):
        read_llama2c_header(odd)
    with pytest.raises(FileNotFoundError):
        read_llama2c_header(tmp_path / "missing.bin")


TEXTS = [
    "the cat sat on the mat.",
    "Once upon a time, in a land far away, there lived an ant and a bee.",
    " leading space and  double  spaces ",
    "café née déjà vu",  # é is in the vocab; other accents fall back to bytes
    "日本語 🤗 mixed ünïcödé",
    "newline\nand\ttab",
    "theing thein isit itis",
    "a",
]


def test_tokenizer_matches_run_c_encode(tmp_path: Path) -> None:
    pieces = synthetic_vocab(320)
    path = tmp_path / "tok.bin"
    write_tokenizer(path, pieces)
    tokenizer = llama2c_tokenizer(path, vocab_size=320)
    assert len(tokenizer) == 320
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id) == (
        1,
        2,
        0,
        2,
    )
    for text in TEXTS:
        expected = run_c_encode(text, pieces)
        assert tokenizer.encode(text) == expected, text
        assert tokenizer.encode(text, add_special_tokens=False) == expected[1:], text
        assert tokenizer.decode(expected, skip_special_tokens=True) == text, text
    assert tokenizer.encode("") == [1]
    # Merges really happen: " the" is one token, reached through " t" + "he" or " th" + "e".
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("the", add_special_tokens=False)) == ["▁the"]


def test_tokenizer_survives_save_and_reload(tmp_path: Path) -> None:
    pieces = synthetic_vocab(320)
    path = tmp_path / "tok.bin"
    write_tokenizer(path, pieces)
    llama2c_tokenizer(path).save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in TEXTS:
        assert reloaded.encode(text) == run_c_encode(text, pieces), text
    assert reloaded.pad_token == "</s>" and reloaded.padding_side == "left"


def test_tokenizer_file_errors(tmp_path: Path) -> None:
    pieces = synthetic_vocab(320)
    path = tmp_path / "tok.bin"
    write_tokenizer(path, pieces)
    with pytest.raises(ValueError, match="holds 320 tokens but the checkpoint's vocab_size is 512"):
        read_llama2c_tokenizer(path, vocab_size=512)
    with pytest.raises(ValueError, match="trailing bytes after 310 tokens"):
        read_llama2c_tokenizer(path, vocab_size=310)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(ValueError, match="token 319 .* truncated"):
        read_llama2c_tokenizer(path)
    write_tokenizer(path, pieces[:100])
    with pytest.raises(ValueError, match="only 100 tokens"):
        read_llama2c_tokenizer(path)
    duplicated = pieces[:-1] + [(b" the", -500.0)]
    write_tokenizer(path, duplicated)
    with pytest.raises(ValueError, match="duplicates token"):
        llama2c_tokenizer(path)
