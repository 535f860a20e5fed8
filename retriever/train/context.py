"""Where a training loop runs: in this process (no Ray) or as a Ray Train worker.

The loop talks to a `TrainContext` for its rank, its share of the data, reporting and checkpoints, so the same
code trains in a unit test, in a single process for debugging, and on a cluster.

Epoch order (both contexts, `epoch_batches`): every epoch is a global shuffle of all rows, seeded by (train.seed,
epoch), cut into global batches of `train.batch_size` rows (the remainder is left out of that epoch); with W workers
rank r trains on slots [r·B/W, (r+1)·B/W) of each global batch, so every rank has the same number of batches. Rows of
one query (one row per (query, positive) pair) never share a global batch, where they would be each other's false
in-batch negatives: the rows are grouped by query (queries in random order, rows in random order within a query) and
dealt round-robin over the epoch's batches, then the batches are shuffled.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retriever.data.collate import rows_from_table
from retriever.errors import DataFormatError, SettingError
from retriever.outputs import PARTIAL, atomic_directory
from retriever.train.collective import all_gather_objects
from retriever.train.storage import location_uri


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint of the run: `name` (its path or URI, for messages) and `open()`, a context manager giving it as
    a local directory."""

    name: str
    open: Callable[[], contextlib.AbstractContextManager[Path]]


class TrainContext(Protocol):
    rank: int
    world_size: int

    def batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
        """This worker's rows of one epoch, `batch_size` rows at a time (equal counts on every rank)."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        """Record metrics (and a checkpoint written by this rank into `checkpoint_dir`)."""

    def checkpoints(self) -> list[CheckpointRef]:
        """This run's checkpoints, newest first, the same list on every rank (empty: start fresh)."""

    def checkpoint_home(self) -> str:
        """Where the run's checkpoints live, for messages (the folder to delete to start over)."""

    def new_checkpoint_dir(self, step: int) -> contextlib.AbstractContextManager[Path]:
        """A fresh directory that only this rank writes checkpoint files into before `report`."""


