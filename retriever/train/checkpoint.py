"""Sharded training checkpoints (torch.distributed.checkpoint) and the progress that resumes a run exactly.

A checkpoint directory holds the DCP shards of the trainable weights and the optimizer state (every rank writes
its own files; frozen base weights are not saved again), `progress.json` (step, FLOPs and tokens used, epoch and
position in the epoch, tracking run id) and `rng-rank<r>.pt` (each rank's RNG states). With Ray the per-rank
directories are merged into one checkpoint by `ray.train.report`.

`checksums.json` is written last, by rank 0 once every rank has written and hashed its files: the sha256 and size
of every file of the checkpoint and the rank that wrote it. A checkpoint is trusted only when the manifest is
there, lists exactly the files present and every file matches it, and `progress.json` reads
(`verify_checkpoint`); a partly written, truncated or bit-flipped checkpoint is never loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from retriever.checksums import sha256_file
from retriever.outputs import write_text_atomic
from retriever.train.collective import all_gather_objects
from retriever.train.errors import InvalidCheckpointError

PROGRESS_FILE = "progress.json"
MANIFEST_FILE = "checksums.json"
MANIFEST_FORMAT = 1


@dataclass
class Progress:
    step: int = 0
    flops: float = 0.0
    tokens: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of `epoch` already consumed
    tracking_run_id: str | None = None
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient (train.on_nonfinite: skip)

    @classmethod
    def read(cls, directory: Path) -> Progress:
        path = directory / PROGRESS_FILE
        if not path.is_file():
            raise InvalidCheckpointError(f"{directory}: not a training checkpoint ({PROGRESS_FILE} missing)")
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:  # bad UTF-8 or JSON, unknown or missing fields
            raise InvalidCheckpointError(f"{path}: unreadable ({exc})") from exc

    def write(self, directory: Path) -> None:
        (directory / PROGRESS_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


def _files(directory: Path) -> list[str]:
    """Every file under `directory` but the manifest, as sorted POSIX paths relative to it."""
    return sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
    )


def write_manifest(directory: Path, rank: int, world_size: int) -> None:
    """Collective: each rank hashes the files it wrote into its own `directory`; rank 0 writes the manifest of them
    all, last (the gather is the barrier: every rank's files are complete by then)."""
    mine = {
        name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
        for name in _files(directory)
    }
    parts = all_gather_objects(mine, world_size)
    if rank != 0:
        return
    files: dict[str, dict[str, Any]] = {}
    for writer, part in enumerate(parts):
        for name, entry in part.items():
            if name in files:  # merged into one folder, one would overwrite the other
                raise RuntimeError(f"checkpoint file {name} written by ranks {files[name]['rank']} and {writer}")
            files[name] = {**entry, "rank": writer}
    manifest = {"format": MANIFEST_FORMAT, "world_size": world_size, "files": files}
    write_text_atomic(directory / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


class _Invalid(Exception):
    """Why a checkpoint cannot be trusted, relative to its folder."""


def _read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise _Invalid(f"no {MANIFEST_FILE} (written last: the checkpoint is incomplete, or older than checksums)")
    try:
        files = json.loads(path.read_text())["files"]
        if not all(isinstance(e["sha256"], str) and isinstance(e["bytes"], int) for e in files.values()):
            raise TypeError("bad entry")
        return files
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise _Invalid(f"{MANIFEST_FILE} is unreadable ({exc})") from None


def _check_local(directory: Path, rank: int, world_size: int) -> str | None:
    """This rank's share of the verification: rank 0 the file list, each rank the hashes of the files written by
    the ranks r with r % world_size == rank (its own files when the world size is unchanged)."""
    try:
        files = _read_manifest(directory)
        if rank == 0:
            present, listed = set(_files(directory)), set(files)
            if missing := sorted(listed - present):
                raise _Invalid(f"{', '.join(missing)} missing (listed in {MANIFEST_FILE})")
            if extra := sorted(present - listed):
                raise _Invalid(f"{', '.join(extra)} not in {MANIFEST_FILE}")
        for name, entry in sorted(files.items()):
            if entry.get("rank", 0) % world_size != rank:
                continue
            path = directory / name
            if not path.is_file():
                raise _Invalid(f"{name} missing (listed in {MANIFEST_FILE})")
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise _Invalid(f"{name} does not match its checksum in {MANIFEST_FILE} (corrupt or changed)")
        if not (directory / PROGRESS_FILE).is_file():
            raise _Invalid(f"no {PROGRESS_FILE}")
        try:
            Progress.read(directory)
        except InvalidCheckpointError as exc:
            raise _Invalid(f"{PROGRESS_FILE} is unreadable ({exc.__cause__})") from None
    except _Invalid as exc:
        return str(exc)
    except OSError as exc:
        return f"unreadable ({exc})"
    return None


def verify_checkpoint(directory: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """Collective: None when the checkpoint can be trusted, else why not, relative to its folder (the same answer
    on every rank)."""
    problems = all_gather_objects(_check_local(directory, rank, world_size), world_size)
    return next((p for p in problems if p is not None), None)


_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Frozen base weights are not in the checkpoint: they come from the backbone itself.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


DEEPSPEED_TAG = "deepspeed"


def save_checkpoint(
    directory: Path,
    module: nn.Module,
    optimizer: Any,
    progress: Progress,
    rank: int,
    engine: Any = None,
    world_size: int = 1,
) -> None:
    """Collective: every rank writes its shards into its own `directory`; rank 0 also writes the progress, and
    the checksum manifest last.

    A DeepSpeed engine owns its (ZeRO-partitioned) optimizer state and writes it in its own sharded format.
    """
    if engine is not None:
        engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    else:
        model_state, optim_state = get_state_dict(module, optimizer, options=_OPTIONS)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))
    torch.save(_rng_state(), directory / f"rng-rank{rank}.pt")
    if rank == 0:
        progress.write(directory)
    write_manifest(directory, rank, world_size)


def load_checkpoint(directory: Path, module: nn.Module, optimizer: Any, rank: int, engine: Any = None) -> Progress:
    """Collective: restore weights, optimizer and this rank's RNG; returns where training stopped.

    Verify the checkpoint first (`verify_checkpoint`): this trusts the files."""
    progress = Progress.read(directory)
    try:
        if engine is not None:
            engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_module_strict=False)
        else:
            model_state, optim_state = get_state_dict(module, optimizer, options=_OPTIONS)
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, checkpoint_id=str(directory))
            set_state_dict(
                module,
                optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optim"],
                options=_LOAD_OPTIONS,
            )
    except Exception as exc:
        exc.add_note(f"while loading the checkpoint {directory} (does it belong to another model configuration?)")
        raise
    rng_file = directory / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return progress
