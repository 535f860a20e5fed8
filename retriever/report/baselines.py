"""The reference rows of a sweep: BM25 and every (backbone, paradigm) encoder before retrieval training (step 0).

Each baseline is evaluated exactly as the cells are and written next to them as
``<sweep>/baselines/<id>/result.json`` (the record format `retriever.records.collect_baselines` reads) with its runs
under ``<sweep>/baselines/<id>/eval/``. A finished baseline is never evaluated again (resumed sweeps reuse it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retriever.bm25 import RUN_TAG, Bm25Index
from retriever.config import ExperimentConfig
from retriever.records import BASELINES_DIR, read_record, safe_name, write_record
from retriever.tracking import safe_metric_name

log = logging.getLogger(__name__)


def evaluate_bm25(
    dataset_id: str, cfg: ExperimentConfig, out_dir: str | Path, *, index: Bm25Index | None = None
) -> dict[str, float]:
    """BM25 on one configured dataset, resolved and evaluated as `retriever.pipeline.evaluate_encoder` does.

    The judged queries are searched to the protocol's depth; the run is written to
    ``out_dir/<safe dataset>/run.trec`` (tag ``bm25``) and the protocol's metrics are returned (ranx names).
    ``index`` reuses an index of the same corpus (datasets sharing one, such as MS MARCO dev and TREC DL).
    """
    from retriever.data.catalog import resolve_dataset
    from retriever.data.sources import load_source
    from retriever.evaluation import evaluate_detailed, protocol_for_dataset
    from retriever.outputs import atomic_file
    from retriever.trec import write_run

    proto = protocol_for_dataset(dataset_id)
    source = load_source(resolve_dataset(dataset_id, cfg))
    qrels = source.qrels()
    if index is None:
        index = Bm25Index(source.docs())
    judged = {qid: text for qid, text in source.queries() if qid in qrels}
    run = index.search(judged, proto.depth)
    with atomic_file(Path(out_dir) / safe_name(dataset_id) / "run.trec", overwrite=True, what="the BM25 run") as tmp:
        write_run(run, tmp, tag=RUN_TAG, depth=proto.depth)
    result = evaluate_detailed(run, qrels, proto, run_name=f"BM25 {dataset_id}")
    metrics = {name: float(value) for name, value in result.metrics.items()}
    log.info("BM25 %s: %s", dataset_id, metrics)
    return metrics


def step0_id(backbone: str, paradigm: str) -> str:
    return f"step0__{safe_name(backbone)}__{paradigm}"


def _finished(directory: Path) -> dict[str, Any] | None:
    record = read_record(directory)
    return record if record is not None and record.get("status") == "ok" else None


def run_bm25_baseline(cfg: ExperimentConfig, root: Path) -> dict[str, Any]:
    """BM25 (Lucene idf, k1 0.9, b 0.4, whitespace tokens) on every evaluation dataset of `cfg`."""
    directory = Path(root) / BASELINES_DIR / "bm25"
    done = _finished(directory)
    if done is not None:
        return done
    metrics = {dataset: evaluate_bm25(dataset, cfg, directory / "eval") for dataset in cfg.eval.datasets}
    record = {"kind": "bm25", "name": "BM25", "backbone": None, "paradigm": None, "loss": None}
    record |= {"parameters": None, "flops": 0, "metrics": metrics, "status": "ok"}
    return write_record(directory, record)


def run_step0_baseline(cell: ExperimentConfig, root: Path) -> dict[str, Any]:
    """The cell's encoder exactly as its training starts (same seed, same pre-trained weights), evaluated as the
    trained cells are. `cell` is any cell config of the (backbone, paradigm) pair."""
    import torch

    from retriever.flops import plan_cell
    from retriever.models.encoders import build_encoder
    from retriever.pipeline import evaluate_encoder

    backbone, paradigm = cell.backbone.name, cell.encoder.paradigm
    directory = Path(root) / BASELINES_DIR / step0_id(backbone, paradigm)
    done = _finished(directory)
    if done is not None:
        return done
    torch.manual_seed(cell.train.seed)  # as the training loop does before building the encoder
    encoder = build_encoder(cell.backbone, cell.encoder, trainable=False)
    encoder.save(directory / "encoder")
    metrics = evaluate_encoder(directory / "encoder", cell.eval.datasets, cell, directory / "eval")
    record = {
        "kind": "step0",
        "name": f"{backbone} {paradigm} step 0",
        "backbone": backbone,
        "paradigm": paradigm,
        "loss": None,
        "parameters": plan_cell(cell).total_parameters,
        "flops": 0,
        "metrics": metrics,
        "status": "ok",
    }
    return write_record(directory, record)


def run_baselines(cfg: ExperimentConfig, root: Path, cells: Sequence[ExperimentConfig]) -> list[dict[str, Any]]:
    """BM25 and one step-0 row per (backbone, paradigm) among `cells` (the sweep's cell configs)."""
    records = [run_bm25_baseline(cfg, root)]
    seen: set[tuple[str, str]] = set()
    for cell in cells:
        key = (cell.backbone.name, cell.encoder.paradigm)
        if key not in seen:
            seen.add(key)
            records.append(run_step0_baseline(cell, root))
            log.info("baseline %s: %s", records[-1]["name"], records[-1]["metrics"])
    return records


def baseline_metrics(baselines: list[dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics of the baselines: ``baseline/<id>/<safe dataset>/<metric>`` (e.g. ``baseline/bm25/
    synthetic_test/ndcg_at_10``), finished baselines only."""
    return {
        safe_metric_name(f"baseline/{record['id']}/{safe_name(dataset)}/{metric}"): float(value)
        for record in baselines
        if record.get("status", "ok") == "ok"
        for dataset, scores in (record.get("metrics") or {}).items()
        for metric, value in scores.items()
    }


__all__ = [
    "baseline_metrics",
    "evaluate_bm25",
    "run_baselines",
    "run_bm25_baseline",
    "run_step0_baseline",
    "step0_id",
]
