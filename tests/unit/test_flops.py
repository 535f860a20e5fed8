"""The analytic step counter against torch's FlopCounterMode on real encoder steps, and against hand arithmetic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import GPT2Config

from retriever.config import DEFAULT_LORA_TARGETS, BackboneConfig, EncoderConfig, LoraConfig, config_from_dict
from retriever.flops import (
    COMPONENTS,
    BatchShape,
    FlopBreakdown,
    ModelShape,
    StepCostModel,
    mntp_flops,
    passages_per_query,
    step_flops,
)
from retriever.losses import RetrievalBatch, build_loss
from retriever.models.backbone import count_parameters
from retriever.models.bidirectional import decoder_states
from retriever.models.encoders import build_encoder

QUERY = "what is a sparse retriever"
PASSAGE = "sparse vectors live in the vocabulary space of the language model"


def make_encoder(tokenizer_dir, paradigm: str, *, lora: bool = True, targets=None, checkpointing: bool = False):
    lora_cfg = LoraConfig(enabled=lora, target_modules=list(targets or DEFAULT_LORA_TARGETS))
    backbone = BackboneConfig(
        name="tiny-s",
        tokenizer=str(tokenizer_dir),
        attn_implementation="eager",
        gradient_checkpointing=checkpointing,
        lora=lora_cfg,
        seed=3,
    )
    encoder = build_encoder(backbone, EncoderConfig(paradigm=paradigm, sparse_chunk_tokens=16))
    return encoder.train()


def measured_step(encoder, batch: BatchShape, loss: str = "cl", kd: str = "margin_mse") -> dict[str, int]:
    """FLOPs of one real training step, by aten op, as FlopCounterMode counts them."""
    queries = encoder.tokenize([QUERY] * batch.queries, "query", batch.query_length, pad_to_max_length=True)
    passages = encoder.tokenize([PASSAGE] * batch.passages, "passage", batch.passage_length, pad_to_max_length=True)
    assert queries["input_ids"].shape == (batch.queries, batch.query_length)
    assert passages["input_ids"].shape == (batch.passages, batch.passage_length)
    objective = build_loss(loss, encoder.paradigm, kd=kd, ramp_steps=10)
    teacher = torch.randn(batch.queries, batch.passages_per_query)
    with FlopCounterMode(display=False) as counter:
        q = encoder(**queries)
        p = encoder(**passages).view(batch.queries, batch.passages_per_query, -1)
        out = objective(RetrievalBatch(q, p, teacher=teacher, score_scale=encoder.score_scale), step=3)
        out.total.backward()
    counts = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    counts["total"] = int(counter.get_total_flops())
    return counts


def tiny_shape(encoder) -> ModelShape:
    return ModelShape.from_config(encoder.lm.config)


@pytest.mark.parametrize("paradigm", ["dense", "sparse"])
@pytest.mark.parametrize("lengths", [(8, 16), (12, 40)])
def test_lora_step_matches_flop_counter_exactly(tiny_tokenizer_dir, paradigm, lengths):
    encoder = make_encoder(tiny_tokenizer_dir, paradigm)
    batch = BatchShape(queries=2, passages_per_query=3, query_length=lengths[0], passage_length=lengths[1])
    got = measured_step(encoder, batch)
    want = step_flops(tiny_shape(encoder), paradigm, batch, scoring=("all",), lora_rank=16)
    assert want.total == got["total"]
    assert (want.forward["lm_head"] > 0) == (paradigm == "sparse")
    if paradigm == "dense":
        # Eager attention is the only batched matmul of a dense InfoNCE step (the sparse head's chunked matmuls
        # on position slices may also run as bmm); everything else is aten.mm.
        assert want.component("attention") == got["aten.bmm"]
        assert want.total - want.component("attention") == got["aten.mm"]


@pytest.mark.parametrize("paradigm", ["dense", "sparse"])
def test_full_finetune_step_matches_flop_counter(tiny_tokenizer_dir, paradigm):
    encoder = make_encoder(tiny_tokenizer_dir, paradigm, lora=False)
    assert all(p.requires_grad for p in encoder.parameters())
    batch = BatchShape(queries=2, passages_per_query=3, query_length=8, passage_length=24)
    got = measured_step(encoder, batch)
    want = step_flops(tiny_shape(encoder), paradigm, batch, lora_rank=None)
    assert want.total == got["total"]
    # Full fine-tuning: every linear costs forward + input grad + weight grad = 3x its forward (6N per token).
    assert want.component("linear") == 3 * want.forward["linear"]
    if paradigm == "sparse":
        # The max-pooled head's backward is routed through scatter-adds: no product at all.
        assert want.component("lm_head") == want.forward["lm_head"] > 0


@pytest.mark.parametrize(
    ("paradigm", "lora", "targets"),
    [
        ("dense", True, DEFAULT_LORA_TARGETS),
        ("sparse", True, ["q_proj", "v_proj"]),  # down_proj not adapted: the re-run stops before the base down
        ("dense", False, None),
    ],
)
def test_gradient_checkpointing_step_matches_flop_counter(tiny_tokenizer_dir, paradigm, lora, targets):
    encoder = make_encoder(tiny_tokenizer_dir, paradigm, lora=lora, targets=targets, checkpointing=True)
    batch = BatchShape(queries=2, passages_per_query=3, query_length=8, passage_length=16)
    got = measured_step(encoder, batch)
    rank = 16 if lora else None
    want = step_flops(
        tiny_shape(encoder), paradigm, batch, lora_rank=rank, lora_targets=targets or (), gradient_checkpointing=True
    )
    assert want.total == got["total"]
    assert want.recompute_total > 0 and want.recompute["attention"] == want.forward["attention"]
    plain = step_flops(tiny_shape(encoder), paradigm, batch, lora_rank=rank, lora_targets=targets or ())
    assert want.forward == plain.forward


@pytest.mark.parametrize(
    ("targets", "checkpointing"),
    [(["gate_proj"], False), (["k_proj"], False), (["up_proj", "v_proj"], True)],
)
def test_partial_lora_targets_follow_what_requires_grad(tiny_tokenizer_dir, targets, checkpointing):
    """Only gate: layer 0's attention gets no gradients at all; only k: dK and dP but no dQ in layer 0."""
    encoder = make_encoder(tiny_tokenizer_dir, "sparse", targets=targets, checkpointing=checkpointing)
    batch = BatchShape(queries=2, passages_per_query=3, query_length=8, passage_length=16)
    want = step_flops(tiny_shape(encoder), "sparse", batch, lora_targets=targets, gradient_checkpointing=checkpointing)
    assert want.total == measured_step(encoder, batch)["total"]


