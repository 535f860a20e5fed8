"""The training loop shared by every task (retrieval fine-tuning, MNTP) and every placement (in-process, Ray Train).

Per step: collate → count the step's FLOPs analytically and all-reduce them (every rank sees the same global
number) → stop *before* a step that would exceed the budget → forward/backward/optimizer step → report metrics
(and, every `checkpoint_every` steps and at the end, a sharded checkpoint). The learning rate follows the progress
through the budget (4% linear warm-up, then linear decay to 0 at the budget), so the schedule ends exactly where
training ends also when sequence lengths vary.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from retriever.config import ExperimentConfig, flatten
from retriever.losses import LossOutput
from retriever.tracking import RunTracker
from retriever.train.checkpoint import Progress, load_checkpoint, save_checkpoint
from retriever.train.context import TrainContext
from retriever.train.parallel import wrap

log = logging.getLogger(__name__)

FAIL_ONCE_ENV = "RETRIEVER_FAIL_ONCE_AT_STEP"  # test-only fault injection: "<step>:<marker file prefix>"


class Task(Protocol):
    """What is trained and how a step is computed; the loop owns everything else."""

    name: str
    product: str  # the folder of the run directory that `export` writes

    def build(self) -> nn.Module: ...

    def collate(self, rows: Mapping[str, Any], epoch: int) -> Any: ...

    def to_device(self, batch: Any, device: torch.device) -> Any: ...

    def step_cost(self, batch: Any) -> tuple[float, int]:
        """(analytic training FLOPs, tokens) of this rank's batch."""

    def loss(self, module: nn.Module, batch: Any, step: int) -> LossOutput: ...

    def export(self, module: nn.Module, out_dir: Path, rank: int) -> None:
        """Write the product of training (collective under sharding; rank 0 writes)."""

    def probe(self, module: nn.Module, texts: list[str], device: torch.device) -> list[list[float]]:
        """Representations of `texts` from the trained (possibly sharded) module (collective)."""


@dataclass
class Budget:
    flops: float | None
    max_steps: int | None

    def fraction(self, progress: Progress) -> float:
        if self.flops is not None:
            return min(1.0, progress.flops / self.flops)
        return min(1.0, progress.step / self.max_steps)

    def allows(self, progress: Progress, step_flops: float) -> bool:
        if self.flops is not None:
            return progress.flops + step_flops <= self.flops
        return progress.step < self.max_steps


