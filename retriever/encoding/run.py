"""An encoding run: checks the settings against the encoder, writes into a temporary sibling of the output folder,
`encoding.json` last, and renames it into place when complete."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from retriever.encoding.encoder import EncoderInfo, LoadedEncoder
from retriever.encoding.store import EncodingInfo, EncodingWriter, check_settings, is_encodings_folder
from retriever.errors import UserError
from retriever.models.encoders import TextKind
from retriever.outputs import atomic_directory

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


class EmptyInputError(UserError, ValueError):
    """Nothing to encode: an empty corpus or query set."""


def empty_input(kind: TextKind, out_dir: str | Path) -> EmptyInputError:
    texts = "corpus" if kind == "passage" else "query set"
    return EmptyInputError(
        f"{out_dir}: the {texts} to encode is empty (0 texts); check the dataset id, the input file or the filter "
        "that selects the texts"
    )


@dataclass
class EncodingRun:
    """An encoding run in progress: its output folder, the temporary folder it writes into (renamed onto ``out``
    when the run succeeds), and what ``encoding.json`` records of the encoder and the settings, whichever way (in
    process or on Ray) the texts are encoded."""

    out: Path
    work: Path
    encoder: EncoderInfo
    kind: TextKind
    max_length: int
    prune_top_k: int | None
    shard_rows: int
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        encoder: EncoderInfo,
        out_dir: str | Path,
        kind: TextKind,
        max_length: int | None,
        prune_top_k: int | None,
        shard_rows: int,
        overwrite: bool,
    ) -> Iterator[EncodingRun]:
        """Check the settings against the encoder, then hold ``out_dir``'s writer lock and yield a run writing into
        a temporary sibling: bad settings, a second writer or a failure leave an existing ``out_dir`` untouched,
        and ``overwrite`` replaces it only once the new encoding is complete."""
        check_settings(kind, encoder.paradigm, prune_top_k, encoder=str(encoder.path))
        if shard_rows <= 0:
            raise ValueError(f"shard_rows must be positive, got {shard_rows}")
        length = encoder.max_length(kind, max_length)
        with atomic_directory(
            out_dir, overwrite=overwrite, what="an encodings folder", ours=is_encodings_folder
        ) as work:
            yield cls(Path(out_dir), work, encoder, kind, length, prune_top_k, shard_rows)

    def writer(self) -> EncodingWriter:
        return EncodingWriter(self.work, self.encoder.paradigm, self.shard_rows)

    def finish(self, writer: EncodingWriter, files: list[Path] | None = None) -> EncodingResult:
        """Write ``encoding.json`` (last: it marks the folder complete) and describe the run (its files as they
        will be named once the folder is in place); an empty input is an error."""
        if (writer.count if files is None else len(files)) == 0:
            raise empty_input(self.kind, self.out)
        info = writer.finish(
            size=self.encoder.dimension,
            encoder_path=self.encoder.path,
            encoder_sha256=self.encoder.fingerprint,
            kind=self.kind,
            max_length=self.max_length,
            prune_top_k=self.prune_top_k,
            files=files,
        )
        if info.count == 0:
            raise empty_input(self.kind, self.out)
        written = sorted(self.out / name for name in info.files)
        return EncodingResult(self.out, written, info, time.perf_counter() - self.started)


def encoder_info(encoder: EncoderInput) -> EncoderInfo:
    if isinstance(encoder, LoadedEncoder):
        return encoder.info
    return encoder if isinstance(encoder, EncoderInfo) else EncoderInfo.read(encoder)