@pytest.mark.parametrize(
    ("loss", "kd", "paradigm"),
    [
        ("kd", "margin_mse", "dense"),
        ("kd", "kl", "sparse"),
        ("cl+kd", "margin_mse", "dense"),
        ("cl+kd", "kl", "sparse"),
    ],
)
def test_distillation_scoring_matches_flop_counter(tiny_tokenizer_dir, loss, kd, paradigm):
    encoder = make_encoder(tiny_tokenizer_dir, paradigm)
    k = passages_per_query(loss, kd, num_negatives=3)
    assert k == (2 if (loss, kd) == ("kd", "margin_mse") else 4)
    batch = BatchShape(queries=3, passages_per_query=k, query_length=8, passage_length=16)
    got = measured_step(encoder, batch, loss, kd)
    scoring = ("own",) if loss == "kd" else ("all", "own")
    want = step_flops(tiny_shape(encoder), paradigm, batch, scoring=scoring)
    assert want.total == got["total"]
    if paradigm == "dense":
        # Own-candidate scores are an einsum (a bmm): 3 queries x k candidates x D, forward + two gradients.
        assert got["aten.bmm"] - want.component("attention") == 3 * (2 * 3 * k * encoder.dimension)


def test_frozen_embedding_spares_layer0_qkv_input_gradients(tiny_tokenizer_dir):
    """With input-require-grads forced on, layer 0's q/k/v base and LoRA A get input gradients: the exact delta."""
    batch = BatchShape(queries=2, passages_per_query=2, query_length=8, passage_length=16)
    encoder = make_encoder(tiny_tokenizer_dir, "dense")
    shape = tiny_shape(encoder)
    frozen = measured_step(encoder, batch)["total"]
    encoder.lm.enable_input_require_grads()
    flowing = measured_step(encoder, batch)["total"]
    assert frozen == step_flops(shape, "dense", batch).total
    assert flowing == step_flops(shape, "dense", batch, embedding_output_requires_grad=True).total
    d, r, kv = shape.hidden_size, 16, shape.num_kv_heads * shape.head_dim
    qkv_out = shape.num_heads * shape.head_dim + 2 * kv
    assert flowing - frozen == 2 * batch.tokens * (d * qkv_out + 3 * d * r)


