"""One-command evaluation of an encoder: encode the corpus, index it, encode the queries, search, evaluate.

For each dataset id: the protocol comes from the id (or is given), the corpus is encoded once per encoder and
corpus (datasets sharing a corpus, such as MS MARCO dev and TREC DL, share its encodings and index), the run is
written as a TREC file and the metrics as JSON under `out_dir`.

Search depth: `eval.top_k` documents per query, by default the protocol's depth (1000 for MS MARCO and TREC DL,
100 for BEIR). The protocol fixes what is evaluated: a deeper `top_k` only makes the run files longer (metrics are
computed on the protocol's depth), and a `top_k` below the deepest metric cutoff (e.g. recall@1000) is an error.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.config import ConfigError, ExperimentConfig
from retriever.outputs import write_text_atomic
from retriever.records import safe_name

if TYPE_CHECKING:
    from retriever.evaluation import EvaluationProtocol

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


def _corpus_key(dataset_id: str) -> str:
    """The dataset that provides the docs (dev/small and TREC DL share msmarco-passage's)."""
    import ir_datasets

    try:
        return ir_datasets.docs_parent_id(dataset_id)
    except Exception:  # local providers without an ir_datasets registration
        return dataset_id


def metric_depth(proto: EvaluationProtocol) -> int:
    """Documents per query the protocol's metrics look at: their deepest @cutoff (the depth for a metric without
    one)."""
    cutoffs = [re.search(r"@(\d+)", name) for name in proto.metrics]
    return max(int(found.group(1)) if found else proto.depth for found in cutoffs)


def search_depth(proto: EvaluationProtocol, top_k: int | None, dataset: str) -> int:
    """Documents to retrieve per query for `dataset`: `eval.top_k`, or the protocol's depth when unset."""
    if top_k is None:
        return proto.depth
    needed = metric_depth(proto)
    if top_k < needed:
        raise ConfigError(
            f"eval.top_k={top_k} is too shallow for {dataset}: its {proto.name} protocol evaluates "
            f"{', '.join(proto.metrics)}, which need the top {needed}; set eval.top_k >= {needed} or leave it unset "
            f"(the protocol's depth, {proto.depth})"
        )
    return top_k


def _judged_queries(source: Any, qrels: dict[str, dict[str, int]]) -> Iterator[tuple[str, str]]:
    for qid, text in source.queries():
        if qid in qrels:
            yield qid, text


class _Encoder:
    """The evaluated encoder, read once: its `EncoderInfo` (one fingerprint) and, on the first in-process encoding,
    its weights, reused for every corpus and query set that is not encoded yet."""

    def __init__(self, encoder_dir: Path, cfg: ExperimentConfig) -> None:
        from retriever.encoding import EncoderInfo

        self.info = EncoderInfo.read(encoder_dir)
        self.cfg = cfg
        self._loaded: Any = None

    def encode(self, texts: Any, out_dir: Path, *, kind: str, max_length: int) -> None:
        """Encode in this process, or with a Ray Data actor pool when `eval.encode_actors > 0`; a folder already
        holding this encoder's finished encoding (the folder is keyed by its fingerprint) is kept."""
        from retriever.encoding import LoadedEncoder, encode_corpus_auto, finished_encoding, load_inference_encoder

        done = finished_encoding(out_dir)
        if done is not None and done.encoder_sha256 == self.info.fingerprint:
            return
        settings = self.cfg.eval
        encoder: Any = self.info
        if settings.encode_actors <= 0:
            if self._loaded is None:
                self._loaded = LoadedEncoder(self.info, load_inference_encoder(self.info.path))
            encoder = self._loaded
        encode_corpus_auto(
            encoder,
            texts,
            out_dir,
            num_actors=settings.encode_actors,
            cpus_per_actor=settings.cpus_per_actor,
            gpus_per_actor=settings.gpus_per_actor,
            kind=kind,
            batch_size=settings.batch_size,
            max_length=max_length,
            overwrite=True,
        )


def corpus_folder(out_dir: Path, source_id: str, passage_length: int, fingerprint: str) -> Path:
    """Where the passages of `source_id`, encoded by the encoder with this fingerprint, and their index live."""
    return out_dir / "corpus" / f"{safe_name(_corpus_key(source_id))}-p{passage_length}-{fingerprint[:16]}"


def _corpus_index(
    encoder: _Encoder, source: Any, source_id: str, cfg: ExperimentConfig, out_dir: Path, passage_length: int
) -> Path:
    """The corpus folder of `source_id` under `out_dir` with its encodings and index, each made when missing."""
    from retriever.index import build_shards, index_complete

    corpus = corpus_folder(out_dir, source_id, passage_length, encoder.info.fingerprint)
    encoder.encode(source.docs(), corpus / "encodings", kind="passage", max_length=passage_length)
    if not index_complete(corpus / "index"):  # absent, or a build that was interrupted
        index_kind = cfg.eval.sparse_index if encoder.info.paradigm == "sparse" else cfg.eval.dense_index
        build_shards(corpus / "encodings", corpus / "index", cfg.eval.num_shards, index_kind, overwrite=True)
    return corpus


def passage_tokens(dataset: str, cfg: ExperimentConfig) -> int:
    """Passage tokens encoded for `dataset`: `eval.passage_max_length`, else its protocol's."""
    from retriever.evaluation import protocol_for_dataset

    return cfg.eval.passage_max_length or protocol_for_dataset(dataset).passage_max_length


def corpus_index(
    encoder_dir: str | Path, dataset: str, cfg: ExperimentConfig, out_dir: str | Path, *, reuse: Sequence[Path] = ()
) -> Path:
    """The index of `dataset`'s passages encoded by the encoder in `encoder_dir`: found complete under one of the
    `reuse` folders or `out_dir` (e.g. the folder of an earlier evaluation), else encoded and built under `out_dir`.
    The index is checked against the encoder's fingerprint when it is opened."""
    from retriever.data.catalog import resolve_dataset
    from retriever.data.sources import load_source
    from retriever.index import index_complete

    encoder = _Encoder(Path(encoder_dir), cfg)
    source_id = resolve_dataset(dataset, cfg)
    length = passage_tokens(dataset, cfg)
    for folder in [*reuse, Path(out_dir)]:
        found = corpus_folder(Path(folder), source_id, length, encoder.info.fingerprint) / "index"
        if index_complete(found):
            return found
    return _corpus_index(encoder, load_source(source_id), source_id, cfg, Path(out_dir), length) / "index"


def evaluate_encoder(
    encoder_dir: str | Path,
    datasets: list[str],
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    protocol: str | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics per dataset of the encoder in `encoder_dir` (also written to `out_dir/metrics.json`); each dataset is
    searched `search_depth` deep (checked for every dataset before anything is encoded)."""
    from retriever.data.catalog import resolve_dataset
    from retriever.data.sources import load_source
    from retriever.evaluation import evaluate_detailed, get_protocol, protocol_for_dataset
    from retriever.index import search_to_run

    protocols = {d: get_protocol(protocol) if protocol else protocol_for_dataset(d) for d in datasets}
    depths = {d: search_depth(proto, cfg.eval.top_k, d) for d, proto in protocols.items()}
    encoder_dir = Path(encoder_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = _Encoder(encoder_dir, cfg)
    fingerprint = encoder.info.fingerprint[:16]
    results: dict[str, dict[str, float]] = {}
    summary: dict[str, Any] = {"encoder": str(encoder_dir), "fingerprint": fingerprint, "datasets": {}}
    for dataset in datasets:
        proto = protocols[dataset]
        source_id = resolve_dataset(dataset, cfg)
        source = load_source(source_id)
        qrels = source.qrels()
        query_length = cfg.eval.query_max_length or proto.query_max_length
        passage_length = cfg.eval.passage_max_length or proto.passage_max_length
        corpus = _corpus_index(encoder, source, source_id, cfg, out_dir, passage_length)
        where = out_dir / safe_name(dataset)
        queries = where / f"queries-q{query_length}-{fingerprint}"
        encoder.encode(_judged_queries(source, qrels), queries, kind="query", max_length=query_length)
        run_file = where / "run.trec"
        run = search_to_run(
            corpus / "index",
            queries,
            depths[dataset],
            output=run_file,
            tag=safe_name(encoder_dir.name),
            overwrite=True,
        )
        result = evaluate_detailed(run, qrels, proto, run_name=dataset)
        results[dataset] = {name: float(value) for name, value in result.metrics.items()}
        summary["datasets"][dataset] = {
            "protocol": proto.name,
            "depth": depths[dataset],
            "metrics": results[dataset],
            "run": str(run_file),
            **{k: v for k, v in result.summary().items() if k not in ("metrics", "protocol")},
        }
        log.info("%s: %s", dataset, results[dataset])
    if len([d for d in results if d.startswith("beir/")]) > 1:
        from retriever.evaluation import beir_mean

        summary["beir_mean"] = beir_mean({d: m for d, m in results.items() if d.startswith("beir/")})
    write_text_atomic(out_dir / METRICS_FILE, json.dumps(summary, indent=2) + "\n")
    return results
