"""`retriever evaluate`: a TREC run file against qrels (a file or an ir_datasets id), printed as text or JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from retriever.errors import SettingError
from retriever.evaluation.metrics import evaluate_detailed
from retriever.evaluation.protocols import PROTOCOLS, get_protocol, protocol_for_dataset
from retriever.evaluation.qrels import qrels_from_ir_datasets
from retriever.trec import read_qrels, read_run


def evaluate_command(
    run_path: str | Path,
    qrels_or_dataset_id: str | Path,
    protocol: str | None = None,
    as_json: bool = False,
    out: IO[str] | None = None,
) -> dict[str, object]:
    """``retriever evaluate``: evaluate a TREC run file against a qrels file or a dataset id.

    ``protocol`` defaults to the dataset's protocol (``protocol_for_dataset``), which needs an ir_datasets id.
    Prints the result to ``out`` (stdout by default) as JSON or as aligned text and returns it as a dict.
    """
    source = str(qrels_or_dataset_id)
    if Path(source).is_dir():
        raise IsADirectoryError(f"{source}: is a folder, not a qrels file; pass a TREC qrels file or a dataset id")
    is_file = Path(source).is_file()
    if protocol is None:
        if is_file:
            raise SettingError(
                f"{source} is a qrels file, so the protocol cannot be inferred; pass one of: {', '.join(PROTOCOLS)}"
            )
        protocol = protocol_for_dataset(source).name
    proto = get_protocol(protocol)
    run = read_run(run_path)  # before the qrels: a bad run file fails without touching a dataset
    qrels = read_qrels(source) if is_file else qrels_from_ir_datasets(source)
    result = evaluate_detailed(run, qrels, proto, run_name=str(run_path))
    summary = {"run": str(run_path), "qrels": source, **result.summary()}
    stream = out if out is not None else sys.stdout
    if as_json:
        stream.write(json.dumps(summary, indent=2) + "\n")
    else:
        stream.write(format_summary(summary))
    return summary


def format_summary(summary: Mapping[str, object]) -> str:
    """Human-readable text of an ``evaluate_command`` result."""
    metrics: Mapping[str, float] = summary["metrics"]  # type: ignore[assignment]
    width = max(len(m) for m in metrics)
    lines = [f"run: {summary['run']}", f"qrels: {summary['qrels']}", f"protocol: {summary['protocol']}"]
    lines += [f"  {m:<{width}}  {float(v):.4f}" for m, v in metrics.items()]
    lines.append(
        f"queries evaluated: {summary['queries_evaluated']} (missing from run, scored 0: "
        f"{summary['queries_missing_from_run']}; run queries without qrels, dropped: "
        f"{summary['run_queries_without_qrels']})"
    )
    return "\n".join(lines) + "\n"