def test_hand_computed_small_case():
    # 1 layer, d=4, ffn=8, 2 heads of size 2 sharing 1 kv head, |V|=10, LoRA r=2 on all seven linears, dense.
    shape = ModelShape(4, 8, 1, 2, 1, 2, 10, True)
    batch = BatchShape(queries=1, passages_per_query=2, query_length=3, passage_length=5)
    tokens = 1 * 3 + 2 * 5  # 13
    # linears (d_in x d_out): q 4x4, k 4x2, v 4x2, o 4x4, gate 4x8, up 4x8, down 8x4
    weights = 16 + 8 + 8 + 16 + 32 + 32 + 32  # 144
    qkv = 16 + 8 + 8  # 32
    lora_out = 2 * (4 + 2 + 2 + 4 + 8 + 8 + 4)  # r*d_out summed: 64
    lora_in = 2 * (4 + 4 + 4 + 4 + 4 + 4 + 8)  # r*d_in summed: 64
    lora_in_qkv = 2 * (4 + 4 + 4)  # 24
    attention = 4 * 1 * 3 * 3 * 2 * 2 + 4 * 2 * 5 * 5 * 2 * 2  # 4 * texts * L * L * heads * head_dim: 144 + 800
    scoring = 2 * (1 * 2) * 4  # one query x both passages of the batch, D = 4
    forward = 2 * tokens * weights + 2 * tokens * (lora_out + lora_in) + attention + scoring
    assert forward == 3744 + 3328 + 944 + 16 == 8032
    input_grad = (
        2 * tokens * (weights - qkv)  # frozen embedding: layer 0 q/k/v need no input gradient
        + 2 * tokens * lora_out  # every LoRA B gets its input gradient
        + 2 * tokens * (lora_in - lora_in_qkv)  # LoRA A of o/gate/up/down only
        + 2 * attention  # dQ, dK, dP, dV
        + 2 * scoring  # both operands
    )
    weight_grad = 2 * tokens * (lora_out + lora_in)  # LoRA A and B only
    assert input_grad == 2912 + 1664 + 1040 + 1888 + 32 and weight_grad == 3328
    got = step_flops(shape, "dense", batch, lora_rank=2)
    assert (got.forward_total, got.backward_total, got.recompute_total) == (8032, 7536 + 3328, 0)
    assert got.total == forward + input_grad + weight_grad == 18896
    assert got.tokens == tokens
    assert got.forward == {"linear": 3744, "lora": 3328, "attention": 944, "lm_head": 0, "scoring": 16}
    # Sparse adds the LM head forward (2*13*4*10; its routed backward is a free scatter-add with a frozen head);
    # D = |V| = 10.
    sparse = step_flops(shape, "sparse", batch, lora_rank=2)
    assert sparse.total - got.total == 2 * 13 * 4 * 10 + 3 * (2 * 2 * 10) - 3 * (2 * 2 * 4)


def test_paper_shapes_matmul_and_lora_parameters():
    one, three, eight = (ModelShape.from_name(n) for n in ("llama-3.2-1b", "llama-3.2-3b", "llama-3-8b"))
    # 16 x (2048*2048*2 + 2048*512*2 + 3*2048*8192)
    assert one.matmul_parameters == 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192) == 973_078_528
    assert three.matmul_parameters == 28 * (2 * 3072 * 3072 + 2 * 3072 * 1024 + 3 * 3072 * 8192) == 2_818_572_288
    assert eight.matmul_parameters == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) == 6_979_321_856
    assert one.lora_parameters(16, DEFAULT_LORA_TARGETS) == 11_272_192
    assert eight.lora_parameters(16, DEFAULT_LORA_TARGETS) == 41_943_040
    assert (one.tie_word_embeddings, eight.tie_word_embeddings) == (True, False)
    assert one.lm_head_parameters == 128_256 * 2048


