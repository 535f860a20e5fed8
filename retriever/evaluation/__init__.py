"""Retrieval evaluation: protocols, qrels, metrics with trec_eval's ranking (ranx) and significance tests."""

from retriever.evaluation.command import evaluate_command, format_summary
from retriever.evaluation.metrics import (
    Alignment,
    EvaluationError,
    EvaluationResult,
    align_run,
    compare_runs,
    evaluate_detailed,
    evaluate_run,
)
from retriever.evaluation.protocols import (
    BEIR_13_DATASETS,
    PROTOCOLS,
    EvaluationProtocol,
    beir_mean,
    get_protocol,
    protocol_for_dataset,
)
from retriever.evaluation.qrels import load_qrels, qrels_from_ir_datasets

__all__ = [
    "BEIR_13_DATASETS",
    "PROTOCOLS",
    "Alignment",
    "EvaluationError",
    "EvaluationProtocol",
    "EvaluationResult",
    "align_run",
    "beir_mean",
    "compare_runs",
    "evaluate_command",
    "evaluate_detailed",
    "evaluate_run",
    "format_summary",
    "get_protocol",
    "load_qrels",
    "protocol_for_dataset",
    "qrels_from_ir_datasets",
]
