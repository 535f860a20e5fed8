"""Mining on Ray Data: the plan's queries stream through a first-stage actor pool and a teacher actor pool."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from retriever.config import MineConfig
from retriever.errors import SettingError
from retriever.mining.steps import CandidateStep, ScoreStep


def run_on_ray(
    cfg: MineConfig,
    plan_file: Path,
    candidate: tuple[str, dict[str, Any]] | None,
    corpus: str,
    teacher: dict[str, Any] | None,
    score: bool,
) -> Iterator[pa.Table]:
    """Processed query rows of ``plan_file`` as Ray Data produces them (any order). First-stage actors:
    ``cfg.workers`` x ``cfg.cpus_per_worker`` CPUs; teacher actors: ``teacher.actors`` x ``teacher.cpus_per_actor``
    CPUs (+ ``gpus_per_actor``). Uses the current Ray cluster, or starts a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    check_resources(cfg, candidate is not None, score, float(ray.cluster_resources().get("CPU", 0)))
    rows = pq.ParquetFile(plan_file).metadata.num_rows
    actors = max(cfg.workers, cfg.teacher.actors)
    # Enough blocks that every actor gets work and a stopped job loses little (a block is the unit of retry).
    blocks = max(2 * actors, math.ceil(rows / (cfg.queries_per_batch * 4)))
    # The plan (query ids and texts) is small next to what the steps make of it: splitting it is cheap, and a single
    # file would otherwise be one block for one actor.
    dataset = ray.data.read_parquet(str(plan_file)).repartition(blocks)
    if candidate is not None:
        kind, options = candidate
        dataset = dataset.map_batches(
            CandidateStep,
            fn_constructor_args=(kind, cfg.pool_size),
            fn_constructor_kwargs=options,
            batch_size=cfg.queries_per_batch,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cfg.workers),
            num_cpus=cfg.cpus_per_worker,
        )
    if score:
        t = cfg.teacher
        dataset = dataset.map_batches(
            ScoreStep,
            fn_constructor_args=(corpus,),
            fn_constructor_kwargs={
                "teacher": teacher,
                "inline_text": cfg.inline_text,
                "use_gpu": t.gpus_per_actor > 0,
            },
            batch_size=cfg.queries_per_batch,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=t.actors),
            num_cpus=t.cpus_per_actor,
            num_gpus=t.gpus_per_actor or None,
        )
    yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")


def check_resources(cfg: MineConfig, candidates: bool, score: bool, cluster_cpus: float) -> None:
    """The actor pools must leave a CPU for Ray Data's read and split tasks, or the job waits forever."""
    reserved = (cfg.workers * cfg.cpus_per_worker if candidates else 0) + (
        cfg.teacher.actors * cfg.teacher.cpus_per_actor if score else 0
    )
    if cluster_cpus - reserved < 1:
        raise SettingError(
            f"the actors reserve {reserved:g} of the cluster's {cluster_cpus:g} CPUs ({cfg.workers} x cpus_per_worker "
            f"{cfg.cpus_per_worker:g}, {cfg.teacher.actors} x teacher.cpus_per_actor {cfg.teacher.cpus_per_actor:g}); "
            "leave at least 1 CPU for reading the queries: fewer actors or fractional CPUs (threads: "
            "teacher.torch_threads)"
        )


__all__ = ["check_resources", "run_on_ray"]
