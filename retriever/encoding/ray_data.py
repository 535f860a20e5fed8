"""Encode a parquet corpus on a Ray Data actor pool into an encodings folder (the Ray wrapper of the engine)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from retriever.encoding.batches import make_batch
from retriever.encoding.encoder import EncoderInfo, load_inference_encoder
from retriever.encoding.engine import check_batching, encode_texts
from retriever.encoding.inputs import check_corpus_columns, corpus_files, parquet_bytes, parquet_rows
from retriever.encoding.run import EncodingResult, EncodingRun, empty_input, encoder_info
from retriever.encoding.store import batch_table
from retriever.errors import SettingError
from retriever.models.encoders import TextKind

# Ray inputs up to this size are repartitioned so that every actor gets work.
SMALL_INPUT_BYTES = 256 * 2**20


class EncoderActor:
    """Ray Data ``map_batches`` callable: loads the encoder once per actor and encodes batches of rows
    (``doc_id``, ``text``) into the encodings format (a pyarrow table, so list columns keep their exact types).

    ``settings`` are the keyword arguments of `encode_texts` (batch_size, max_length, prune_top_k,
    max_batch_tokens, num_streams); ``use_gpu`` puts the encoder on CUDA when the actor has it."""

    def __init__(
        self, encoder_dir: str, kind: TextKind = "passage", *, use_gpu: bool = False, **settings: Any
    ) -> None:
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.encoder = load_inference_encoder(encoder_dir, device)
        self.kind = kind
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = [str(x) for x in batch["doc_id"].tolist()]
        texts = batch["text"].tolist()
        for position, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"document {ids[position]!r}: text is {type(text).__name__}, expected str")
        encoded = encode_texts(self.encoder, texts, self.kind, **self.settings)
        return batch_table(make_batch(ids, encoded, self.encoder.dimension))


def encode_corpus_ray(
    encoder: str | Path | EncoderInfo,
    input_parquet: str | Path,
    out_dir: str | Path,
    *,
    kind: TextKind = "passage",
    max_length: int | None = None,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    batch_size: int = 32,
    prune_top_k: int | None = None,
    max_batch_tokens: int | None = None,
    rows_per_call: int = 2048,
    num_blocks: int | None = None,
    shard_rows: int = 100_000,
    num_streams: int | None = None,
    overwrite: bool = False,
) -> EncodingResult:
    """Encode a parquet corpus (columns doc_id, text; see `docs_to_parquet`) on Ray Data and write an encodings
    folder: ``read_parquet`` → ``map_batches(EncoderActor, ActorPoolStrategy(size=num_actors))`` →
    ``write_parquet`` (files of at most ``shard_rows`` rows) → ``encoding.json``.

    Each actor reserves ``cpus_per_actor`` (fractional is fine) and ``gpus_per_actor``; it receives
    ``rows_per_call`` rows at a time and sorts them by token length before batching. ``num_blocks`` (default: enough
    for every actor to get work) splits the input. Uses the current Ray cluster (or starts a local one).
    """
    import ray

    files = corpus_files(Path(input_parquet))
    rows = parquet_rows(files)
    for path in files:
        check_corpus_columns(path, pq.ParquetFile(path).schema_arrow.names)
    if num_actors <= 0 or cpus_per_actor < 0 or gpus_per_actor < 0:
        raise SettingError(
            f"need num_actors >= 1 and non-negative resources, got num_actors={num_actors}, "
            f"cpus_per_actor={cpus_per_actor}, gpus_per_actor={gpus_per_actor}"
        )
    check_batching(batch_size, max_batch_tokens, num_streams)
    if rows == 0:
        raise empty_input(kind, out_dir)
    # The driver reads encoder.json and hashes the files only; the weights are loaded by the actors.
    info = encoder_info(encoder)
    with EncodingRun.open(info, out_dir, kind, max_length, prune_top_k, shard_rows, overwrite) as run:
        blocks = num_blocks or max(2 * num_actors, math.ceil(rows / max(1, rows_per_call * 4)))
        dataset = ray.data.read_parquet(
            [str(f) for f in files], columns=["doc_id", "text"], override_num_blocks=blocks
        )
        if len(files) < blocks and parquet_bytes(files) <= SMALL_INPUT_BYTES:
            # read_parquet makes one block per file below Ray's block size, which would leave all but one actor idle;
            # a small input is cheap to split (a large one is split into ~128 MB blocks while it is read).
            dataset = dataset.repartition(blocks)
        encoded = dataset.map_batches(
            EncoderActor,
            batch_size=rows_per_call,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor or None,
            fn_constructor_kwargs={
                "encoder_dir": str(run.encoder.path),
                "kind": kind,
                "batch_size": batch_size,
                "max_length": run.max_length,
                "prune_top_k": prune_top_k,
                "max_batch_tokens": max_batch_tokens,
                "num_streams": num_streams,
                "use_gpu": gpus_per_actor > 0,
            },
        )
        encoded.write_parquet(str(run.work), max_rows_per_file=shard_rows)
        written = sorted(run.work.glob("*.parquet"))
        count = parquet_rows(written) if written else 0
        if count != rows:
            raise RuntimeError(
                f"{run.out}: Ray wrote {count} encoded rows for {rows} input rows; the run is incomplete"
            )
        result = run.finish(run.writer(), files=written)
    return result
