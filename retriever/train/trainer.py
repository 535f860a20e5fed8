"""Run a training stage in this process (`train.num_workers: 0`) or on Ray Train (FSDP2, DDP or DeepSpeed).

    result = run_training(load_config("configs/quickstart.yaml"))

Ray is imported only when workers are requested. Re-running with the same `name` and `train.output_dir` (and
`train.storage`, where Ray Train keeps checkpoints; see `retriever.train.storage`) resumes from the newest checkpoint
that verifies (Ray Train's job-level resume, or the local checkpoint folder; see `retriever.train.loop`). A
`UserError` a Ray worker raised (no valid checkpoint, a non-finite loss) reaches the caller as itself, not wrapped in
Ray's error. A run over several Ray nodes without `train.storage` is refused before anything is built.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.config import ConfigError, ExperimentConfig, TrainConfig
from retriever.errors import DataFormatError, UserError
from retriever.registry import Registry
from retriever.tracking import RunTracker, TrackingTarget, end_running_runs, open_experiment

if TYPE_CHECKING:
    from retriever.data.sources import DocTexts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """How `run_training` runs one kind of training stage.

    `stage_config` turns the experiment's config into the stage's (its own steps, batch and lr), `planned_steps`
    reads what it will run, `table` builds its rows in memory (None: the training-examples parquet) and
    `checkpoints` names its checkpoint folder, so a retrieval run never resumes from a pre-training stage of the
    same name.
    """

    make: Callable[[ExperimentConfig, int], Any]
    stage_config: Callable[[ExperimentConfig], ExperimentConfig]
    planned_steps: Callable[[ExperimentConfig], int]
    table: Callable[[ExperimentConfig], Any] | None
    checkpoints: str


def _retrieval_task(cfg: ExperimentConfig, planned_steps: int):
    from retriever.train.retrieval import RetrievalTask

    return RetrievalTask(cfg, planned_steps=planned_steps, docs=training_docs(cfg))


def _imported(module: str, name: str) -> Callable[..., Any]:
    """`module.name`, imported on first call (the pre-training stages' modules load torch and peft)."""

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args)

    return call


TASKS: Registry[TaskSpec] = Registry("training task")
TASKS.add("retrieval", TaskSpec(_retrieval_task, lambda cfg: cfg, lambda c: planned_steps_for(c), None, "checkpoints"))
MNTP, BOW = "retriever.train.mntp", "retriever.train.bow"
TASKS.add(
    "mntp",
    TaskSpec(
        lambda cfg, planned: _imported(MNTP, "MntpTask")(cfg),
        _imported(MNTP, "mntp_stage_config"),
        lambda cfg: cfg.mntp.steps,
        _imported(MNTP, "mntp_table"),
        "mntp-checkpoints",
    ),
)
TASKS.add(
    "bow",
    TaskSpec(
        lambda cfg, planned: _imported(BOW, "BowTask")(cfg),
        _imported(BOW, "bow_stage_config"),
        lambda cfg: cfg.bow.steps,
        _imported(BOW, "bow_table"),
        "bow-checkpoints",
    ),
)


def run_dir_for(cfg: ExperimentConfig) -> Path:
    """`<output_dir>/<name>`: the run's checkpoints and its product (`encoder/`, or the pre-training stage's)."""
    return (Path(cfg.train.output_dir) / cfg.name).resolve()


def prepare_training_data(cfg: ExperimentConfig) -> Path:
    """The training examples: the configured parquet file or folder of parquet shards, or the synthetic benchmark's
    file (built once, cached)."""
    if cfg.data.train != "synthetic":
        from retriever.data.examples import training_example_files

        path = Path(cfg.data.train)
        try:
            training_example_files(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"data.train={cfg.data.train!r}: no such file or folder; build one with `retriever data examples` "
                "(a folder of parquet shards works too) or use `synthetic`"
            ) from None
        except DataFormatError as exc:
            raise DataFormatError(f"data.train={cfg.data.train!r}: {exc}") from None
        return path.resolve()
    from retriever.data.catalog import synthetic_benchmark
    from retriever.data.examples import build_synthetic_examples

    bench = synthetic_benchmark(cfg)
    out = bench.root / f"train-examples-{cfg.loss.num_negatives}.parquet"
    if not out.is_file():
        build_synthetic_examples(bench, out, num_negatives=cfg.loss.num_negatives)
    return out