def lr_factor(fraction: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` of the budget, then linear decay to 0 at its end."""
    if warmup > 0 and fraction < warmup:
        return fraction / warmup
    return max(0.0, (1.0 - fraction) / (1.0 - warmup))


def _global_sum(values: list[float], world_size: int, device: torch.device) -> list[float]:
    if world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _maybe_inject_failure(step: int, rank: int) -> None:
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec:
        return
    at, _, prefix = spec.partition(":")
    marker = Path(f"{prefix}.rank{rank}")
    if step == int(at) and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("failed once\n")
        raise RuntimeError(f"injected failure at step {step} (rank {rank})")


def _device(cfg: ExperimentConfig) -> torch.device:
    if cfg.train.use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("train.use_gpu=true but CUDA is not available on this worker")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@dataclass
class LoopResult:
    steps: int
    flops: float
    tokens: int
    epochs_completed: int
    stopped_by: str
    export_dir: str | None
    tracking_run_id: str | None
    planned_steps: int | None
    probe_encodings: list[list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_loop(
    cfg: ExperimentConfig,
    task: Task,
    ctx: TrainContext,
    run_dir: Path,
    *,
    planned_steps: int | None = None,
    make_tracker: Callable[[str | None], RunTracker] | None = None,
    probe_texts: list[str] | None = None,
) -> LoopResult:
    """Train until the budget is spent; returns what was used (rank 0's view equals every rank's).

    `make_tracker(run_id)` opens rank 0's MLflow run (resuming the run id stored in the checkpoint); `probe_texts`
    are encoded by the trained module at the end and returned (to check exported encoders against).
    """
    device = _device(cfg)
    world = ctx.world_size
    if cfg.train.batch_size % world:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by the {world} workers; "
            f"use a multiple of {world}"
        )
    local_batch = cfg.train.batch_size // world
    budget = Budget(cfg.budget.flops, cfg.budget.max_steps)

    # Identical initialisation on every rank (LoRA's A matrices are random), then per-rank dropout streams.
    torch.manual_seed(cfg.train.seed)
    module = task.build()
    wrapped = wrap(
        cfg.train.strategy,
        module,
        device=device,
        world_size=world,
        mixed_precision=cfg.train.mixed_precision,
        zero_stage=cfg.train.zero_stage,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        micro_batch=local_batch,
        max_grad_norm=cfg.train.max_grad_norm,
    )
    torch.manual_seed(cfg.train.seed * 7919 + ctx.rank)
    engine = wrapped.engine
    if engine is not None:
        optimizer = engine.optimizer
    else:
        params = [p for p in wrapped.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter is frozen (enable LoRA or full fine-tuning)")
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    progress = Progress()
    with ctx.latest_checkpoint() as previous:
        if previous is not None:
            progress = load_checkpoint(previous, wrapped.module, optimizer, ctx.rank, engine)
            log.info("resumed from %s at step %d (%.3g FLOPs used)", previous, progress.step, progress.flops)

    tracker = RunTracker.disabled()
    if ctx.rank == 0 and make_tracker is not None:
        tracker = make_tracker(progress.tracking_run_id)
        progress.tracking_run_id = tracker.run_id
        if tracker.enabled and progress.step == 0:
            tracker.log_params(flatten(cfg))

    stopped_by = "budget" if budget.flops is not None else "max_steps"
    last_checkpoint = progress.step if progress.step else -1
    done = not budget.allows(progress, 0.0)
    window_start, window_tokens = time.perf_counter(), 0

    def checkpoint(metrics: dict[str, float]) -> None:
        nonlocal last_checkpoint
        with ctx.new_checkpoint_dir(progress.step) as directory:
            save_checkpoint(directory, wrapped.module, optimizer, progress, ctx.rank, engine)
            ctx.report(metrics, directory)
        last_checkpoint = progress.step

    while not done:
        seen_any = False
        for index, rows in enumerate(ctx.batches(progress.epoch, local_batch, cfg.train.seed)):
            seen_any = True
            if index < progress.batches_in_epoch:
                continue  # resuming inside an epoch: these batches were already trained on
            batch = task.collate(rows, progress.epoch)
            local_flops, local_tokens = task.step_cost(batch)
            step_flops, step_tokens = _global_sum([local_flops, float(local_tokens)], world, device)
            if not budget.allows(progress, step_flops):
                done = True
                break
            fraction = budget.fraction(progress)
            lr = cfg.train.lr * lr_factor(fraction, cfg.train.warmup_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr

            out = task.loss(wrapped.module, task.to_device(batch, device), progress.step)
            if engine is not None:
                engine.backward(out.total * wrapped.loss_scale)
                engine.step()
            else:
                (out.total * wrapped.loss_scale).backward()
                if cfg.train.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(
                        [p for group in optimizer.param_groups for p in group["params"]], cfg.train.max_grad_norm
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            progress.step += 1
            progress.flops += step_flops
            progress.tokens += int(step_tokens)
            progress.batches_in_epoch = index + 1
            window_tokens += int(step_tokens)
            _maybe_inject_failure(progress.step, ctx.rank)
            if not budget.allows(progress, 0.0):
                done = True

            metrics = {f"loss/{k}": v for k, v in out.floats().items()}
            metrics.update(
                step=progress.step,
                flops=progress.flops,
                tokens=progress.tokens,
                lr=lr,
                epoch=progress.epoch,
                budget_fraction=budget.fraction(progress),
            )
            due_log = progress.step % cfg.train.log_every == 0 or done
            if due_log:
                elapsed = time.perf_counter() - window_start
                metrics["tokens_per_s"] = window_tokens / elapsed if elapsed > 0 else 0.0
                window_start, window_tokens = time.perf_counter(), 0
                tracker.log_metrics(metrics, step=progress.step)
            if progress.step % cfg.train.checkpoint_every == 0 or done:
                checkpoint(metrics)
            elif due_log:
                ctx.report(metrics)
            if done:
                break
        else:
            if not seen_any:
                raise ValueError(
                    f"the training data gives this worker no full batch of {local_batch} rows; "
                    "add examples or lower train.batch_size"
                )
            progress.epoch += 1
            progress.batches_in_epoch = 0

    if last_checkpoint != progress.step:
        checkpoint({"step": progress.step, "flops": progress.flops, "tokens": progress.tokens})
    export_dir = Path(run_dir) / task.product
    task.export(wrapped.module, export_dir, ctx.rank)
    probe = task.probe(wrapped.module, probe_texts, device) if probe_texts else None
    if ctx.rank == 0:
        tracker.log_metrics({"final/flops": progress.flops, "final/steps": progress.step}, step=progress.step)
        tracker.end()
    return LoopResult(
        steps=progress.step,
        flops=progress.flops,
        tokens=progress.tokens,
        epochs_completed=progress.epoch,
        stopped_by=stopped_by,
        export_dir=str(export_dir),
        tracking_run_id=progress.tracking_run_id,
        planned_steps=planned_steps,
        probe_encodings=probe,
    )
