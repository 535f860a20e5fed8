"""Tokenizers used by the project, built offline from their original files, and retrieval-style batch encoding.

- ``llama3_tokenizer``: Meta's Llama-3 tiktoken ranks file + its 256 special tokens (128,256 ids, BOS added).
- ``llama2_tokenizer``: the Llama-2 SentencePiece model as a fast tokenizer (byte fallback, BOS added).
- ``gpt2_tokenizer``: GPT-2 byte-level BPE from vocab.json + merges.txt.
- ``train_bpe_tokenizer``: a byte-level BPE trained on a corpus (tests).
- ``train_word_tokenizer``: a word-level vocabulary of a corpus (the offline synthetic benchmark).
- ``load_tokenizer``: resolve a reference (directory, file or hub id) to one of the above.
- ``prepare_for_retrieval`` / ``tokenize``: pad = eos, left padding, BOS switch, never EOS.
"""

from __future__ import annotations

import base64
import binascii
import copy
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from retriever.config import ConfigError
from retriever.errors import DataFormatError, SettingError, UserError

# Meta's llama3 tokenizer.py: the pre-tokenizer split pattern and the special tokens that follow the 128,000 ranks.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256
LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_EOS = "<|end_of_text|>"
GPT2_EOS = "<|endoftext|>"
# Trained tokenizers use Llama's id layout for specials (unk 0, bos 1, eos 2), matching LlamaConfig's defaults.
TRAINED_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def fast_tokenizer(
    backend: Tokenizer, bos: str, eos: str, unk: str | None = None, *, pad_with_eos: bool = False, **options: Any
) -> PreTrainedTokenizerFast:
    """The project's fast tokenizer over a ``tokenizers`` backend: Llama's conventions for every vocabulary.

    The post-processor adds BOS and never EOS, decoding keeps the text as is (no clean-up of spaces) and the model
    inputs are ``input_ids`` and ``attention_mask``. ``pad_with_eos`` pads with EOS on the left (ready for
    retrieval encoding); ``options`` go to ``PreTrainedTokenizerFast`` (e.g. ``model_max_length``).
    """
    specials = {"bos_token": bos, "eos_token": eos}
    if unk is not None:
        specials["unk_token"] = unk
    if pad_with_eos:
        specials.update(pad_token=eos, padding_side="left")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **specials,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
        **options,
    )


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens of Llama 3, in id order from 128,000 (as in Meta's llama3 ``tokenizer.py``)."""
    named = [
        LLAMA3_BOS,
        LLAMA3_EOS,
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|reserved_special_token_4|>",
        "<|eot_id|>",
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_NUM_SPECIAL_TOKENS - 5)]
    return named + reserved


