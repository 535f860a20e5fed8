"""First-stage candidates for mining: one class per `first_stage.kind`, each turning a batch of queries into ranked
candidate ids. They run in one process or as Ray Data actors (`retriever.mining.ray_data`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from retriever.bm25 import Bm25Index
from retriever.data.examples import read_run
from retriever.registry import Registry

Ranked = list[tuple[str, float]]


class FirstStage(Protocol):
    def retrieve(self, query_ids: Sequence[str], texts: Sequence[str], k: int) -> list[Ranked]:
        """The top ``k`` (doc id, score) of every query, best first."""
        ...


FIRST_STAGES: Registry[type] = Registry("first stage")


def candidate_pool(ranked_ids: Iterable[str], positives: Iterable[str], pool_size: int) -> list[str]:
    """The top ``pool_size`` of a ranking with the judged positives removed (the pool can be shorter)."""
    judged = set(positives)
    return [docid for docid in itertools.islice(ranked_ids, pool_size) if docid not in judged]


@FIRST_STAGES.register("bm25")
class Bm25Candidates:
    """BM25 over a saved index (`Bm25Index.save`), memory-mapped so every actor shares the page cache."""

    def __init__(self, index: str | Path) -> None:
        # The driver verified the checksums before the job started; actors only map the files.
        self.index = Bm25Index.load(index, mmap=True, verify=False)

    def retrieve(self, query_ids: Sequence[str], texts: Sequence[str], k: int) -> list[Ranked]:
        return [list(self.index.top_k(text, k).items()) for text in texts]


@FIRST_STAGES.register("encoder")
class EncoderCandidates:
    """A trained encoder and its index folder: encode the queries, search every shard, merge the top k."""

    def __init__(self, encoder: str | Path, index: str | Path, *, query_max_length: int | None = None) -> None:
        from retriever.encoding.encoder import EncoderInfo, load_inference_encoder
        from retriever.index.shards import open_shards

        self.encoder = load_inference_encoder(encoder)  # on the GPU when the actor has one
        info = EncoderInfo.read(encoder)
        self.shards = open_shards(index, expected_encoder_sha256=info.fingerprint)
        self.max_length = query_max_length or info.max_lengths["query"]

    def retrieve(self, query_ids: Sequence[str], texts: Sequence[str], k: int) -> list[Ranked]:
        from retriever.encoding.batches import make_batch
        from retriever.encoding.engine import encode_texts
        from retriever.index.shards import search_shards

        if not texts:
            return []
        keys = [str(i) for i in range(len(texts))]  # query ids of a batch may repeat across datasets: key by position
        encoded = encode_texts(self.encoder, list(texts), "query", max_length=self.max_length)
        run = search_shards(self.shards, make_batch(keys, encoded, self.encoder.dimension), k)
        return [list(run[key].items()) for key in keys]


class RunCandidates:
    """A TREC run file read once by the driver; its candidates travel with the queries (`kind: run`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.run = read_run(self.path)

    def ranked(self, query_id: str) -> Iterator[tuple[str, str]]:
        """(doc id, ``file:line``) of the query's candidates in rank order."""
        yield from self.run.get(query_id, [])


__all__ = [
    "FIRST_STAGES",
    "Bm25Candidates",
    "candidate_pool",
    "EncoderCandidates",
    "FirstStage",
    "Ranked",
    "RunCandidates",
]