def test_per_token_rules_at_paper_scale():
    shape = ModelShape.from_name("llama-3.2-1b")
    batch = BatchShape(queries=4, passages_per_query=17, query_length=64, passage_length=128)
    lora = step_flops(shape, "sparse", batch)
    n, t = shape.matmul_parameters, batch.tokens
    assert lora.forward["linear"] == 2 * n * t
    assert lora.forward["lm_head"] == 2 * 2048 * 128_256 * t
    assert lora.weight_grad["linear"] == 0 and lora.weight_grad["lm_head"] == 0
    qkv = sum(a * b for a, b in list(shape.layer_linears().values())[:3])
    assert lora.input_grad["linear"] == 2 * (n - qkv) * t
    full = step_flops(shape, "dense", batch, lora_rank=None)
    assert full.component("linear") == 6 * n * t
    # attention: 4 * ctx * heads * head_dim per token and layer, ctx the padded length
    assert lora.forward["attention"] == 16 * 4 * 32 * 64 * (4 * 64 * 64 + 68 * 128 * 128)


def test_lora_parameter_count_matches_peft(tiny_tokenizer_dir):
    for targets in (DEFAULT_LORA_TARGETS, ["q_proj", "down_proj"]):
        encoder = make_encoder(tiny_tokenizer_dir, "dense", targets=targets)
        assert tiny_shape(encoder).lora_parameters(16, targets) == count_parameters(encoder, trainable_only=True)


def test_fused_attention_counts_like_torch_sdpa_formulas():
    shape = ModelShape(32, 96, 2, 4, 2, 8, 50, True)
    batch = BatchShape(queries=2, passages_per_query=3, query_length=8, passage_length=16)
    eager = step_flops(shape, "dense", batch, attention="eager")
    fused = step_flops(shape, "dense", batch, attention="fused")
    expected_fwd = expected_bwd = 0
    for texts, length in ((2, 8), (6, 16)):
        q, kv = (texts, 4, length, 8), (texts, 2, length, 8)
        expected_fwd += 2 * sdpa_flop_count(q, kv, kv)
        expected_bwd += 2 * sdpa_backward_flop_count(q, q, kv, kv)
    assert fused.forward["attention"] == eager.forward["attention"] == expected_fwd
    assert fused.input_grad["attention"] == expected_bwd == 5 * eager.forward["attention"] // 2
    assert eager.input_grad["attention"] == 2 * eager.forward["attention"]


def test_world_size_multiplies_only_the_global_loss():
    shape = ModelShape(32, 96, 2, 4, 2, 8, 50, True)
    batch = BatchShape(queries=4, passages_per_query=3, query_length=8, passage_length=16)
    one = step_flops(shape, "sparse", batch, world_size=1)
    four = step_flops(shape, "sparse", batch, world_size=4)
    assert four.component("scoring") == 4 * one.component("scoring") == 4 * 3 * (2 * 4 * 12 * 50)
    assert four.total - four.component("scoring") == one.total - one.component("scoring")


def test_breakdown_totals_are_consistent():
    shape = ModelShape(32, 96, 2, 4, 2, 8, 50, False)
    batch = BatchShape(queries=2, passages_per_query=2, query_length=4, passage_length=8)
    got = step_flops(shape, "sparse", batch, gradient_checkpointing=True)
    assert isinstance(got, FlopBreakdown)
    assert sum(got.by_component().values()) == got.total
    assert got.total == got.forward_total + got.backward_total + got.recompute_total
    as_dict = got.to_dict()
    assert as_dict["total"] == got.total and set(as_dict["forward"]) == set(COMPONENTS)
    with pytest.raises(KeyError, match="unknown FLOP component 'mlp'"):
        got.component("mlp")


