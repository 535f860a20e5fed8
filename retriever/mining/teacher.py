"""The cross-encoder teacher: scores (query, passage) pairs with a `transformers` sequence-classification model,
in batches of pairs of similar token length (little padding), on a GPU when there is one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retriever.errors import SettingError, UserError


class TeacherUnavailableError(UserError, FileNotFoundError):
    """The teacher model is neither a local folder nor in the Hugging Face cache."""


class CrossEncoderTeacher:
    """One logit per pair (``num_labels == 1``, as MS MARCO cross-encoders); pairs are truncated longest-first to
    ``max_length`` tokens, as sentence-transformers' ``CrossEncoder`` does."""

    def __init__(
        self,
        model: str | Path,
        *,
        max_length: int = 256,
        batch_size: int = 64,
        device: str | None = None,
        torch_threads: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.max_length, self.batch_size = max_length, batch_size
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model))
            loaded = AutoModelForSequenceClassification.from_pretrained(str(model))
        except OSError as exc:
            raise TeacherUnavailableError(
                f"teacher.model {str(model)!r}: cannot load it ({' '.join(str(exc).split())[:200]}); give a local "
                "folder, or download the model on a machine with internet (`hf download <id>`) and copy the cache"
            ) from None
        if loaded.config.num_labels != 1:
            raise SettingError(
                f"teacher.model {str(model)!r} has {loaded.config.num_labels} output labels; a teacher gives one "
                "relevance logit per pair (a cross-encoder such as cross-encoder/ms-marco-MiniLM-L6-v2)"
            )
        self.model = loaded.eval().to(self.device)

    def score(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """float32 logits of the pairs (``queries[i]``, ``passages[i]``), in input order."""
        import torch

        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries for {len(passages)} passages; give one query per passage")
        out = np.empty(len(queries), dtype=np.float32)
        if not len(queries):
            return out
        encoded = self.tokenizer(
            list(queries), list(passages), truncation=True, max_length=self.max_length, padding=False
        )
        lengths = np.fromiter((len(ids) for ids in encoded["input_ids"]), dtype=np.int64, count=len(queries))
        order = np.argsort(-lengths, kind="stable")  # longest first: a too-large batch fails at once
        keys = list(encoded.keys())
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                batch = self.tokenizer.pad(
                    {key: [encoded[key][i] for i in rows] for key in keys}, return_tensors="pt"
                ).to(self.device)
                logits = self.model(**batch).logits
                out[rows] = logits[:, 0].float().cpu().numpy()
        return out


def build_tiny_cross_encoder(
    out_dir: str | Path, texts: Sequence[str], *, vocab_size: int = 2000, seed: int = 0, hidden_size: int = 32
) -> Path:
    """A small randomly initialised BERT cross-encoder with a word-piece vocabulary of the most frequent words of
    ``texts``, saved as a `transformers` folder: a teacher for offline tests and benchmarks (its scores carry no
    relevance knowledge)."""
    import collections
    import re

    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = collections.Counter(w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower()))
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [w for w, _ in counts.most_common(max(0, vocab_size - len(special)))]
    (out / "vocab.txt").write_text("\n".join([*special, *words]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(special) + len(words),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=512,
        num_labels=1,
        initializer_range=0.3,  # spread-out scores (the default 0.02 gives nearly one value for every pair)
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


__all__ = ["CrossEncoderTeacher", "TeacherUnavailableError", "build_tiny_cross_encoder"]
