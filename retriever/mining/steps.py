"""The per-batch work of mining, as callables on pyarrow batches of queries: the same objects run in one process
(`workers: 0`) and as Ray Data actors (`retriever.mining.ray_data`).

A batch holds one row per query: ``shard``, ``position`` (the query's place in the plan), ``query_id``, ``query``,
``positive_ids`` and ``candidate_ids`` (a run's candidates; filled by `CandidateStep` otherwise).
`ScoreStep` adds the teacher's ``positive_scores`` and ``candidate_scores`` and, for examples with texts,
``positive_texts`` and ``candidate_texts``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from retriever.data.sources import DocTexts, load_source
from retriever.mining.first_stage import FIRST_STAGES, FirstStage, candidate_pool


class CandidateStep:
    """The first stage: the top ``pool_size`` candidates of each query, judged positives removed."""

    def __init__(self, kind: str, pool_size: int, **options: Any) -> None:
        self.first_stage: FirstStage = FIRST_STAGES.get(kind)(**options)
        self.pool_size = pool_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("query_id").to_pylist()
        texts = batch.column("query").to_pylist()
        positives = batch.column("positive_ids").to_pylist()
        ranked = self.first_stage.retrieve(ids, texts, self.pool_size)
        candidates = [
            candidate_pool((docid for docid, _ in hits), judged, self.pool_size)
            for hits, judged in zip(ranked, positives)
        ]
        position = batch.schema.get_field_index("candidate_ids")
        column = pa.array(candidates, type=pa.list_(pa.string()))
        return batch.set_column(position, "candidate_ids", column)


class ScoreStep:
    """Passage texts for every (query, positive) and (query, candidate) pair, and the teacher's scores of them."""

    def __init__(
        self, corpus: str, *, teacher: Mapping[str, Any] | None, inline_text: bool, use_gpu: bool = False
    ) -> None:
        self.texts = DocTexts(load_source(corpus).docs_store(), f"corpus {corpus!r}")
        self.inline_text = inline_text
        self.teacher = None
        if teacher is not None:
            from retriever.mining.teacher import CrossEncoderTeacher

            device = "cuda" if use_gpu else "cpu"
            self.teacher = CrossEncoderTeacher(**teacher, device=device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("query_id").to_pylist()
        queries = batch.column("query").to_pylist()
        positives = batch.column("positive_ids").to_pylist()
        candidates = batch.column("candidate_ids").to_pylist()
        needed_by = {d: f"query {qid!r}" for qid, cands in zip(ids, candidates) for d in cands}
        needed_by.update({d: f"query {qid!r} (a judged positive)" for qid, pos in zip(ids, positives) for d in pos})
        texts = self.texts.get_many([d for docs in (*positives, *candidates) for d in docs], needed_by)
        if self.teacher is not None:
            pair_queries = [q for q, pos, cands in zip(queries, positives, candidates) for _ in (*pos, *cands)]
            pair_docs = [texts[d] for pos, cands in zip(positives, candidates) for d in (*pos, *cands)]
            flat = self.teacher.score(pair_queries, pair_docs).tolist()
            positive_scores, candidate_scores, at = [], [], 0
            for pos, cands in zip(positives, candidates):
                positive_scores.append(flat[at : at + len(pos)])
                candidate_scores.append(flat[at + len(pos) : at + len(pos) + len(cands)])
                at += len(pos) + len(cands)
            batch = _with(batch, "positive_scores", positive_scores, pa.float32())
            batch = _with(batch, "candidate_scores", candidate_scores, pa.float32())
        if self.inline_text:
            batch = _with(batch, "positive_texts", [[texts[d] for d in pos] for pos in positives], pa.string())
            batch = _with(batch, "candidate_texts", [[texts[d] for d in c] for c in candidates], pa.string())
        return batch


class CandidateAndScoreStep:
    """`CandidateStep` then `ScoreStep` in one process: one actor instead of two per worker (less memory, no copy of
    the batch between them) when the teacher shares the first stage's CPUs."""

    def __init__(self, candidate: dict[str, Any], score: dict[str, Any]) -> None:
        self.steps = (CandidateStep(**candidate), ScoreStep(**score))

    def __call__(self, batch: pa.Table) -> pa.Table:
        for step in self.steps:
            batch = step(batch)
        return batch


def _with(batch: pa.Table, name: str, values: list[list[Any]], value_type: pa.DataType) -> pa.Table:
    return batch.append_column(name, pa.array(values, type=pa.list_(value_type)))


__all__ = ["CandidateAndScoreStep", "CandidateStep", "ScoreStep"]
