"""The encoder behind an encodings folder: what `encoding.json` records of it (read once) and its inference copy."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from retriever.encoding.batches import Paradigm
from retriever.models.encoders import EncoderFormatError, RetrievalEncoder, TextKind, load_encoder, read_encoder_meta

# Files of an encoder directory that decide its outputs (what `load_encoder` reads).
FINGERPRINT_ENTRIES = ("encoder.json", "tokenizer", "adapter", "backbone")


def encoder_fingerprint(encoder_dir: str | Path) -> str:
    """sha256 over an encoder directory's files that decide its outputs: encoder.json, tokenizer/, adapter/ and
    backbone/ (relative path, size and bytes of every file, in sorted path order). Other files are ignored."""
    root = Path(encoder_dir)
    if not (root / "encoder.json").is_file():
        raise FileNotFoundError(f"{root}: not an encoder directory (encoder.json missing)")
    files: list[Path] = []
    for entry in FINGERPRINT_ENTRIES:
        path = root / entry
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix().encode()
        digest.update(len(rel).to_bytes(8, "little") + rel + path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class EncoderInfo:
    """A saved encoder as its encodings record it: paradigm, output size, default max lengths and fingerprint.
    Built once per encoder (`EncoderInfo.read` hashes the weights) and passed to every encoding run."""

    path: Path
    paradigm: Paradigm
    dimension: int  # dense: hidden size; sparse: vocabulary size
    max_lengths: dict[str, int]
    fingerprint: str

    @classmethod
    def read(cls, encoder_dir: str | Path) -> EncoderInfo:
        """From the directory's encoder.json (no weights are loaded) and the fingerprint of its files."""
        path = Path(encoder_dir)
        meta = read_encoder_meta(path)
        try:
            paradigm = meta["paradigm"]
            settings = meta["encoder"]
            dimension = int(meta["hidden_size"] if paradigm == "dense" else meta["vocab_size"])
            lengths = {"query": int(settings["query_max_length"]), "passage": int(settings["passage_max_length"])}
        except (KeyError, TypeError, ValueError) as exc:
            where = path / "encoder.json"
            raise EncoderFormatError(f"{where}: unreadable encoder metadata ({exc!r}); re-save the encoder") from None
        return cls(path.resolve(), paradigm, dimension, lengths, encoder_fingerprint(path))

    def max_length(self, kind: TextKind, requested: int | None = None) -> int:
        return requested or self.max_lengths[kind]


def default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_inference_encoder(encoder_dir: str | Path, device: str | torch.device | None = None) -> RetrievalEncoder:
    """`load_encoder` for encoding only: LoRA adapters merged into the base weights (no adapter matmuls per layer,
    same outputs up to float rounding), eval mode, moved to ``device`` (default: CUDA when available)."""
    from peft import PeftModel

    encoder = load_encoder(encoder_dir, trainable=False)
    if isinstance(encoder.model, PeftModel):
        merged = encoder.model.merge_and_unload()
        # The encoder reaches the decoder through `lm`; both must now be the plain, merged model.
        encoder.model = merged
        encoder.lm = merged
    encoder.to(default_device(device))
    return encoder.eval()


@dataclass
class LoadedEncoder:
    """An encoder loaded once for inference with its `EncoderInfo`: pass it to `encode_corpus` to encode several
    corpora and query sets without loading or hashing it again."""

    info: EncoderInfo
    module: RetrievalEncoder

    @classmethod
    def load(cls, encoder_dir: str | Path, device: str | torch.device | None = None) -> LoadedEncoder:
        return cls(EncoderInfo.read(encoder_dir), load_inference_encoder(encoder_dir, device))
