from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, LlamaForCausalLM

from retriever.models.bidirectional import (
    BidirectionalUnsupported,
    bidirectional_mask,
    check_supported,
    set_bidirectional,
)


def tiny_llama(attn: str) -> LlamaForCausalLM:  # noqa: D103
    torch.manual_seed(0)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    config = LlamaConfig(vocab_size=64, num_attention_heads=4, num_key_value_heads=2, **shape)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def states(model, input_ids, attention_mask, bidirectional: bool):
    embeds = model.get_input_embeddings()(input_ids)
    mask = bidirectional_mask(model.config, embeds, attention_mask) if bidirectional else attention_mask
    with torch.no_grad():
        return model.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bidirectional_at_batch_size_one_sees_the_future(attn):
    """Changing the last token changes the first token's state only when attention is bidirectional."""
    model = tiny_llama(attn)
    ids_a = torch.tensor([[5, 6, 7, 8]])
    ids_b = torch.tensor([[5, 6, 7, 9]])
    ones = torch.ones_like(ids_a)
    causal_a, causal_b = states(model, ids_a, ones, False), states(model, ids_b, ones, False)
    assert torch.allclose(causal_a[:, 0], causal_b[:, 0], atol=1e-6)

    assert set_bidirectional(model, True) == 2
    bi_a, bi_b = states(model, ids_a, ones, True), states(model, ids_b, ones, True)
    assert not torch.allclose(bi_a[:, 0], bi_b[:, 0], atol=1e-4)
    assert not torch.allclose(bi_a, causal_a, atol=1e-4)


def test_the_mask_is_never_skipped_for_an_unpadded_single_text():
    model = tiny_llama("sdpa")
    ids = torch.tensor([[1, 2, 3]])
    mask = bidirectional_mask(model.config, model.get_input_embeddings()(ids), torch.ones_like(ids))
    assert mask is not None and mask.dim() == 4 and bool(mask.all())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padding_is_masked(attn):
    """A left-padded text gets the same states for its real tokens as the same text alone."""
    model = tiny_llama(attn)
    set_bidirectional(model, True)
    alone = states(model, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), True)
    padded_ids = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 7, 6, 5]])
    padded_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    padded = states(model, padded_ids, padded_mask, True)
    assert torch.allclose(padded[0, 2:], alone[0], atol=1e-5)


def test_eager_and_sdpa_agree():
    ids = torch.tensor([[0, 3, 4, 5], [6, 7, 8, 9]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    outs = []
    for attn in ("eager", "sdpa"):
        model = tiny_llama(attn)
        set_bidirectional(model, True)
        outs.append(states(model, ids, mask, True))
    assert torch.allclose(outs[0][0, 1:], outs[1][0, 1:], atol=1e-5)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5)


def test_switching_back_restores_causal_outputs():
    model = tiny_llama("sdpa")
    ids, ones = torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.long)
    before = states(model, ids, ones, False)
    set_bidirectional(model, True)
    set_bidirectional(model, False)
    assert torch.allclose(states(model, ids, ones, False), before, atol=1e-6)


def test_unsupported_model_types_and_attention_are_refused_clearly():
    with pytest.raises(BidirectionalUnsupported, match=r"model type 'gpt2'.*supported: llama"):
        check_supported(GPT2Config())
    config = LlamaConfig()
    config._attn_implementation = "flash_attention_2"
    with pytest.raises(BidirectionalUnsupported, match="attn_implementation"):
        check_supported(config)
