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
from retriever.mining.steps import CandidateAndScoreStep, CandidateStep, ScoreStep


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
    CPUs (+ ``gpus_per_actor``), or one actor per worker doing both (`fused`). Uses the current Ray cluster, or
    starts a local one."""
    import ray

    if not ray.is_initialized():
        try:
            # A new local Ray starts no idle workers ahead of use: every process of the job's memory is one that works.
            no_prestart = {"prestart_worker_first_driver": False, "num_workers_soft_limit": 0}
            ray.init(include_dashboard=False, log_to_driver=False, _system_config=no_prestart)
        except ValueError:  # an existing cluster (its own system config)
            ray.init(log_to_driver=False)
    check_resources(cfg, candidate is not None, score, float(ray.cluster_resources().get("CPU", 0)))
    # The plan (query ids and texts) is small next to what the steps make of it: the driver hands it to Ray in
    # blocks (no read tasks, whose workers would cost memory), enough that every actor gets work and a stopped job
    # loses little.
    plan = pq.read_table(plan_file)
    actors = max(cfg.workers, cfg.teacher.actors)
    blocks = max(2 * actors, math.ceil(plan.num_rows / (cfg.queries_per_batch * 4)))
    size = math.ceil(plan.num_rows / blocks)
    dataset = ray.data.from_arrow([plan.slice(start, size) for start in range(0, plan.num_rows, size)])
    t = cfg.teacher
    score_kwargs = {
        "corpus": corpus,
        "teacher": teacher,
        "inline_text": cfg.inline_text,
        "use_gpu": t.gpus_per_actor > 0,
    }
    batching = {"batch_size": cfg.queries_per_batch, "batch_format": "pyarrow"}
    if candidate is not None and score and fused(cfg):
        kind, options = candidate
        dataset = dataset.map_batches(
            CandidateAndScoreStep,
            fn_constructor_kwargs={
                "candidate": {"kind": kind, "pool_size": cfg.pool_size, **options},
                "score": score_kwargs,
            },
            compute=ray.data.ActorPoolStrategy(size=cfg.workers),
            num_cpus=cfg.cpus_per_worker + t.cpus_per_actor,
            **batching,
        )
    else:
        if candidate is not None:
            kind, options = candidate
            dataset = dataset.map_batches(
                CandidateStep,
                fn_constructor_args=(kind, cfg.pool_size),
                fn_constructor_kwargs=options,
                compute=ray.data.ActorPoolStrategy(size=cfg.workers),
                num_cpus=cfg.cpus_per_worker,
                **batching,
            )
        if score:
            dataset = dataset.map_batches(
                ScoreStep,
                fn_constructor_kwargs=score_kwargs,
                compute=ray.data.ActorPoolStrategy(size=t.actors),
                num_cpus=t.cpus_per_actor,
                num_gpus=t.gpus_per_actor or None,
                **batching,
            )
    yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")


def fused(cfg: MineConfig) -> bool:
    """First stage and CPU teacher in one actor per worker (`CandidateAndScoreStep`) when there are as many teacher
    actors as workers; a GPU teacher keeps a pool of its own."""
    return cfg.teacher.gpus_per_actor == 0 and cfg.teacher.actors == cfg.workers


def check_resources(cfg: MineConfig, candidates: bool, score: bool, cluster_cpus: float) -> None:
    """The actor pools must fit in the cluster, or the job waits forever for the ones that do not."""
    reserved = (cfg.workers * cfg.cpus_per_worker if candidates else 0) + (
        cfg.teacher.actors * cfg.teacher.cpus_per_actor if score else 0
    )
    if reserved > cluster_cpus:
        raise SettingError(
            f"the actors reserve {reserved:g} of the cluster's {cluster_cpus:g} CPUs ({cfg.workers} x cpus_per_worker "
            f"{cfg.cpus_per_worker:g}, {cfg.teacher.actors} x teacher.cpus_per_actor {cfg.teacher.cpus_per_actor:g}); "
            "use fewer actors or fractional CPUs (threads: teacher.torch_threads)"
        )


__all__ = ["check_resources", "fused", "run_on_ray"]