def training_docs(cfg: ExperimentConfig) -> DocTexts | None:
    """Passage texts for examples that hold ids: the `data.docs` dataset's docs, or the synthetic corpus."""
    from retriever.data.catalog import resolve_dataset
    from retriever.data.sources import DocTexts

    if cfg.data.docs is not None:
        from retriever.data.sources import load_source

        return DocTexts(load_source(resolve_dataset(cfg.data.docs, cfg)).docs_store(), f"data.docs={cfg.data.docs!r}")
    if cfg.data.train == "synthetic":
        from retriever.data.catalog import synthetic_benchmark

        return DocTexts(synthetic_benchmark(cfg).docs(), "the synthetic corpus")
    return None


def check_examples_have_texts(path: Path, cfg: ExperimentConfig) -> None:
    """Fail before training when the examples (a file, or a folder's first shard) hold passage ids and no docs are
    configured."""
    import pyarrow.parquet as pq

    from retriever.data.examples import training_example_files

    has_docs = cfg.data.docs is not None or cfg.data.train == "synthetic"
    if not has_docs and "positive" not in pq.read_schema(training_example_files(path)[0]).names:
        raise ConfigError(
            f"{path}: the training examples hold passage ids, not texts; set data.docs to the dataset whose "
            "documents they name (e.g. data.docs=msmarco-passage)"
        )


def planned_steps_for(cfg: ExperimentConfig) -> int:
    """Steps the budget buys for this configuration (exact with fixed shapes)."""
    if cfg.budget.max_steps is not None:
        return cfg.budget.max_steps
    from retriever.flops import plan_cell

    return plan_cell(cfg).steps


def tracker_settings(cfg: ExperimentConfig, parent_run_id: str | None = None) -> dict[str, Any] | None:
    """What a worker needs to open (or resume) the run's MLflow run; None when tracking is off."""
    target = open_experiment(cfg.tracking, cfg.train.output_dir)
    if target is None:
        return None
    where = {"uri": target.uri, "experiment_id": target.experiment_id}
    return where | {"run_name": cfg.name, "parent_run_id": parent_run_id}


def _tracker_factory(settings: dict[str, Any] | None) -> Callable[[str | None], RunTracker] | None:
    if settings is None:
        return None

    def make(run_id: str | None) -> RunTracker:
        return RunTracker.start(
            settings["uri"],
            settings["experiment_id"],
            run_name=settings["run_name"],
            run_id=run_id,
            parent_run_id=settings.get("parent_run_id"),
        )

    return make


def ray_train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """`train_loop_per_worker` of the TorchTrainer: rebuild the config and run the shared loop."""
    import os

    from retriever.train.context import RayTrainContext
    from retriever.train.loop import FAIL_ONCE_ENV, run_loop

    if loop_config.get("fail_once_at"):
        os.environ[FAIL_ONCE_ENV] = loop_config["fail_once_at"]
    cfg = ExperimentConfig.model_validate(loop_config["config"])
    task = TASKS.get(loop_config["task"]).make(cfg, loop_config["planned_steps"])
    result = run_loop(
        cfg,
        task,
        RayTrainContext(),
        Path(loop_config["run_dir"]),
        planned_steps=loop_config["planned_steps"],
        make_tracker=_tracker_factory(loop_config.get("tracking")),
        probe_texts=loop_config.get("probe_texts"),
    )
    return result.to_dict()


def run_training(
    cfg: ExperimentConfig,
    *,
    task: str = "retrieval",
    parent_run_id: str | None = None,
    callbacks: list[Any] | None = None,
    data_path: Path | None = None,
    probe_texts: list[str] | None = None,
    fail_once_at: str | None = None,
    on_report: Callable[[dict[str, float]], None] | None = None,
    planned_steps: int | None = None,
) -> dict[str, Any]:
    """Train one configuration to its budget; returns steps, tokens and FLOPs used and the export directory.

    `probe_texts` are encoded by the trained module at the end (returned as `probe_encodings`); `fail_once_at`
    ("<step>:<marker prefix>") makes every worker fail once at that step (fault-tolerance tests); `on_report`
    receives every reported metrics dict of an in-process run (Ray runs report through `callbacks`);
    `planned_steps` is the step count of a plan already made (a sweep plans its cells once), else the task plans.
    """
    from retriever.data.catalog import resolve_references

    if cfg.train.num_workers > 0:
        connect_ray_with_shared_storage(cfg)  # before anything is built or tracked for a run that cannot go on
    spec = TASKS.get(task)
    cfg = spec.stage_config(resolve_references(cfg))
    planned = planned_steps if planned_steps is not None else spec.planned_steps(cfg)
    path = None
    if spec.table is None:
        path = data_path or prepare_training_data(cfg)
        check_examples_have_texts(path, cfg)
    tracking = tracker_settings(cfg, parent_run_id)
    run_dir = run_dir_for(cfg)
    log.info("training %s: %d planned steps, data %s, run dir %s", cfg.name, planned, path, run_dir)
    if cfg.train.num_workers == 0:
        return _run_local(cfg, task, planned, path, run_dir, tracking, probe_texts, on_report)
    return _run_ray(cfg, task, planned, path, run_dir, tracking, callbacks or [], probe_texts, fail_once_at)