def epoch_batches(table: pa.Table, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """Row indices of one epoch's global batches, `[batches, batch_size]` (see the module docstring).

    Without a `query_id` column (MNTP blocks) this is a plain seeded permutation. Raises ValueError when a query has
    more rows than the epoch has batches, since some batch would then have to hold it twice.
    """
    rng = np.random.default_rng([seed, epoch])
    count = table.num_rows // batch_size
    if "query_id" not in table.column_names:
        return rng.permutation(table.num_rows)[: count * batch_size].reshape(count, batch_size)
    if count == 0:
        return np.empty((0, batch_size), dtype=np.int64)
    queries = pc.dictionary_encode(table.column("query_id").combine_chunks())
    codes = queries.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    rows_per_query = np.bincount(codes)
    if rows_per_query.max() > count:
        worst = int(rows_per_query.argmax())
        raise SettingError(
            f"query {queries.dictionary[worst].as_py()!r} has {rows_per_query[worst]} training rows, but an epoch of "
            f"{table.num_rows} rows has only {count} batches of {batch_size}, so a batch would hold it twice; lower "
            "train.batch_size or use more training queries"
        )
    query_rank = rng.permutation(len(rows_per_query))
    grouped = np.lexsort((rng.random(table.num_rows), query_rank[codes]))  # by query, random within a query
    # Position i of the grouped order goes to batch i mod count: a query's k <= count consecutive rows land in k
    # different batches. The last rows (a random tail of queries) wait for the next epoch.
    dealt = grouped[: count * batch_size].reshape(batch_size, count).T
    return dealt[rng.permutation(count)]


class LocalContext:
    """Single process: the whole table (in `canonical_order`, as Ray workers see it), checkpoints under
    `run_dir/<checkpoints>/step-000123`, each written into a temporary sibling and renamed into place when complete
    (a killed run leaves only complete checkpoints); the newest `keep` are kept."""

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
        self.table = canonical_order(table) if table is not None else None
        self.run_dir = Path(run_dir)
        self.checkpoint_root = self.run_dir / checkpoints
        self.keep = keep
        self.on_report = on_report  # e.g. forward to Ray Tune when training inside a Tune trial
        self.history: list[dict[str, float]] = []

    def batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
        yield from _rows_of(self.table, epoch_batches(self.table, batch_size, seed, epoch))

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        self.history.append(dict(metrics))
        if self.on_report is not None:
            self.on_report(metrics)

    def _checkpoints(self) -> list[Path]:
        """The checkpoint folders in place, oldest first (whether valid is for `verify_checkpoint` to say)."""
        root = self.checkpoint_root
        if not root.is_dir():
            return []
        return sorted(p for p in root.glob("step-*") if p.is_dir())

    def _prune(self) -> None:
        for stale in self._checkpoints()[: -self.keep]:
            shutil.rmtree(stale, ignore_errors=True)
        # Temporary folders of checkpoints whose writer was killed (one writer per run folder).
        for partial in self.checkpoint_root.glob(f"{PARTIAL}*-step-*"):
            shutil.rmtree(partial, ignore_errors=True)

    def checkpoints(self) -> list[CheckpointRef]:
        return [CheckpointRef(str(p), lambda p=p: contextlib.nullcontext(p)) for p in reversed(self._checkpoints())]

    def checkpoint_home(self) -> str:
        return str(self.checkpoint_root)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        """The newest checkpoint folder, valid or not (None: there is none)."""
        found = self._checkpoints()
        yield found[-1] if found else None

    @contextlib.contextmanager
    def new_checkpoint_dir(self, step: int) -> Iterator[Path]:
        target = self.checkpoint_root / f"step-{step:08d}"
        with atomic_directory(target, overwrite=True, what="the checkpoint") as tmp:
            yield tmp
        self._prune()


def _rows_of(table: pa.Table, batches: np.ndarray) -> Iterator[dict[str, Any]]:
    """The rows of each batch of indices, as the collator takes them."""
    if not len(batches):
        return
    size = batches.shape[1]
    ordered = table.take(pa.array(batches.ravel()))
    for start in range(0, ordered.num_rows, size):
        yield rows_from_table(ordered, start, start + size)


class RayTrainContext:
    """A Ray Train worker: the training data, `ray.train.report` (a barrier) and Ray-managed checkpoints.

    The dataset arrives split across the workers (`get_dataset_shard`). For a global shuffle every worker needs every
    row: on the first epoch the shards are all-gathered once (over gloo; a side group when the job runs NCCL) and
    put in a canonical order (by query_id, positive_id where the table has them), so every rank computes the same
    `epoch_batches` and takes its own slots of each global batch. Each worker keeps the whole table in memory:
    examples that hold passage ids (not texts) keep that small.
    """

    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.shard = ray.train.get_dataset_shard("train")
        self._table: pa.Table | None = None

    def _all_rows(self) -> pa.Table:
        if self._table is None:
            parts = [t for t in self.shard.iter_batches(batch_format="pyarrow", batch_size=4096) if t.num_rows]
            local = pa.concat_tables(parts, promote_options="default") if parts else None
            self._table = canonical_order(_all_gather_tables(local, self.world_size))
        return self._table

    def batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
        table = self._all_rows()
        global_batches = epoch_batches(table, batch_size * self.world_size, seed, epoch)
        mine = global_batches[:, self.rank * batch_size : (self.rank + 1) * batch_size]
        yield from _rows_of(table, mine)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint)

    def checkpoints(self) -> list[CheckpointRef]:
        """The latest reported checkpoint (`get_checkpoint`), then the run's other kept checkpoints, newest first.

        Ray 2.60 keeps a run's checkpoints as `<storage_path>/<name>/checkpoint_<YYYY-MM-DD_HH-MM-SS.ffffff>` and
        lists the ones it kept (`CheckpointConfig.num_to_keep`, restored from its snapshot on a re-run) in
        `get_all_reported_checkpoints`; the timestamped names sort by age. A folder a killed rank was still
        uploading into was never reported, so it is not listed.
        """
        latest = self._train.get_checkpoint()
        if latest is None:
            return []
        from ray.train import CheckpointConsistencyMode

        reported = self._train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        older = sorted(
            (r.checkpoint for r in reported if r.checkpoint.path != latest.path),
            key=lambda c: Path(c.path).name,
            reverse=True,
        )
        return [CheckpointRef(location_uri(c.filesystem, c.path), c.as_directory) for c in [latest, *older]]

    def checkpoint_home(self) -> str:
        """The run's folder in `train.storage`: a local path, or a URI (pyarrow's paths drop `s3://`)."""
        storage = self._train.get_context().get_storage()
        return location_uri(storage.storage_filesystem, storage.experiment_fs_path)

    @contextlib.contextmanager
    def new_checkpoint_dir(self, step: int) -> Iterator[Path]:
        import tempfile

        with tempfile.TemporaryDirectory(prefix=f"ckpt-{step}-") as directory:
            yield Path(directory)


def canonical_order(table: pa.Table) -> pa.Table:
    """Rows sorted by (query_id, positive_id) where the table has those columns (training examples), so the order
    does not depend on how the dataset was split; other tables are returned as they are."""
    keys = [(name, "ascending") for name in ("query_id", "positive_id") if name in table.column_names]
    if not keys:
        return table
    return table.take(pc.sort_indices(table, sort_keys=keys))


def _all_gather_tables(local: pa.Table | None, world_size: int) -> pa.Table:
    """Every rank's rows on every rank, in rank order."""
    tables = [t for t in all_gather_objects(local, world_size) if t is not None]
    if not tables:
        raise DataFormatError("the training dataset is empty: no worker received any rows")
    return pa.concat_tables(tables, promote_options="default").combine_chunks()
