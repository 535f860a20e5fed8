"""An encoding run: checks the settings against the encoder, prepares the folder, writes `encoding.json` last."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from retriever.encoding.encoder import EncoderInfo, LoadedEncoder
from retriever.encoding.store import EncodingInfo, EncodingWriter, check_settings, prepare_out_dir
from retriever.models.encoders import TextKind

EncoderInput = str | Path | EncoderInfo | LoadedEncoder


@dataclass
class EncodingResult:
    """What an encoding run wrote: the folder, its parquet files, row count, encoding.json content, wall time."""

    out_dir: Path
    files: list[Path]
    info: EncodingInfo
    seconds: float

    @property
    def count(self) -> int:
        return self.info.count

    @property
    def texts_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else math.inf


@dataclass
class EncodingRun:
    """An encoding run in progress: its output folder and what ``encoding.json`` records of the encoder and the
    settings, whichever way (in process or on Ray) the texts are encoded."""

    out: Path
    encoder: EncoderInfo
    kind: TextKind
    max_length: int
    prune_top_k: int | None
    shard_rows: int
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(
        cls,
        encoder: EncoderInfo,
        out_dir: str | Path,
        kind: TextKind,
        max_length: int | None,
        prune_top_k: int | None,
        shard_rows: int,
        overwrite: bool,
    ) -> EncodingRun:
        """Check the settings against the encoder, then prepare the output folder: bad settings fail before
        anything in ``out_dir`` is touched."""
        check_settings(kind, encoder.paradigm, prune_top_k, encoder=str(encoder.path))
        if shard_rows <= 0:
            raise ValueError(f"shard_rows must be positive, got {shard_rows}")
        prepare_out_dir(out_dir, overwrite)
        return cls(Path(out_dir), encoder, kind, encoder.max_length(kind, max_length), prune_top_k, shard_rows)

    def writer(self) -> EncodingWriter:
        return EncodingWriter(self.out, self.encoder.paradigm, self.shard_rows)

    def finish(self, writer: EncodingWriter, files: list[Path] | None = None) -> EncodingResult:
        """Write ``encoding.json`` (last: it marks the folder complete) and describe the run."""
        info = writer.finish(
            size=self.encoder.dimension,
            encoder_path=self.encoder.path,
            encoder_sha256=self.encoder.fingerprint,
            kind=self.kind,
            max_length=self.max_length,
            prune_top_k=self.prune_top_k,
            files=files,
        )
        written = sorted(self.out / name for name in info.files)
        return EncodingResult(self.out, written, info, time.perf_counter() - self.started)


def encoder_info(encoder: EncoderInput) -> EncoderInfo:
    if isinstance(encoder, LoadedEncoder):
        return encoder.info
    return encoder if isinstance(encoder, EncoderInfo) else EncoderInfo.read(encoder)