def llama3_tokenizer(ranks_file: Path) -> PreTrainedTokenizerFast:
    """The Llama-3 tokenizer from Meta's tiktoken ranks file (``tokenizer.model``); BOS added by the post-processor."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = Path(ranks_file)
    if not is_tiktoken_ranks_file(ranks_file):
        raise DataFormatError(
            f"{ranks_file} is not a tiktoken ranks file (lines of '<base64 token> <rank>'); Llama 3's "
            "original tokenizer.model is one"
        )
    converter = TikTokenConverter(
        vocab_file=str(ranks_file), pattern=LLAMA3_PATTERN, extra_special_tokens=llama3_special_tokens()
    )
    return fast_tokenizer(converter.converted(), LLAMA3_BOS, LLAMA3_EOS)


def llama2_tokenizer(model_file: Path) -> PreTrainedTokenizerFast:
    """The Llama-2 SentencePiece model as a fast tokenizer that encodes like ``SentencePieceProcessor.encode``."""
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"SentencePiece model {model_file} does not exist")
    try:
        proto = SentencePieceExtractor(str(model_file)).proto
    except Exception as error:  # protobuf raises its own DecodeError type
        raise DataFormatError(f"{model_file} is not a SentencePiece model: {error}") from error
    if proto.trainer_spec.model_type != 2:
        raise DataFormatError(f"{model_file}: SentencePiece model type {proto.trainer_spec.model_type} is not BPE (2)")
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    # Follows the model's own normalizer spec (dummy prefix, whitespace escaping), merges ranked by piece score.
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto=proto, vocab=vocab, legacy=True)
    spec = proto.trainer_spec
    return fast_tokenizer(backend, spec.bos_piece, spec.eos_piece, unk=spec.unk_piece)


def gpt2_tokenizer(vocab_json: Path, merges_txt: Path) -> PreTrainedTokenizerFast:
    """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt`` (with or without the ``#version`` header line)."""
    vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
    for path in (vocab_json, merges_txt):
        if not path.is_file():
            raise FileNotFoundError(f"GPT-2 tokenizer file {path} does not exist")
    try:
        # tokenizers' reader skips a leading "#version" line and checks that every merge is two symbols.
        vocab, merges = BPE.read_file(str(vocab_json), str(merges_txt))
    except Exception as error:
        raise DataFormatError(f"cannot read GPT-2 BPE files {vocab_json} / {merges_txt}: {error}") from error
    if GPT2_EOS not in vocab:
        raise DataFormatError(f"{vocab_json} has no {GPT2_EOS!r} token; it is not a GPT-2 vocabulary")
    return GPT2Tokenizer(vocab=vocab, merges=merges, add_prefix_space=False)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: Path | None = None, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline; the same texts give the same tokenizer.

    Special tokens <unk>/<s>/</s> get ids 0/1/2, BOS is added by the post-processor, pad = eos. Saved with
    ``save_pretrained`` into ``out_dir`` when given.
    """
    n_specials = len(TRAINED_SPECIAL_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + n_specials:
        raise SettingError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least {len(alphabet) + n_specials} "
            f"ids ({len(alphabet)} bytes + {n_specials} special tokens)"
        )
    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(TRAINED_SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    seen = 0

    def counted() -> Iterable[str]:
        nonlocal seen
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"train_bpe_tokenizer: text {seen} is {type(text).__name__}, expected str")
            seen += 1
            yield text

    backend.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise DataFormatError("train_bpe_tokenizer: no texts to train on (the corpus is empty)")
    unk, bos, eos = TRAINED_SPECIAL_TOKENS
    tokenizer = fast_tokenizer(backend, bos, eos, unk=unk, pad_with_eos=True)
    if out_dir is not None:
        tokenizer.save_pretrained(Path(out_dir))
    return tokenizer


def train_word_tokenizer(
    texts: Iterable[str], out_dir: Path | None = None, max_words: int | None = None
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: every whitespace-separated word of `texts` (punctuation split off) is one token, so
    made-up words stay whole; ids by descending frequency, ties by the word; `max_words` keeps the most frequent
    ones and the rest map to <unk>. Same conventions as ``train_bpe_tokenizer`` (<unk>/<s>/</s> = 0/1/2, BOS
    added, pad = eos on the left)."""
    from collections import Counter

    from tokenizers.models import WordLevel

    if max_words is not None and max_words < 1:
        raise SettingError(f"train_word_tokenizer: max_words must be >= 1 or None, got {max_words}")
    pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    counts: Counter[str] = Counter()
    for seen, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"train_word_tokenizer: text {seen} is {type(text).__name__}, expected str")
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(text))
    if not counts:
        raise DataFormatError("train_word_tokenizer: no words to build a vocabulary from (the corpus is empty)")
    unk, bos, eos = TRAINED_SPECIAL_TOKENS
    vocab = {token: index for index, token in enumerate(TRAINED_SPECIAL_TOKENS)}
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:max_words]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = fast_tokenizer(backend, bos, eos, unk=unk, pad_with_eos=True)
    if out_dir is not None:
        tokenizer.save_pretrained(Path(out_dir))
    return tokenizer


# ------------------------------------------------------------------------------------------------- resolution


def is_tiktoken_ranks_file(path: Path) -> bool:
    """True when the file starts with tiktoken's ``<base64 token> <rank>`` lines (e.g. Llama 3's tokenizer.model)."""
    try:
        with Path(path).open("rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    lines = head.split(b"\n")[:-1] or head.split(b"\n")
    if not lines or not lines[0]:
        return False
    for line in lines[:8]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            return False
        try:
            base64.b64decode(parts[0], validate=True)
        except (binascii.Error, ValueError):
            return False
    return True


def is_sentencepiece_model(path: Path) -> bool:
    """True when the file parses as a SentencePiece ``ModelProto`` with pieces."""
    from transformers.convert_slow_tokenizer import import_protobuf

    try:
        proto = import_protobuf().ModelProto()
        proto.ParseFromString(Path(path).read_bytes())
    except Exception:  # protobuf's DecodeError and friends
        return False
    return len(proto.pieces) > 0


class TokenizerUnavailable(UserError, OSError):
    """A hub tokenizer that cannot be loaded (offline and not cached, or not on the hub)."""


def _is_hub_id(ref: str) -> bool:
    # "name" or "org/name" made of the characters the Hub allows; local-looking strings are never hub ids.
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", ref)) and not ref.endswith((".model", ".json", ".txt"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _load_file(path: Path) -> PreTrainedTokenizerBase:
    if is_tiktoken_ranks_file(path):
        return llama3_tokenizer(path)
    if is_sentencepiece_model(path):
        return llama2_tokenizer(path)
    raise DataFormatError(
        f"{path}: not a tokenizer file this project reads (a tiktoken ranks file such as Llama 3's tokenizer.model, "
        "or a SentencePiece .model); pass a directory with tokenizer.json / tokenizer_config.json, or with "
        "vocab.json + merges.txt"
    )


def _load_dir(path: Path) -> PreTrainedTokenizerBase:
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(path))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return gpt2_tokenizer(path / "vocab.json", path / "merges.txt")
    if (path / "tokenizer.model").is_file():
        return _load_file(path / "tokenizer.model")
    raise FileNotFoundError(
        f"{path}: no tokenizer found (expected tokenizer.json / tokenizer_config.json, vocab.json + merges.txt, "
        f"or tokenizer.model); found: {sorted(p.name for p in path.iterdir())[:20]}"
    )


