"""Sharded training checkpoints (torch.distributed.checkpoint) and the progress that resumes a run exactly.

A checkpoint directory holds the DCP shards of the trainable weights and the optimizer state (every rank writes
its own files; frozen base weights are not saved again), `progress.json` (step, FLOPs and tokens used, epoch and
position in the epoch, tracking run id) and `rng-rank<r>.pt` (each rank's RNG states). With Ray the per-rank
directories are merged into one checkpoint by `ray.train.report`.
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

PROGRESS_FILE = "progress.json"


@dataclass
class Progress:
    step: int = 0
    flops: float = 0.0
    tokens: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of `epoch` already consumed
    tracking_run_id: str | None = None

    @classmethod
    def read(cls, directory: Path) -> Progress:
        path = directory / PROGRESS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: not a training checkpoint ({PROGRESS_FILE} missing)")
        return cls(**json.loads(path.read_text()))

    def write(self, directory: Path) -> None:
        (directory / PROGRESS_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


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
    directory: Path, module: nn.Module, optimizer: Any, progress: Progress, rank: int, engine: Any = None
) -> None:
    """Collective: every rank writes its shards; rank 0 also writes the progress.

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


def load_checkpoint(directory: Path, module: nn.Module, optimizer: Any, rank: int, engine: Any = None) -> Progress:
    """Collective: restore weights, optimizer and this rank's RNG; returns where training stopped."""
    progress = Progress.read(directory)
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
    rng_file = directory / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return progress
