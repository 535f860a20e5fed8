"""The query-side half of serving, without Ray: encoders loaded by model name, texts encoded in batches, term ids
turned into readable terms."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retriever.encoding.batches import Batch, Paradigm, make_batch

if TYPE_CHECKING:  # index shards import this module too: torch is imported only where an encoder is loaded
    from retriever.models.encoders import TextKind

Encoded = np.ndarray | list[tuple[np.ndarray, np.ndarray]]  # dense: float32 [n, dim]; sparse: (ids, weights) per text


@dataclass
class ServedEncoder:
    """One encoder loaded for inference, with what the service needs to know about it."""

    name: str
    path: Path
    paradigm: Paradigm
    size: int  # dense: dimension; sparse: vocabulary size
    fingerprint: str
    module: Any  # RetrievalEncoder
    query_max_length: int | None = None
    _terms: dict[int, str] = field(default_factory=dict)

    @classmethod
    def load(cls, name: str, encoder_dir: str | Path, query_max_length: int | None = None) -> ServedEncoder:
        from retriever.encoding.encoder import LoadedEncoder

        loaded = LoadedEncoder.load(encoder_dir)
        info = loaded.info
        return cls(name, info.path, info.paradigm, info.dimension, info.fingerprint, loaded.module, query_max_length)

    def encode(self, texts: Sequence[str], kind: TextKind = "query") -> Encoded:
        """Texts in input order, batched by length (see `encode_texts`); queries at the configured length."""
        from retriever.encoding.engine import encode_texts

        max_length = self.query_max_length if kind == "query" else None
        # One stream: a server runs many requests at once, each already a batch; splitting threads per batch
        # would only add contention.
        return encode_texts(self.module, list(texts), kind, batch_size=64, max_length=max_length, num_streams=1)

    def term_texts(self, term_ids: Sequence[int]) -> list[str]:
        """Readable text of vocabulary ids (decoded one by one, so byte-level BPE shows " word" as "word")."""
        tokenizer = self.module.tokenizer
        out = []
        for term in term_ids:
            text = self._terms.get(term)
            if text is None:
                text = tokenizer.decode([int(term)]).strip() or tokenizer.convert_ids_to_tokens(int(term))
                self._terms[term] = text
            out.append(text)
        return out


def as_batch(encoded: Encoded, paradigm: Paradigm, size: int) -> Batch:
    """Encoder output as a query batch for the index (ids are row numbers)."""
    count = len(encoded)
    return make_batch([str(i) for i in range(count)], encoded if paradigm == "sparse" else np.asarray(encoded), size)
