"""Where a training loop runs: in this process (no Ray) or as a Ray Train worker.

The loop talks to a `TrainContext` for its rank, its share of the data, reporting and checkpoints, so the same
code trains in a unit test, in a single process for debugging, and on a cluster.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retriever.data.collate import rows_from_table

COMPLETE_MARKER = "COMPLETE"


class TrainContext(Protocol):
    rank: int
    world_size: int

    def batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
        """This worker's rows of one epoch, `batch_size` rows at a time (equal counts on every rank)."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        """Record metrics (and a checkpoint written by this rank into `checkpoint_dir`)."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The newest complete checkpoint of this run, as a local directory (None: start fresh)."""

    def new_checkpoint_dir(self, step: int) -> contextlib.AbstractContextManager[Path]:
        """A directory for this rank to write checkpoint files into before `report`."""


class LocalContext:
    """Single process: the whole table, checkpoints under `run_dir/checkpoints/step-000123`."""

    rank = 0
    world_size = 1

    def __init__(
        self,
        table: Any,
        run_dir: Path,
        keep: int = 2,
        on_report: Callable[[dict[str, float]], None] | None = None,
        checkpoints: str = "checkpoints",
    ) -> None:
        self.table = table
        self.run_dir = Path(run_dir)
        self.checkpoint_root = self.run_dir / checkpoints
        self.keep = keep
        self.on_report = on_report  # e.g. forward to Ray Tune when training inside a Tune trial
        self.history: list[dict[str, float]] = []

    def batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
        order = np.random.default_rng([seed, epoch]).permutation(self.table.num_rows)
        shuffled = self.table.take(order)
        for start in range(0, self.table.num_rows - batch_size + 1, batch_size):
            yield rows_from_table(shuffled, start, start + batch_size)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        self.history.append(dict(metrics))
        if self.on_report is not None:
            self.on_report(metrics)
        if checkpoint_dir is not None:
            (checkpoint_dir / COMPLETE_MARKER).write_text("ok\n")
            self._prune()

    def _checkpoints(self) -> list[Path]:
        root = self.checkpoint_root
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.is_dir() and (p / COMPLETE_MARKER).is_file())

    def _prune(self) -> None:
        for stale in self._checkpoints()[: -self.keep]:
            shutil.rmtree(stale, ignore_errors=True)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = self._checkpoints()
        yield found[-1] if found else None

    @contextlib.contextmanager
    def new_checkpoint_dir(self, step: int) -> Iterator[Path]:
        path = self.checkpoint_root / f"step-{step:08d}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        yield path


class RayTrainContext:
    """A Ray Train worker: its dataset shard, `ray.train.report` (a barrier) and Ray-managed checkpoints."""

    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.shard = ray.train.get_dataset_shard("train")

    def batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
        yield from self.shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=max(4 * batch_size, 64),
            local_shuffle_seed=seed * 1_000_003 + epoch,
        )

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    @contextlib.contextmanager
    def new_checkpoint_dir(self, step: int) -> Iterator[Path]:
        import tempfile

        with tempfile.TemporaryDirectory(prefix=f"ckpt-{step}-") as directory:
            yield Path(directory)
