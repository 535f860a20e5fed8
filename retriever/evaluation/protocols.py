"""Evaluation protocols: which metrics, how deep and with which encoding lengths each benchmark is evaluated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from retriever.data.sources import BEIR_13, require_known_dataset
from retriever.errors import UnknownNameError
from retriever.registry import Registry


@dataclass(frozen=True)
class EvaluationProtocol:
    """How a benchmark is evaluated: ranx metric names, retrieval depth and default encoding lengths.

    ``datasets`` are the ir_datasets ids that use this protocol by default; an entry ending in ``/`` is a prefix.
    ``ignore_identical_ids`` drops documents whose id equals the query id before scoring (the official BEIR
    evaluation does this, which matters for ArguAna and Quora where queries are also corpus documents).
    """

    name: str
    metrics: tuple[str, ...]
    depth: int
    query_max_length: int
    passage_max_length: int
    datasets: tuple[str, ...] = ()
    ignore_identical_ids: bool = False
    description: str = ""

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]


PROTOCOLS: Registry[EvaluationProtocol] = Registry("evaluation protocol")

# The 13 public BEIR test sets averaged in the paper, as ir_datasets ids (Touché is BEIR's v2 of the qrels).
BEIR_13_DATASETS: tuple[str, ...] = tuple(BEIR_13.values())


# The MS MARCO passage benchmarks share the top-1000 depth and the paper's 64/192-token encoding lengths.
_MSMARCO = dict(depth=1000, query_max_length=64, passage_max_length=192)

for _protocol in (
    EvaluationProtocol(
        "msmarco-dev",
        ("mrr@10", "recall@1000"),
        **_MSMARCO,
        datasets=("msmarco-passage/dev/small",),
        description="MS MARCO passage dev/small: MRR@10 and Recall@1000 on the top-1000",
    ),
    # nDCG uses the graded labels; the binary metrics count grade >= 2 as relevant (TREC DL convention).
    EvaluationProtocol(
        "trec-dl",
        ("ndcg@10", "mrr@10-l2", "recall@1000-l2"),
        **_MSMARCO,
        datasets=("msmarco-passage/trec-dl-2019/judged", "msmarco-passage/trec-dl-2020/judged"),
        description="TREC DL 2019/2020 passage: nDCG@10 (graded), MRR@10 and Recall@1000 at relevance level 2",
    ),
    EvaluationProtocol(
        "synthetic",
        ("ndcg@10", "mrr@10", "recall@100"),
        depth=100,
        query_max_length=64,
        passage_max_length=128,
        datasets=("synthetic/",),
        description="the offline synthetic benchmark: nDCG@10 (graded), MRR@10 and Recall@100 on the top-100",
    ),
    EvaluationProtocol(
        "beir",
        ("ndcg@10", "recall@100"),
        depth=100,
        query_max_length=512,
        passage_max_length=512,
        datasets=("beir/",),
        ignore_identical_ids=True,
        description="BEIR: nDCG@10 and Recall@100 on the top-100, averaged over datasets with beir_mean",
    ),
):
    PROTOCOLS.add(_protocol.name, _protocol)


def get_protocol(protocol: str | EvaluationProtocol) -> EvaluationProtocol:
    """The protocol object for a name (unknown names fail with the list of known ones)."""
    return protocol if isinstance(protocol, EvaluationProtocol) else PROTOCOLS.get(protocol)


def protocol_for_dataset(dataset_id: str) -> EvaluationProtocol:
    """The default protocol of an ir_datasets id: exact ids first, then prefixes (``beir/...``)."""
    for _, protocol in PROTOCOLS.items():
        if dataset_id in protocol.datasets:
            return protocol
    for _, protocol in PROTOCOLS.items():
        if any(p.endswith("/") and dataset_id.startswith(p) for p in protocol.datasets):
            return protocol
    require_known_dataset(dataset_id)  # a mistyped id says so, rather than asking for a protocol
    known = "; ".join(f"{p.name} (the default of {', '.join(p.datasets)})" for _, p in PROTOCOLS.items())
    raise UnknownNameError(
        f"no default evaluation protocol for dataset {dataset_id!r}; pass --protocol (protocol=) with one of: {known}"
    )


def beir_mean(per_dataset: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over datasets (the BEIR summary number); every dataset must report the same metrics."""
    if not per_dataset:
        raise ValueError("beir_mean needs the metrics of at least one dataset")
    names = {name: set(metrics) for name, metrics in per_dataset.items()}
    first_name, first = next(iter(names.items()))
    for name, metrics in names.items():
        if metrics != first:
            raise ValueError(
                f"datasets report different metrics: {first_name!r} has {sorted(first)}, {name!r} has "
                f"{sorted(metrics)}; evaluate all datasets with the same protocol"
            )
    return {m: sum(float(per_dataset[d][m]) for d in per_dataset) / len(per_dataset) for m in per_dataset[first_name]}
