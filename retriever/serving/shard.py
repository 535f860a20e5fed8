"""The index side of serving, without Ray: one verified shard answering batches of encoded queries, with the
passage texts of its own documents and, for exact sparse shards, why each hit matched."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retriever.encoding.batches import SparseBatch
from retriever.errors import SettingError
from retriever.index.base import IndexShard, open_shard
from retriever.serving.encoder import Encoded, as_batch

# A hit as the shards return it: {"docid", "score", "text"?, "terms"?: [(term id, query weight x doc weight)]}
ShardHit = dict[str, Any]


class ExplainUnsupportedError(SettingError):
    """`explain` asked of an index that cannot say which terms matched."""


class ServedShard:
    """One shard folder opened through its manifest checks (and, given the encoder's fingerprint, checked to belong
    to that encoder); ``corpus`` (a dataset id) supplies the texts of this shard's documents only."""

    def __init__(
        self,
        name: str,
        directory: str | Path,
        *,
        expected_encoder_sha256: str | None = None,
        corpus: str | None = None,
    ) -> None:
        self.name = name
        self.index: IndexShard = open_shard(directory, expected_encoder_sha256=expected_encoder_sha256)
        self.texts: dict[str, str] | None = _shard_texts(corpus, self.index.doc_ids) if corpus else None
        self.warm_up()

    def warm_up(self) -> None:
        """One search now: the first compiles the index's kernels (seconds in a fresh environment), which must not
        happen inside a request's time limit."""
        manifest = self.index.manifest
        if manifest.paradigm == "sparse":
            probe: Encoded = [(np.zeros(1, dtype=np.int32), np.ones(1, dtype=np.float32))]
        else:
            probe = np.ones((1, manifest.size), dtype=np.float32)
        self.search(probe, 1, explain=self.index.kind == "exact")

    @property
    def paradigm(self) -> str:
        return self.index.paradigm

    def search(self, encoded: Encoded, k: int, *, explain: bool = False, text: bool = False) -> list[list[ShardHit]]:
        """Top-``k`` hits of each encoded query (ranked as `IndexShard.search`: score desc, ties by doc id)."""
        manifest = self.index.manifest
        batch = as_batch(encoded, manifest.paradigm, manifest.size)
        ranked = self.index.search(batch, k)
        if explain and self.index.kind != "exact":
            raise ExplainUnsupportedError(
                f"explain needs an exact sparse index; this model's index is {self.index.kind!r} "
                "(rebuild it with kind 'exact', or search without explain)"
            )
        pruned = self.index.check_queries(batch) if explain else None
        out: list[list[ShardHit]] = []
        for row, hits in enumerate(ranked):
            query_terms = pruned.row(row) if isinstance(pruned, SparseBatch) else None
            results = []
            for docid, score in hits:
                hit: ShardHit = {"docid": docid, "score": score}
                if text and self.texts is not None:
                    hit["text"] = self.texts.get(docid, "")
                if query_terms is not None:
                    hit["terms"] = self.matched_terms(query_terms, docid)
                results.append(hit)
            out.append(results)
        return out

    def matched_terms(self, query: tuple[np.ndarray, np.ndarray], docid: str) -> list[tuple[int, float]]:
        """(term id, query weight x document weight) of every query term the document holds, largest first; they
        sum to the document's score."""
        index: Any = self.index
        position = bisect.bisect_left(index.doc_ids, docid)  # doc ids are stored in sorted order
        if position == len(index.doc_ids) or index.doc_ids[position] != docid:
            return []
        matched = []
        for term, query_weight in zip(query[0].tolist(), query[1].tolist()):
            start, end = int(index.offsets[term]), int(index.offsets[term + 1])
            at = start + int(np.searchsorted(index.docs[start:end], position))
            if at < end and index.docs[at] == position:
                matched.append((term, float(query_weight) * float(index.weights[at])))
        matched.sort(key=lambda item: (-item[1], item[0]))
        return matched


def _shard_texts(corpus: str, doc_ids: Sequence[str]) -> dict[str, str]:
    """The texts of ``doc_ids`` in the dataset ``corpus`` (a shard keeps only its own documents' texts)."""
    from retriever.data.sources import load_source

    wanted = set(doc_ids)
    texts = {docid: text for docid, text in load_source(corpus).docs() if docid in wanted}
    if len(texts) < len(wanted):
        missing = sorted(wanted - texts.keys())
        raise SettingError(
            f"corpus {corpus!r} lacks {len(missing)} of this shard's documents (e.g. {missing[0]!r}); serve the "
            "index with the corpus it was built from"
        )
    return texts
