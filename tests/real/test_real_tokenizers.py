"""The real Llama-3, Llama-2 and GPT-2 tokenizers: exact ids, vocab sizes, and agreement with the reference
implementations (tiktoken as Meta configures it, sentencepiece) on real MS MARCO text."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece
import tiktoken
from conftest import shared_path
from tiktoken.load import load_tiktoken_bpe

from retriever.models.tokenizers import (
    LLAMA3_PATTERN,
    gpt2_tokenizer,
    llama2_tokenizer,
    llama3_special_tokens,
    llama3_tokenizer,
    load_tokenizer,
    tokenize,
)

pytestmark = pytest.mark.real

SENTENCE = "This is a test sentence."
EXTRA = ["  Hello   world\n\nfoo\tbar ünïcödé 日本語 🤗", " leading space", "trailing  ", "I'm 12345 don't\r\n  x"]


@pytest.fixture(scope="module")
def real_texts() -> list[str]:
    """DL19 queries and the first BM25 passages (real web text with odd whitespace and unicode)."""
    path = shared_path("msmarco_trecdl", "rank_llm_retrieve_results", "BM25", "retrieve_results_dl19.json.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        results = json.load(handle)
    texts = [entry["query"] for entry in results]
    texts += [hit["content"] for entry in results[:10] for hit in entry["hits"][:20]]
    return texts + EXTRA


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(shared_path("tokenizers", "llama3", "tokenizer.model"))


def test_llama3_ids_and_vocabulary(llama3) -> None:
    assert len(llama3) == 128_256 and llama3.vocab_size == 128_000
    assert llama3.encode(SENTENCE, add_special_tokens=False) == [2028, 374, 264, 1296, 11914, 13]
    assert llama3.encode(SENTENCE) == [128000, 2028, 374, 264, 1296, 11914, 13]
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert llama3.convert_tokens_to_ids(names) == [128000, 128001, 128006, 128007, 128009]
    assert llama3.convert_ids_to_tokens([128002, 128255]) == [
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_250|>",
    ]
    assert (llama3.bos_token_id, llama3.eos_token_id) == (128000, 128001)
    batch = tokenize(llama3, [SENTENCE, "Hi"], max_length=16, add_bos=True)
    assert batch["input_ids"].tolist() == [[128000, 2028, 374, 264, 1296, 11914, 13], [128001] * 5 + [128000, 13347]]


def test_llama3_agrees_with_tiktoken(llama3, real_texts: list[str]) -> None:
    path = shared_path("tokenizers", "llama3", "tokenizer.model")
    ranks = load_tiktoken_bpe(str(path))
    specials = {token: len(ranks) + i for i, token in enumerate(llama3_special_tokens())}
    reference = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    for text in real_texts:
        ids = llama3.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text), text
        assert llama3.decode(ids) == text


def test_llama2_ids_and_agreement_with_sentencepiece(real_texts: list[str]) -> None:
    path = shared_path("tokenizers", "llama2", "tokenizer.model")
    tokenizer = load_tokenizer(path)
    assert len(tokenizer) == 32_000
    assert tokenizer.encode(SENTENCE, add_special_tokens=False) == [910, 338, 263, 1243, 10541, 29889]
    assert tokenizer.encode(SENTENCE) == [1, 910, 338, 263, 1243, 10541, 29889]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(path))
    for text in real_texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == reference.decode(ids)
    assert llama2_tokenizer(path).get_vocab() == tokenizer.get_vocab()


def test_gpt2_ids_with_and_without_version_header(tmp_path: Path) -> None:
    folder = shared_path("tokenizers", "gpt2")
    tokenizer = load_tokenizer(folder)
    assert len(tokenizer) == 50_257
    assert tokenizer.convert_tokens_to_ids(["Ġthe", "<|endoftext|>"]) == [262, 50256]
    assert tokenizer.encode(SENTENCE) == [1212, 318, 257, 1332, 6827, 13]
    assert tokenizer.decode(tokenizer.encode(EXTRA[0])) == EXTRA[0]
    shutil.copy(folder / "vocab.json", tmp_path / "vocab.json")
    merges = (folder / "merges.txt").read_text(encoding="utf-8")
    assert not merges.startswith("#version")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    with_header = gpt2_tokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")
    for text in [SENTENCE, *EXTRA]:
        assert with_header.encode(text) == tokenizer.encode(text)


def test_llama3_builder_and_loader_agree(llama3) -> None:
    built = llama3_tokenizer(shared_path("tokenizers", "llama3", "tokenizer.model"))
    assert built.encode(EXTRA[0]) == llama3.encode(EXTRA[0])
