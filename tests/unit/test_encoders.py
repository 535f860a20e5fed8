from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from retriever.config import BackboneConfig, EncoderConfig, LoraConfig
from retriever.models.encoders import (
    ENCODERS,
    DenseEncoder,
    SparseEncoder,
    build_encoder,
    load_encoder,
    sparse_max_logits,
)

QUERIES = ["what is a sparse retriever", "low rank adapters"]
PASSAGES = [
    "sparse vectors live in the vocabulary space of the language model",
    "low rank adapters train a small number of parameters",
    "ray shards the data",
]


def make(paradigm: str, tokenizer_dir, **encoder) -> DenseEncoder | SparseEncoder:
    backbone = BackboneConfig(name="tiny-s", tokenizer=str(tokenizer_dir), seed=3)
    return build_encoder(backbone, EncoderConfig(paradigm=paradigm, **encoder))


def init_lora_nonzero(encoder) -> None:
    """Fresh LoRA B matrices are zero; give them values so adapters change outputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)


def test_registry_has_both_paradigms():
    assert ENCODERS.get("dense") is DenseEncoder and ENCODERS.get("sparse") is SparseEncoder


def test_dense_pooling_is_mean_of_normalised_token_states(tiny_tokenizer_dir):
    encoder = make("dense", tiny_tokenizer_dir).eval()
    batch = encoder.tokenize(PASSAGES, "passage")
    with torch.no_grad():
        hidden = encoder.hidden_states(**batch)
        reps = encoder(**batch)
    for row in range(len(PASSAGES)):
        valid = batch["attention_mask"][row].bool()
        expected = F.normalize(hidden[row, valid], dim=-1).mean(dim=0)
        assert torch.allclose(reps[row], expected, atol=1e-6)
    norms = reps.norm(dim=-1)
    assert bool((norms <= 1 + 1e-6).all()) and bool((norms > 0.05).all())
    assert encoder.score_scale == pytest.approx(100.0)
    assert reps.shape == (3, encoder.dimension) == (3, 32)


def test_dense_last_pooling(tiny_tokenizer_dir):
    encoder = make("dense", tiny_tokenizer_dir, pooling="last").eval()
    batch = encoder.tokenize(QUERIES, "query")
    with torch.no_grad():
        hidden = encoder.hidden_states(**batch)
        reps = encoder(**batch)
    assert torch.allclose(reps, F.normalize(hidden[:, -1], dim=-1), atol=1e-6)


def naive_sparse(hidden, weight, mask, hidden_size):
    logits = hidden @ weight.T
    logits = logits.masked_fill(~mask.bool()[:, :, None], float("-inf"))
    return torch.log1p(torch.relu(logits.max(dim=1).values * hidden_size**-0.25))


@pytest.mark.parametrize("chunk_tokens", [1, 5, 4096])
def test_chunked_sparse_head_equals_naive_values_and_gradients(chunk_tokens):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7, [0, 0, 0, 0, 0, 1, 1]])
    upstream = torch.randn(3, 50, dtype=torch.float64)

    expected = naive_sparse(hidden, weight, mask, 16)
    (expected * upstream).sum().backward()
    grads_expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    peak = sparse_max_logits(hidden, weight, mask, chunk_tokens)
    got = torch.log1p(torch.relu(peak * 16**-0.25))
    (got * upstream).sum().backward()
    assert torch.allclose(got, expected)
    assert torch.allclose(hidden.grad, grads_expected[0])
    assert torch.allclose(weight.grad, grads_expected[1])
    # pads never contribute
    assert float(hidden.grad[0, :2].abs().sum()) == 0.0


def test_sparse_encoder_matches_the_formula(tiny_tokenizer_dir):
    encoder = make("sparse", tiny_tokenizer_dir, sparse_chunk_tokens=4).eval()
    batch = encoder.tokenize(PASSAGES, "passage")
    with torch.no_grad():
        hidden = encoder.hidden_states(**batch)
        reps = encoder(**batch)
        weight = encoder.lm.get_output_embeddings().weight
        expected = naive_sparse(hidden, weight, batch["attention_mask"], encoder.lm.config.hidden_size)
    assert torch.allclose(reps, expected, atol=1e-6)
    assert reps.shape == (3, encoder.dimension) and bool((reps >= 0).all())
    assert encoder.score_scale == 1.0
    terms = SparseEncoder.to_terms(reps)
    for (ids, weights), row in zip(terms, reps):
        assert list(ids) == sorted(ids) and len(ids) == int((row > 0).sum())
        assert torch.allclose(torch.from_numpy(weights).double(), row[ids].double(), atol=1e-6)


def test_score_is_a_dot_product_and_encode_batches_preserve_order(tiny_tokenizer_dir):
    encoder = make("dense", tiny_tokenizer_dir)
    queries = encoder.encode_queries(QUERIES, batch_size=1)
    passages = encoder.encode_passages(PASSAGES, batch_size=2)
    together = encoder.encode_passages(PASSAGES, batch_size=8)
    # Different padding widths only change float rounding.
    assert torch.allclose(passages, together, atol=1e-5)
    assert torch.allclose(encoder.score(queries, passages), queries @ passages.T)
    assert encoder.training  # encode restores the mode


def test_bos_switch(tiny_tokenizer_dir):
    with_bos = make("dense", tiny_tokenizer_dir, add_bos=True)
    without = make("dense", tiny_tokenizer_dir, add_bos=False)
    bos = with_bos.tokenizer.bos_token_id
    a = with_bos.tokenize(["low rank adapters"], "query")["input_ids"][0]
    b = without.tokenize(["low rank adapters"], "query")["input_ids"][0]
    assert int(a[0]) == bos and bos not in b.tolist()
    assert a[1:].tolist() == b.tolist()


def test_lora_defaults_and_trainable_parameters(tiny_tokenizer_dir):
    encoder = make("sparse", tiny_tokenizer_dir)
    config = encoder.model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # 7 adapted linears per layer x 2 layers, each with an A and a B matrix
    assert len(trainable) == 7 * 2 * 2


def test_missing_lora_target_is_a_clear_error(tiny_tokenizer_dir):
    backbone = BackboneConfig(
        name="tiny-s", tokenizer=str(tiny_tokenizer_dir), lora=LoraConfig(target_modules=["query_key_value"])
    )
    with pytest.raises(ValueError, match=r"LoRA target modules \['query_key_value'\] do not exist"):
        build_encoder(backbone, EncoderConfig())


def test_a_backbone_reference_that_cannot_load_says_why():
    from retriever.errors import UnknownNameError
    from retriever.models.backbone import BackboneUnavailable, backbone_config, load_backbone

    # A bare name that is no preset is a typo of one (hub ids are org/name): the presets are listed.
    with pytest.raises(UnknownNameError, match=r"unknown backbone 'tiny-xl'; known: .*tiny-s, tiny-m, tiny-l"):
        backbone_config("tiny-xl")
    with pytest.raises(UnknownNameError, match=r"did you mean 'tiny-m'"):
        load_backbone("tiny-mm")
    # A path says it is a path, not that it should be downloaded from the hub.
    with pytest.raises(BackboneUnavailable, match=r"from this local path \(no such folder\)"):
        backbone_config("/no/such/model")
    # A hub id offline (the tests run with HF_HUB_OFFLINE=1) says how to get it.
    with pytest.raises(BackboneUnavailable, match="huggingface-cli download retriever-tests/no-such-model"):
        backbone_config("retriever-tests/no-such-model")


def test_an_incomplete_encoder_directory_fails_before_loading(tiny_tokenizer_dir, tmp_path):
    import shutil

    from retriever.models.encoders import EncoderFormatError, read_encoder_meta

    directory = make("sparse", tiny_tokenizer_dir).save(tmp_path / "encoder")
    meta = json.loads((directory / "encoder.json").read_text())
    assert meta["has_adapter"] and meta["has_backbone_weights"]
    shutil.rmtree(directory / "adapter")
    with pytest.raises(EncoderFormatError, match=r"encoder/adapter: missing; the encoder directory is incomplete"):
        load_encoder(directory)
    (directory / "encoder.json").write_text(json.dumps({**meta, "encoder": {**meta["encoder"], "pooling": "max"}}))
    with pytest.raises(
        EncoderFormatError,
        match=r"encoder.json: 'encoder': invalid configuration: pooling: Input should be 'mean' or 'last'",
    ):
        read_encoder_meta(directory)
    (directory / "encoder.json").write_text("{")
    with pytest.raises(EncoderFormatError, match=r"encoder.json:1: not valid JSON"):
        read_encoder_meta(directory)


@pytest.mark.parametrize("paradigm", ["dense", "sparse"])
def test_save_load_round_trip_gives_identical_outputs(tiny_tokenizer_dir, tmp_path, paradigm):
    encoder = make(paradigm, tiny_tokenizer_dir, add_bos=False, passage_max_length=40)
    init_lora_nonzero(encoder)
    before = encoder.encode_passages(PASSAGES)
    encoder.save(tmp_path / "enc")
    meta = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    assert meta["paradigm"] == paradigm and meta["encoder"]["add_bos"] is False
    assert meta["has_adapter"] and meta["has_backbone_weights"]
    assert (tmp_path / "enc" / "adapter" / "adapter_config.json").is_file()

    loaded = load_encoder(tmp_path / "enc")
    assert type(loaded) is type(encoder)
    assert loaded.settings == encoder.settings and loaded.settings.passage_max_length == 40
    assert torch.equal(loaded.encode_passages(PASSAGES), before)
    # The adapter matters: the base alone gives different vectors.
    with loaded.model.disable_adapter():
        assert not torch.allclose(loaded.encode_passages(PASSAGES), before)


def test_encoder_directory_alone_rebuilds_the_encoder_in_a_fresh_process(tiny_tokenizer_dir, tmp_path):
    encoder = make("sparse", tiny_tokenizer_dir)
    init_lora_nonzero(encoder)
    expected = encoder.encode_queries(QUERIES)
    encoder.save(tmp_path / "enc")
    torch.save(expected, tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "from retriever.models.encoders import load_encoder\n"
        "enc = load_encoder(sys.argv[1])\n"
        f"got = enc.encode_queries({QUERIES!r})\n"
        "assert torch.allclose(got, torch.load(sys.argv[2]), atol=1e-6), (got - torch.load(sys.argv[2])).abs().max()\n"
        "print('ok', enc.paradigm)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "enc"), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok sparse")


def test_loading_a_non_encoder_directory_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.json missing"):
        load_encoder(tmp_path)


# ---- the chunked sparse head (_ChunkedMaxLogits) against the naive relu(max over valid positions) -------------


def naive_max_logits(hidden, weight, valid):
    """relu(max over valid positions of hidden @ weight.T), with the whole [batch, length, vocab] tensor."""
    logits = (hidden @ weight.T).masked_fill(~valid.bool()[:, :, None], float("-inf"))
    return torch.relu(logits.max(dim=1).values)


def sparse_head_inputs(batch=5, length=6, dim=8, vocab=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, dtype=torch.float64, generator=generator)
    weight = torch.randn(vocab, dim, dtype=torch.float64, generator=generator)
    # Left padding of different widths; text 1 has no pad, text 4 keeps only its last position.
    valid = torch.ones(batch, length, dtype=torch.long)
    for text, pads in enumerate([2, 0, 3, 1, length - 1][:batch]):
        valid[text, :pads] = 0
    upstream = torch.randn(batch, vocab, dtype=torch.float64, generator=generator)
    upstream[torch.rand(batch, vocab, generator=generator) < 0.4] = 0.0  # relu / FLOPS leave many zeros
    upstream[0] = 0.0  # a text with no gradient at all
    return hidden, weight, valid, upstream


def values_and_gradients(head, hidden, weight, valid, upstream):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    out = head(hidden, weight, valid)
    (out * upstream).sum().backward()
    return out.detach(), hidden.grad, weight.grad


# sparse_max_logits splits into chunk_tokens // length texts: 1 text, 2 texts (5 = 2 + 2 + 1), the whole batch,
# and more texts than the batch holds.
@pytest.mark.parametrize("chunk_tokens", [1, 6, 12, 30, 10_000])
def test_sparse_max_logits_equals_naive_relu_max_values_and_gradients(chunk_tokens):
    hidden, weight, valid, upstream = sparse_head_inputs()
    expected = values_and_gradients(naive_max_logits, hidden, weight, valid, upstream)
    got = values_and_gradients(
        lambda h, w, v: sparse_max_logits(h, w, v, chunk_tokens), hidden, weight, valid, upstream
    )
    assert got[0].shape == (5, 40) and got[1].shape == hidden.shape and got[2].shape == weight.shape
    for name, a, b in zip(("values", "grad hidden", "grad weight"), got, expected):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), name
    # Sanity of the setup: the head is neither all zero nor all positive, and the gradients are not trivial.
    assert 0 < int((got[0] > 0).sum()) < got[0].numel()
    assert float(got[1].abs().sum()) > 0 and float(got[2].abs().sum()) > 0
    # Pad positions and texts without upstream gradient get no hidden-state gradient.
    assert float(got[1][~valid.bool()].abs().sum()) == 0.0
    assert float(got[1][0].abs().sum()) == 0.0


def test_sparse_max_logits_values_by_hand():
    # Two texts of three positions, d = 2, vocabulary of 3; text 0's first position is padding.
    hidden = torch.tensor(
        [[[9.0, 9.0], [1.0, -2.0], [0.5, 1.0]], [[-1.0, 0.0], [2.0, 1.0], [0.0, -3.0]]], dtype=torch.float64
    )
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[0, 1, 1], [1, 1, 1]])
    hidden.requires_grad_(True)
    out = sparse_max_logits(hidden, weight, valid, chunk_tokens=3)
    # logits text 0 (valid rows): [1, -2, 1], [0.5, 1, -1.5] -> max [1, 1, 1]
    # logits text 1: [-1, 0, 1], [2, 1, -3], [0, -3, 3] -> max [2, 1, 3]
    assert out.tolist() == [[1.0, 1.0, 1.0], [2.0, 1.0, 3.0]]
    out[1, 2].backward()  # d/d(...) of text 1's term 2: argmax at position 2, weight row 2
    assert hidden.grad[1].tolist() == [[0.0, 0.0], [0.0, 0.0], [-1.0, -1.0]]
    assert float(hidden.grad[0].abs().sum()) == 0.0
    assert weight.grad.tolist() == [[0.0, 0.0], [0.0, 0.0], [0.0, -3.0]]


def test_sparse_max_logits_with_every_logit_negative_is_zero_and_passes_no_gradient():
    hidden = torch.full((2, 3, 2), 1.0, dtype=torch.float64, requires_grad=True)
    weight = torch.full((4, 2), -1.0, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[0, 1, 1], [1, 1, 1]])
    out = sparse_max_logits(hidden, weight, valid, chunk_tokens=1)
    assert torch.equal(out, torch.zeros(2, 4, dtype=torch.float64))
    out.sum().backward()
    assert float(hidden.grad.abs().sum()) == 0.0 and float(weight.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("texts_per_chunk", [1, 2, 5, 7])
def test_chunked_max_logits_function_equals_the_plain_max(texts_per_chunk):
    """Without masking or relu: the autograd function is max over all positions of hidden @ weight.T (values and
    gradients routed to the argmax), for any number of texts per chunk."""
    from retriever.models.encoders import _ChunkedMaxLogits

    hidden, weight, _, upstream = sparse_head_inputs(seed=1)
    expected = values_and_gradients(lambda h, w, v: (h @ w.T).max(dim=1).values, hidden, weight, None, upstream)
    got = values_and_gradients(
        lambda h, w, v: _ChunkedMaxLogits.apply(h, w, texts_per_chunk), hidden, weight, None, upstream
    )
    for name, a, b in zip(("values", "grad hidden", "grad weight"), got, expected):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), name
    assert bool((got[0] < 0).any())  # no relu here: negative maxima stay


def test_chunked_max_logits_gradient_only_for_the_input_that_needs_it():
    from retriever.models.encoders import _ChunkedMaxLogits

    hidden, weight, _, upstream = sparse_head_inputs(seed=2)
    frozen_head = weight.clone()  # a frozen LM head: only hidden states get a gradient
    live = hidden.clone().requires_grad_(True)
    (_ChunkedMaxLogits.apply(live, frozen_head, 2) * upstream).sum().backward()
    reference = hidden.clone().requires_grad_(True)
    ((reference @ frozen_head.T).max(dim=1).values * upstream).sum().backward()
    assert frozen_head.grad is None
    assert torch.allclose(live.grad, reference.grad, rtol=1e-12, atol=1e-12)
