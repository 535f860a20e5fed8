"""Encode a corpus into an encodings folder, in this process (`encode_corpus`) or on Ray (`encode_corpus_auto`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from retriever.encoding.batches import make_batch
from retriever.encoding.encoder import LoadedEncoder, load_inference_encoder
from retriever.encoding.engine import DEFAULT_WINDOW_BATCHES, Runner, check_batching, inference
from retriever.encoding.inputs import DocsInput, docs_to_parquet, text_windows
from retriever.encoding.run import EncoderInput, EncodingResult, EncodingRun, empty_input, encoder_info
from retriever.models.encoders import TextKind

PROGRESS_LABELS = {"query": "encode queries", "passage": "encode passages"}


def encode_corpus(
    encoder: EncoderInput,
    docs: DocsInput,
    out_dir: str | Path,
    *,
    kind: TextKind = "passage",
    batch_size: int = 32,
    max_length: int | None = None,
    prune_top_k: int | None = None,
    shard_rows: int = 100_000,
    max_batch_tokens: int | None = None,
    window: int | None = None,
    num_streams: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> EncodingResult:
    """Encode a corpus in this process and write an encodings folder (`retriever.encoding.store`).

    ``encoder``: an encoder directory, its `EncoderInfo`, or a `LoadedEncoder` to encode several inputs with one
    load (``device`` is then unused). ``docs``: (doc_id, text) pairs (e.g. ``load_source(id).docs()``) or a
    parquet file / folder with columns doc_id and text. Texts are read in windows of ``window`` rows (default
    ``batch_size`` x 16), each sorted by token length and cut into batches of at most ``batch_size`` texts and
    ``max_batch_tokens`` padded tokens; the next window is read and tokenized while the current one is encoded;
    output rows keep the input order.
    ``max_length`` defaults to the encoder's setting for ``kind``.
    """
    check_batching(batch_size, max_batch_tokens, num_streams)
    total, windows = text_windows(docs, window or batch_size * DEFAULT_WINDOW_BATCHES)
    if total == 0:
        raise empty_input(kind, out_dir)
    info = encoder_info(encoder)
    with EncodingRun.open(info, out_dir, kind, max_length, prune_top_k, shard_rows, overwrite) as run:
        if isinstance(encoder, LoadedEncoder):
            loaded = encoder
        else:
            loaded = LoadedEncoder(run.encoder, load_inference_encoder(run.encoder.path, device))
        writer = run.writer()
        from tqdm.auto import tqdm

        with (
            tqdm(total=total, unit="text", desc=PROGRESS_LABELS[kind], disable=not progress) as bar,
            inference(loaded.module),
        ):
            runner = Runner(
                loaded.module,
                kind,
                batch_size=batch_size,
                max_length=run.max_length,
                max_batch_tokens=max_batch_tokens,
                prune_top_k=prune_top_k,
                num_streams=num_streams,
                on_batch=bar.update,
            )
            try:
                for ids, encoded in runner.windows(windows):
                    writer.write(make_batch(ids, encoded, run.encoder.dimension))
            finally:
                writer.close()
        result = run.finish(writer)
    return result


def encode_corpus_auto(
    encoder: EncoderInput,
    docs: DocsInput,
    out_dir: str | Path,
    *,
    num_actors: int = 0,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    **settings: Any,
) -> EncodingResult:
    """`encode_corpus` in this process when ``num_actors`` is 0, else `encode_corpus_ray` on ``num_actors`` Ray Data
    actors with the given resources. ``settings`` are keyword arguments of the chosen function (those both take:
    kind, batch_size, max_length, prune_top_k, max_batch_tokens, num_streams, shard_rows, overwrite). For Ray,
    ``docs`` that are not a parquet path are first staged (`docs_to_parquet`) as ``<out_dir>-input.parquet`` beside
    ``out_dir``."""
    if num_actors <= 0:
        return encode_corpus(encoder, docs, out_dir, **settings)
    from retriever.encoding.ray_data import encode_corpus_ray

    if not isinstance(docs, str | Path):
        out_dir = Path(out_dir)
        staged = out_dir.parent / f"{out_dir.name}-input.parquet"
        docs_to_parquet(docs, staged)
        docs = staged
    return encode_corpus_ray(
        encoder_info(encoder),
        docs,
        out_dir,
        num_actors=num_actors,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        **settings,
    )