def _run_local(cfg, task, planned, path, run_dir, tracking, probe_texts, on_report) -> dict[str, Any]:
    from retriever.train.context import LocalContext
    from retriever.train.loop import run_loop

    spec = TASKS.get(task)
    if spec.table is None:
        from retriever.data.examples import read_training_examples

        table = read_training_examples(path)
    else:
        table = spec.table(cfg)
    runner = spec.make(cfg, planned)
    result = run_loop(
        cfg,
        runner,
        LocalContext(table, run_dir, on_report=on_report, checkpoints=spec.checkpoints),
        run_dir,
        planned_steps=planned,
        make_tracker=_tracker_factory(tracking),
        probe_texts=probe_texts,
    )
    return result.to_dict()


def connect_ray_with_shared_storage(cfg: ExperimentConfig) -> None:
    """Connect to Ray (the running one, else a new local one) and refuse a run over several alive nodes whose
    checkpoints would go to each node's own disk (`train.storage` unset; see `retriever.train.storage`)."""
    import ray

    from retriever.train.storage import check_shared_storage

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True)
    alive_nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    check_shared_storage(cfg.train.storage, cfg.train.output_dir, alive_nodes)


def _run_ray(cfg, task, planned, path, run_dir, tracking, callbacks, probe_texts, fail_once_at) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from retriever.train.storage import storage_location

    storage = storage_location(cfg.train.storage, cfg.train.output_dir)
    spec = TASKS.get(task)
    if spec.table is None:
        from retriever.data.examples import training_example_files, training_examples_schema

        # Checked here (footers only), where a bad shard is one line, not an error inside Ray; and the files the
        # local run reads, not Ray's own folder listing (recursive, `key=value` folders become columns).
        training_examples_schema(path)
        files = [str(file) for file in training_example_files(path)]
        dataset = ray.data.read_parquet(files, partitioning=None)
    else:
        dataset = ray.data.from_arrow(spec.table(cfg))
    trainer = TorchTrainer(
        ray_train_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "task": task,
            "planned_steps": planned,
            "run_dir": str(run_dir),
            "tracking": tracking,
            "probe_texts": probe_texts,
            "fail_once_at": fail_once_at,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=resources_per_worker(cfg.train),
        ),
        run_config=ray.train.RunConfig(
            name=f"{cfg.name}-{task}",
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={"train": dataset},
    )
    try:
        result = trainer.fit()
    except BaseException as exc:
        _end_orphaned_runs(tracking, exc)
        user_error = _user_error_in(exc)
        if user_error is not None:  # a bad state the workers found (e.g. no valid checkpoint): one line, not a trace
            raise user_error from exc
        raise
    return dict(result.return_value)


def resources_per_worker(train: TrainConfig) -> dict[str, float]:
    """What each Ray Train worker holds: `cpus_per_worker` CPUs, a GPU with `use_gpu`, and `worker_resources`
    (custom resources; the config refuses CPU and GPU there)."""
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = 1
    return resources | train.worker_resources


def _end_orphaned_runs(tracking: dict[str, Any] | None, error: BaseException) -> None:
    """Rank 0 ends its MLflow run when it fails; when Ray tore it down because another rank failed, the run would
    stay RUNNING: end it here."""
    if tracking is None:
        return
    try:
        target = TrackingTarget(tracking["uri"], tracking["experiment_id"])
        end_running_runs(target, tracking["run_name"], tracking.get("parent_run_id"), error)
    except Exception:  # never hide the training error behind a tracking one
        log.exception("could not end the tracking run of %s", tracking["run_name"])


def _user_error_in(error: BaseException, depth: int = 0) -> UserError | None:
    """The `UserError` a worker raised, found in Ray's wrapping of it (`worker_failures`, causes)."""
    if isinstance(error, UserError):
        return error
    if depth > 5:
        return None
    inner: list[Any] = list(getattr(error, "worker_failures", {}).values())
    inner += [getattr(error, "controller_failure", None), getattr(error, "cause", None), error.__cause__]
    for candidate in inner:
        if isinstance(candidate, BaseException):
            found = _user_error_in(candidate, depth + 1)
            if found is not None:
                return found
    return None