def test_bad_inputs_fail_clearly():
    shape = ModelShape(32, 96, 2, 4, 2, 8, 50, True)
    batch = BatchShape(1, 2, 4, 4)
    with pytest.raises(ValueError, match="model type 'gpt2'"):
        ModelShape.from_config(GPT2Config())
    with pytest.raises(ValueError, match=r"LoRA targets \['c_attn'\] are not decoder-layer linears"):
        step_flops(shape, "dense", batch, lora_targets=["c_attn"])
    with pytest.raises(ValueError, match="BatchShape.passage_length must be a positive integer, got 0"):
        BatchShape(1, 2, 4, 0)
    with pytest.raises(ValueError, match="num_heads .* multiple of num_kv_heads"):
        ModelShape(32, 96, 2, 4, 3, 8, 50, True)
    with pytest.raises(KeyError, match="unknown paradigm 'hybrid'"):
        step_flops(shape, "hybrid", batch)
    with pytest.raises(KeyError, match="unknown scoring 'pairs'"):
        step_flops(shape, "dense", batch, scoring=("pairs",))
    with pytest.raises(ValueError, match="lora_rank must be positive"):
        step_flops(shape, "dense", batch, lora_rank=0)
    with pytest.raises(KeyError, match="unknown distillation loss 'mse'"):
        passages_per_query("kd", "mse", 4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_mntp_step_matches_flop_counter(tiny_tokenizer_dir, checkpointing):
    """MNTP: the whole block through the bidirectional decoder, the LM head only on masked positions."""
    encoder = make_encoder(tiny_tokenizer_dir, "dense", checkpointing=checkpointing)
    lm = encoder.lm
    torch.manual_seed(0)
    rows, length = 3, 20
    ids = torch.randint(3, lm.config.vocab_size, (rows, length))
    labels = torch.where(torch.rand(rows, length) < 0.2, ids, torch.full_like(ids, -100))
    labels[0, 5] = ids[0, 5]
    targets = labels[:, 1:]
    predicted = int((targets != -100).sum())
    with FlopCounterMode(display=False) as counter:
        hidden = decoder_states(lm, ids, torch.ones_like(ids), bidirectional=True)
        logits = lm.get_output_embeddings()(hidden[:, :-1][targets != -100])
        F.cross_entropy(logits, targets[targets != -100]).backward()
    want = mntp_flops(tiny_shape(encoder), rows, length, predicted, gradient_checkpointing=checkpointing)
    assert want.total == counter.get_total_flops()
    assert want.forward["lm_head"] == 2 * predicted * 32 * lm.config.vocab_size


def tiny_experiment(tokenizer_dir, **train):
    return config_from_dict(
        {
            "backbone": {"name": "tiny-s", "tokenizer": str(tokenizer_dir), "attn_implementation": "eager"},
            "encoder": {"paradigm": "sparse"},
            "loss": {"name": "cl+kd", "num_negatives": 3},
            "train": train,
        }
    )


def test_step_cost_model_charges_this_ranks_texts_and_the_global_loss(tiny_tokenizer_dir):
    encoder = make_encoder(tiny_tokenizer_dir, "sparse")
    batch = BatchShape(queries=2, passages_per_query=4, query_length=8, passage_length=16)
    model = StepCostModel.for_experiment(tiny_experiment(tiny_tokenizer_dir), encoder.lm.config)
    assert (model.scoring, model.lora_rank, model.world_size, model.attention) == (("all", "own"), 16, 1, "eager")
    one_rank = model.step_flops(queries=2, query_length=8, passages_per_query=4, passage_length=16)
    assert one_rank == measured_step(encoder, batch, "cl+kd", "kl")["total"]
    # Four ranks with 2 queries each: the all-reduced sum is the global step of 8 queries scored on every rank.
    four = StepCostModel.for_experiment(tiny_experiment(tiny_tokenizer_dir, num_workers=4), encoder.lm.config)
    per_rank = four.step_flops(queries=2, query_length=8, passages_per_query=4, passage_length=16)
    shape = tiny_shape(encoder)
    global_batch = BatchShape(queries=8, passages_per_query=4, query_length=8, passage_length=16)
    assert 4 * per_rank == step_flops(shape, "sparse", global_batch, scoring=("all", "own"), world_size=4).total
    mntp = StepCostModel.for_mntp(tiny_experiment(tiny_tokenizer_dir), encoder.lm.config)
    assert mntp.mntp_step_flops(rows=2, length=16, predicted=5) == mntp_flops(shape, 2, 16, 5).total
