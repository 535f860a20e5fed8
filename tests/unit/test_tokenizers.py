"""Tokenizers: a BPE trained here, tiny tiktoken / GPT-2 files written here, retrieval-style batch encoding."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
import tiktoken
import torch
from transformers import AutoTokenizer

from retriever.models.tokenizers import (
    LLAMA3_PATTERN,
    gpt2_tokenizer,
    is_sentencepiece_model,
    is_tiktoken_ranks_file,
    llama3_special_tokens,
    llama3_tokenizer,
    load_tokenizer,
    prepare_for_retrieval,
    tokenize,
    train_bpe_tokenizer,
    train_word_tokenizer,
)

CORPUS = (
    """the quick brown fox jumps over the lazy dog
a retriever ranks passages for a query
dense retrieval encodes queries and passages as vectors
sparse retrieval maps text onto the vocabulary
the fox and the dog are friends
queries are short, passages are longer than queries""".splitlines()
    * 5
)


@pytest.fixture(scope="module")
def trained():
    return train_bpe_tokenizer(CORPUS, vocab_size=300)


def test_trained_bpe_layout_and_determinism(trained, tmp_path: Path) -> None:
    assert len(trained) == 300
    assert trained.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert (trained.bos_token_id, trained.eos_token_id, trained.pad_token_id) == (1, 2, 2)
    # Merges were learnt: a frequent word is a single token (byte-level "Ġ" marks the leading space).
    assert trained.tokenize(" the") == ["Ġthe"]
    again = train_bpe_tokenizer(iter(CORPUS), vocab_size=300, out_dir=tmp_path / "tok")
    assert again.backend_tokenizer.to_str() == trained.backend_tokenizer.to_str()
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "the lazy retriever encodes a query about ünïcode 🦊"
    assert reloaded.encode(text) == trained.encode(text) == [1] + trained.encode(text, add_special_tokens=False)
    assert reloaded.decode(reloaded.encode(text), skip_special_tokens=True) == text


def test_trained_bpe_bad_input() -> None:
    with pytest.raises(ValueError, match="vocab_size 100 is too small"):
        train_bpe_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="no texts"):
        train_bpe_tokenizer([], vocab_size=300)
    with pytest.raises(TypeError, match="text 1 is int"):
        train_bpe_tokenizer(["fine", 3], vocab_size=300)  # type: ignore[list-item]


def test_tokenize_bos_switch_left_padding_and_no_eos(trained) -> None:
    texts = ["the fox", "a retriever ranks passages"]
    ids = [trained.encode(t, add_special_tokens=False) for t in texts]
    assert len(ids[0]) < len(ids[1])
    width = len(ids[1]) + 1
    with_bos = tokenize(trained, texts, max_length=64, add_bos=True)
    expected = [[2] * (width - 1 - len(ids[0])) + [1] + ids[0], [1] + ids[1]]
    assert with_bos["input_ids"].tolist() == expected
    assert with_bos["attention_mask"].tolist() == [[0] * (width - 1 - len(ids[0])) + [1] * (len(ids[0]) + 1)] + [
        [1] * width
    ]
    assert with_bos["input_ids"].dtype == torch.long

    without = tokenize(trained, texts, max_length=64, add_bos=False)
    assert without["input_ids"].tolist() == [[2] * (len(ids[1]) - len(ids[0])) + ids[0], ids[1]]
    assert int(without["attention_mask"].sum()) == len(ids[0]) + len(ids[1])

    padded = tokenize(trained, texts, max_length=20, add_bos=True, pad_to_max_length=True)
    assert padded["input_ids"].shape == (2, 20)
    assert padded["input_ids"][1].tolist() == [2] * (19 - len(ids[1])) + [1] + ids[1]


def test_tokenize_is_independent_of_the_post_processor() -> None:
    tokenizer = train_bpe_tokenizer(CORPUS, vocab_size=300)
    texts = ["the fox", "dense retrieval"]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    assert len(ids[0]) < len(ids[1])
    gap = len(ids[1]) - len(ids[0])
    expected = {
        True: [[2] * gap + [1] + ids[0], [1] + ids[1]],
        False: [[2] * gap + ids[0], ids[1]],
    }
    for post_processor_bos in (False, True):
        tokenizer = prepare_for_retrieval(tokenizer, add_bos=post_processor_bos)
        assert (tokenizer("the fox")["input_ids"][0] == 1) is post_processor_bos
        for add_bos in (False, True):
            assert tokenize(tokenizer, texts, 16, add_bos=add_bos)["input_ids"].tolist() == expected[add_bos]


def test_truncation_keeps_bos(trained) -> None:
    text = "the quick brown fox jumps over the lazy dog"
    ids = trained.encode(text, add_special_tokens=False)
    assert len(ids) > 5
    out = tokenize(trained, [text], max_length=5, add_bos=True)
    assert out["input_ids"].tolist() == [[1] + ids[:4]]
    out = tokenize(trained, [text], max_length=5, add_bos=False)
    assert out["input_ids"].tolist() == [ids[:5]]
    with pytest.raises(ValueError, match="leaves no room"):
        tokenize(trained, [text], max_length=1, add_bos=True)


def test_special_token_strings_in_text_stay_text(trained) -> None:
    out = tokenize(trained, ["a </s> b <s>"], max_length=32, add_bos=False)
    assert 1 not in out["input_ids"].tolist()[0] and 2 not in out["input_ids"].tolist()[0]
    assert trained.decode(out["input_ids"][0]) == "a </s> b <s>"


def test_prepare_for_retrieval_sets_pad_and_side(trained, tmp_path: Path) -> None:
    trained.save_pretrained(tmp_path / "t")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "t")
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    prepared = prepare_for_retrieval(tokenizer, add_bos=False)
    assert (tokenizer.pad_token, tokenizer.padding_side) == (None, "right")  # the argument is untouched
    assert tokenizer("the fox")["input_ids"][0] == 1
    tokenizer = prepared
    assert (tokenizer.pad_token, tokenizer.padding_side) == ("</s>", "left")
    batch = tokenizer(["the fox", "a retriever ranks passages"], padding=True)["input_ids"]
    assert batch[0][0] == 2 and 1 not in batch[0] + batch[1]  # left padded with eos, no BOS
    # The choice survives save/reload through the post-processor in tokenizer.json.
    tokenizer.save_pretrained(tmp_path / "nobos")
    assert AutoTokenizer.from_pretrained(tmp_path / "nobos")("the fox")["input_ids"][0] != 1


def test_empty_text_without_bos_is_an_error(trained) -> None:
    assert tokenize(trained, [""], max_length=4, add_bos=True)["input_ids"].tolist() == [[1]]
    with pytest.raises(ValueError, match="text 1 encodes to no tokens"):
        tokenize(trained, ["x", ""], max_length=4, add_bos=False)


# ------------------------------------------------------------------------------------- tiny files of real formats


def _tiny_ranks() -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for token in [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b" s", b"is", b" is", b"er", b"  "]:
        ranks[token] = len(ranks)
    return ranks


def test_llama3_tokenizer_from_a_ranks_file(tmp_path: Path) -> None:
    ranks = _tiny_ranks()
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    assert is_tiktoken_ranks_file(path) and not is_sentencepiece_model(path)
    tokenizer = load_tokenizer(path)
    specials = llama3_special_tokens()
    assert len(specials) == 256 and len(set(specials)) == 256
    assert specials[:2] == ["<|begin_of_text|>", "<|end_of_text|>"]
    assert specials[-1] == "<|reserved_special_token_250|>"
    assert len(tokenizer) == len(ranks) + 256
    n = len(ranks)
    assert tokenizer.convert_tokens_to_ids(["<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>"]) == [
        n,
        n + 6,
        n + 9,
    ]
    special_ids = {token: n + i for i, token in enumerate(specials)}
    reference = tiktoken.Encoding("tiny", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special_ids)
    for text in ["the thing is", "  spaced   out\n\nlines", "ünï 🤗", "I'll THE the's 12345"]:
        assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text), text
        assert tokenizer.encode(text)[0] == n
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


def test_llama3_tokenizer_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "vocab.json"
    path.write_text('{"a": 0}')
    with pytest.raises(ValueError, match="not a tiktoken ranks file"):
        llama3_tokenizer(path)
    with pytest.raises(ValueError, match="not a tokenizer file this project reads"):
        load_tokenizer(path)


@pytest.mark.parametrize("header", [False, True])
def test_gpt2_tokenizer_from_vocab_and_merges(tmp_path: Path, header: bool) -> None:
    symbols = ["Ġ", "t", "h", "e", "a", "Ġt", "he", "Ġthe", "Ġa", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}))
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a"]
    (tmp_path / "merges.txt").write_text(("#version: 0.2\n" if header else "") + "\n".join(merges) + "\n")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode(" the a", add_special_tokens=False) == [7, 8]
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 9 == tokenizer.eos_token_id == tokenizer.bos_token_id
    assert tokenizer.pad_token is None
    batch = tokenize(tokenizer, [" the", " the a"], max_length=8, add_bos=True)
    assert batch["input_ids"].tolist() == [[9, 9, 7], [9, 7, 8]]  # pad falls back to eos
    assert gpt2_tokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt").get_vocab() == tokenizer.get_vocab()


def test_load_tokenizer_directory_and_missing_paths(trained, tmp_path: Path) -> None:
    trained.save_pretrained(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").encode("the fox") == trained.encode("the fox")
    assert load_tokenizer(str(tmp_path / "saved")).encode("the fox") == trained.encode("the fox")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_tokenizer(tmp_path / "nope" / "tokenizer.model")


def test_missing_hub_tokenizer_offline_fails_fast_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        load_tokenizer("retriever-tests/no-such-tokenizer")
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "HF_HUB_OFFLINE=1" in message
    assert "huggingface-cli download retriever-tests/no-such-tokenizer" in message
    assert "pass its path" in message


# ---- the word-level tokenizer of the synthetic benchmark ---------------------------------------------------------

WORD_CORPUS = [
    "kotibo suka ab1234 butefi, kotibo.",
    "suka kotibo zx9 fufa!",
    "the code ab1234 names kotibo",
]


def test_word_tokenizer_vocabulary_is_ordered_by_frequency_then_word() -> None:
    tokenizer = train_word_tokenizer(WORD_CORPUS)
    # kotibo 4; suka 2, ab1234 2; every other word once (ties by the word: punctuation sorts before letters).
    expected = ["<unk>", "<s>", "</s>", "kotibo", "ab1234", "suka", "!", ",", ".", "butefi", "code", "fufa"]
    expected += ["names", "the", "zx9"]
    assert tokenizer.get_vocab() == {token: index for index, token in enumerate(expected)}
    assert len(tokenizer) == 15
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2 and tokenizer.padding_side == "left"


def test_word_tokenizer_keeps_words_whole_splits_punctuation_and_adds_bos() -> None:
    tokenizer = train_word_tokenizer(WORD_CORPUS)
    text = "kotibo, ab1234 zx9! butefi."
    assert tokenizer.tokenize(text) == ["kotibo", ",", "ab1234", "zx9", "!", "butefi", "."]
    assert tokenizer.encode(text) == [1, 3, 7, 4, 14, 6, 9, 8]
    assert tokenizer.encode(text, add_special_tokens=False) == [3, 7, 4, 14, 6, 9, 8]
    # Words outside the corpus (and pieces of a made-up code) are <unk>, never split into known sub-words.
    assert tokenizer.encode("kotibo xyz ab123 ab12345", add_special_tokens=False) == [3, 0, 0, 0]
    assert tokenizer.decode(tokenizer.encode("suka kotibo fufa"), skip_special_tokens=True) == "suka kotibo fufa"
    batch = tokenize(tokenizer, ["suka", "kotibo ab1234 fufa"], max_length=16, add_bos=True)
    assert batch["input_ids"].tolist() == [[2, 2, 1, 5], [1, 3, 4, 11]]  # pad = eos on the left, no eos appended
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_word_tokenizer_max_words_keeps_the_most_frequent() -> None:
    tokenizer = train_word_tokenizer(WORD_CORPUS, max_words=3)
    assert tokenizer.get_vocab() == {"<unk>": 0, "<s>": 1, "</s>": 2, "kotibo": 3, "ab1234": 4, "suka": 5}
    assert tokenizer.encode("kotibo butefi suka, zx9", add_special_tokens=False) == [3, 0, 5, 0, 0]
    ties = train_word_tokenizer(["b a c", "c b a"], max_words=2)  # all twice: the first two words by order
    assert ties.convert_ids_to_tokens([3, 4]) == ["a", "b"] and len(ties) == 5


def test_word_tokenizer_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    first = train_word_tokenizer(WORD_CORPUS, out_dir=tmp_path / "a")
    again = train_word_tokenizer(iter(list(WORD_CORPUS)), out_dir=tmp_path / "b")  # any iterable of str
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert first.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
    reloaded = load_tokenizer(tmp_path / "a")
    text = "the code zx9, kotibo!"
    assert reloaded.encode(text) == first.encode(text) == [1, 13, 10, 14, 7, 3, 6]
    assert (reloaded.pad_token_id, reloaded.padding_side) == (2, "left")
    other = train_word_tokenizer(list(reversed(WORD_CORPUS)))  # the order of texts does not change the ids
    assert other.get_vocab() == first.get_vocab()


def test_word_tokenizer_bad_input() -> None:
    with pytest.raises(TypeError, match="text 1 is int, expected str"):
        train_word_tokenizer(["fine", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="text 0 is bytes"):
        train_word_tokenizer([b"bytes"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no words"):
        train_word_tokenizer([])
    with pytest.raises(ValueError, match="no words"):
        train_word_tokenizer(["", "   \n\t"])
