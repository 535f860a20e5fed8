"""Training batches: rows of training examples → tokenized queries, passages and aligned teacher scores.

Rows are the columns of the training-examples parquet (see `retriever.data.examples`), as lists or numpy arrays
(what Ray Data's `iter_batches(batch_format="numpy")` yields). Tokenization happens here, in the worker, because
string columns cannot travel through `iter_torch_batches`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from retriever.config import ConfigError
from retriever.data.examples import sample_negatives
from retriever.errors import DataFormatError
from retriever.models.tokenizers import tokenize

if TYPE_CHECKING:
    from retriever.data.sources import DocTexts


@dataclass
class TrainingBatch:
    """One step's inputs for `B` queries with `1 + n` passages each (positive first)."""

    queries: dict[str, torch.Tensor]  # input_ids / attention_mask [B, Lq]
    passages: dict[str, torch.Tensor]  # [B * (1 + n), Lp], grouped by query
    teacher: torch.Tensor | None  # [B, 1 + n], aligned with passages
    group_size: int  # 1 + n

    @property
    def num_queries(self) -> int:
        return int(self.queries["input_ids"].shape[0])

    def to(self, device: torch.device | str) -> TrainingBatch:
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        teacher = self.teacher.to(device) if self.teacher is not None else None
        return TrainingBatch(move(self.queries), move(self.passages), teacher, self.group_size)


def _column(rows: Mapping[str, Any], name: str) -> list[Any]:
    if name not in rows:
        raise KeyError(f"training examples have no column {name!r} (columns: {', '.join(rows)})")
    return list(rows[name])


@dataclass
class TrainingCollator:
    """Samples `num_negatives` negatives per row for the current epoch and tokenizes everything.

    Negatives are drawn without replacement, seeded by (seed, epoch, query id, positive id), so every epoch sees a
    different subset and a resumed run sees the same one; teacher scores follow their passages.
    """

    tokenizer: Any
    _: KW_ONLY
    num_negatives: int
    query_max_length: int
    passage_max_length: int
    add_bos: bool
    pad_to_max_length: bool
    need_teacher: bool
    seed: int
    docs: DocTexts | None = None
    epoch: int = field(default=0, init=False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _texts(self, rows: Mapping[str, Any], text_column: str, id_column: str) -> list[Any]:
        if text_column in rows:
            return _column(rows, text_column)
        if self.docs is None:
            raise ConfigError(
                f"the training examples hold passage ids but no {text_column!r} texts; set data.docs to the dataset "
                "id whose docs give the texts"
            )
        ids = _column(rows, id_column)
        if id_column == "positive_id":
            return [self.docs[i] for i in ids]
        return [[self.docs[i] for i in group] for group in ids]

    def __call__(self, rows: Mapping[str, Any]) -> TrainingBatch:
        query_ids = _column(rows, "query_id")
        positive_ids = _column(rows, "positive_id")
        negative_ids = _column(rows, "negative_ids")
        queries = [str(q) for q in _column(rows, "query")]
        positives = self._texts(rows, "positive", "positive_id")
        negatives = self._texts(rows, "negatives", "negative_ids")
        teacher_pos = list(rows["teacher_pos"]) if "teacher_pos" in rows else [None] * len(queries)
        teacher_negs = list(rows["teacher_negs"]) if "teacher_negs" in rows else [None] * len(queries)

        passages: list[str] = []
        teacher: list[list[float]] = []
        for row, qid in enumerate(query_ids):
            key = f"{qid}\x1f{positive_ids[row]}"
            picks = sample_negatives(list(negative_ids[row]), self.num_negatives, self.epoch, self.seed, key)
            passages.append(str(positives[row]))
            passages.extend(str(negatives[row][i]) for i in picks)
            if self.need_teacher:
                if teacher_pos[row] is None or teacher_negs[row] is None:
                    raise DataFormatError(
                        f"example {qid!r}/{positive_ids[row]!r} has no teacher scores, but the loss distills; "
                        "build the examples with a teacher file"
                    )
                scores = np.asarray(teacher_negs[row], dtype=np.float32)
                teacher.append([float(teacher_pos[row]), *(float(scores[i]) for i in picks)])

        q = tokenize(self.tokenizer, queries, self.query_max_length, self.add_bos, self.pad_to_max_length)
        p = tokenize(self.tokenizer, passages, self.passage_max_length, self.add_bos, self.pad_to_max_length)
        teacher_tensor = torch.tensor(teacher, dtype=torch.float32) if self.need_teacher else None
        return TrainingBatch(q, p, teacher_tensor, 1 + self.num_negatives)


def rows_from_table(table: Any, start: int, stop: int) -> dict[str, Sequence[Any]]:
    """Rows [start, stop) of a pyarrow table as column lists (the collator's input)."""
    return {name: table.column(name).slice(start, stop - start).to_pylist() for name in table.column_names}