def _load_hub(ref: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(ref)
    except OSError as error:
        how = (
            f"download it where the Hub is reachable with `huggingface-cli download {ref} --include 'tokenizer*' "
            f"'special_tokens_map.json' --local-dir DIR` (or `hf download`) and pass DIR, or place tokenizer.json "
            "and tokenizer_config.json in a directory and pass its path"
        )
        mode = "HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache" if _offline() else str(error)
        raise TokenizerUnavailable(f"cannot load tokenizer {ref!r}: {mode}; {how}") from error


def load_tokenizer(ref: str | Path) -> PreTrainedTokenizerBase:
    """Resolve a tokenizer reference.

    A directory with tokenizer.json / tokenizer_config.json → ``AutoTokenizer``; a directory with vocab.json +
    merges.txt → GPT-2; a tiktoken ranks file (or a directory holding one as tokenizer.model) → Llama 3; a
    SentencePiece .model → Llama 2; any other string that looks like ``org/name`` → the Hugging Face Hub (or its
    local cache). With ``HF_HUB_OFFLINE=1`` a tokenizer that is not cached fails at once, saying what to download.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return _load_dir(path)
    if path.is_file():
        return _load_file(path)
    text = str(ref)
    if isinstance(ref, Path) or not _is_hub_id(text):
        raise FileNotFoundError(f"tokenizer {text!r}: no such file or directory (and not a Hugging Face hub id)")
    return _load_hub(text)


# --------------------------------------------------------------------------------------------- retrieval encoding


def prepare_for_retrieval(tokenizer: PreTrainedTokenizerBase, add_bos: bool) -> PreTrainedTokenizerBase:
    """A copy of ``tokenizer`` configured for retrieval encoding (the argument is left untouched).

    pad = eos when there is no pad token, left padding, and for fast tokenizers a post-processor that adds BOS
    iff ``add_bos`` and never EOS, so that plain ``tokenizer(texts)`` calls agree with :func:`tokenize` and the
    choice is saved with the tokenizer (tokenizer.json).
    """
    if add_bos and tokenizer.bos_token is None:
        raise ConfigError(
            f"encoder.add_bos is true but tokenizer {type(tokenizer).__name__} has no BOS token; set "
            "encoder.add_bos=false"
        )
    if tokenizer.pad_token is None and tokenizer.eos_token is None:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token; set tokenizer.pad_token"
        )
    # A copy, so that a tokenizer shared elsewhere (a cache, a fixture) does not change behaviour behind its back.
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    update = getattr(tokenizer, "update_post_processor", None)
    if callable(update):
        # Set both flags first, then rebuild the template once (the property setters rebuild it each time).
        object.__setattr__(tokenizer, "_add_bos_token", add_bos)
        object.__setattr__(tokenizer, "_add_eos_token", False)
        update()
    return tokenizer


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    add_bos: bool,
    pad_to_max_length: bool = False,
    split_special_tokens: bool = True,
) -> dict[str, torch.Tensor]:
    """Encode texts as a left-padded batch: ``input_ids`` and ``attention_mask`` (int64 tensors).

    BOS comes first iff ``add_bos`` whatever the tokenizer's post-processor does, EOS is never appended, the text is
    truncated (on the tokenizer's ``truncation_side``) so that BOS + text fits ``max_length``, and rows are padded
    to the longest row or to ``max_length``. Special-token strings inside the texts are encoded as plain text
    (``split_special_tokens``), so a passage containing "</s>" cannot inject control tokens.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("tokenize: no texts")
    room = max_length - int(add_bos)
    if room < 1:
        raise SettingError(f"max_length {max_length} leaves no room for text (add_bos={add_bos}); use at least 2")
    bos_id = tokenizer.bos_token_id
    if add_bos and bos_id is None:
        raise ConfigError(
            f"encoder.add_bos is true but tokenizer {type(tokenizer).__name__} has no BOS token; set "
            "encoder.add_bos=false"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad or eos token; call prepare_for_retrieval")
    encoded = tokenizer(
        texts,
        add_special_tokens=False,
        truncation=True,
        max_length=room,
        split_special_tokens=split_special_tokens,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    rows = [([bos_id] if add_bos else []) + list(ids) for ids in encoded]
    for index, row in enumerate(rows):
        if not row:
            raise DataFormatError(
                f"tokenize: text {index} encodes to no tokens (an empty text?) and add_bos is false: nothing to "
                "encode; drop empty texts or set encoder.add_bos=true"
            )
    width = max_length if pad_to_max_length else max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, width - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
