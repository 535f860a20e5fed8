"""stories260K (a real pretrained llama2.c model) converted to HF must reproduce Karpathy's greedy story."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import shared_path
from transformers import AutoModelForCausalLM, AutoTokenizer

from retriever.models.llama2c import convert_llama2c, read_llama2c_header

pytestmark = pytest.mark.real

FIRST_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298]
STORY_START = "Once upon a time, there was a little girl named Lily"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = shared_path("models", "stories260K")
    out = tmp_path_factory.mktemp("stories260K") / "hf"
    return convert_llama2c(folder / "stories260K.bin", folder / "tok512.bin", out)


def test_header_of_stories260k() -> None:
    header = read_llama2c_header(shared_path("models", "stories260K", "stories260K.bin"))
    assert (header.dim, header.hidden_dim, header.n_layers, header.n_heads, header.n_kv_heads) == (64, 172, 5, 8, 4)
    assert (header.vocab_size, header.seq_len, header.shared_classifier) == (512, 512, True)


def test_greedy_story_and_tokenizer_round_trip(converted: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert model.config.max_position_embeddings == 512 and model.config.num_key_value_heads == 4
    assert len(tokenizer) == 512 and (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)

    with torch.no_grad():
        generated = model.generate(torch.tensor([[1]]), do_sample=False, max_new_tokens=40)[0].tolist()
    assert generated[0] == 1
    assert generated[1:11] == FIRST_IDS
    text = tokenizer.decode(generated, skip_special_tokens=True)
    assert text.startswith(STORY_START + ". She loved to play outside in the park."), text

    # The decoded story encodes back to exactly the generated ids (BOS from the post-processor).
    assert tokenizer.encode(text) == generated
    assert tokenizer.encode("Once upon a time", add_special_tokens=False) == FIRST_IDS[:4]
