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


@dataclass
class _Window:
    """Tokens since the last logged step, for the logged throughput."""

    started: float
    tokens: int = 0

    def throughput(self) -> float:
        elapsed = time.perf_counter() - self.started
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.started, self.tokens = time.perf_counter(), 0
        return rate


class _Training:
    """One training run in named steps: `build` (wrap the module, make the optimizer), `resume` (the latest
    checkpoint and the tracking run), `train` (epochs of steps until the budget is spent), `finish` (final
    checkpoint, export, probe)."""

    def __init__(self, cfg: ExperimentConfig, task: Task, ctx: TrainContext) -> None:
        self.cfg, self.task, self.ctx = cfg, task, ctx
        self.device = _device(cfg)
        world = ctx.world_size
        if cfg.train.batch_size % world:
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} is not divisible by the {world} workers; "
                f"use a multiple of {world}"
            )
        self.local_batch = cfg.train.batch_size // world
        self.budget = Budget(cfg.budget.flops, cfg.budget.max_steps)
        # Identical initialisation on every rank (LoRA's A matrices are random), then per-rank dropout streams.
        torch.manual_seed(cfg.train.seed)
        self.wrapped = wrap(
            cfg.train.strategy,
            task.build(),
            device=self.device,
            world_size=world,
            mixed_precision=cfg.train.mixed_precision,
            zero_stage=cfg.train.zero_stage,
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            micro_batch=self.local_batch,
            max_grad_norm=cfg.train.max_grad_norm,
        )
        torch.manual_seed(cfg.train.seed * 7919 + ctx.rank)
        self.engine = self.wrapped.engine
        self.optimizer = self.engine.optimizer if self.engine is not None else self._adamw()
        self.progress = Progress()
        self.tracker = RunTracker.disabled()
        self.last_checkpoint = -1
        self.window = _Window(time.perf_counter())

    def _adamw(self) -> torch.optim.Optimizer:
        params = [p for p in self.wrapped.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter is frozen (enable LoRA or full fine-tuning)")
        return torch.optim.AdamW(params, lr=self.cfg.train.lr, weight_decay=self.cfg.train.weight_decay)

    def resume(self, make_tracker: Callable[[str | None], RunTracker] | None) -> None:
        """Continue from the latest checkpoint (if any) and open rank 0's tracking run (the checkpoint's run id)."""
        with self.ctx.latest_checkpoint() as previous:
            if previous is not None:
                self.progress = load_checkpoint(
                    previous, self.wrapped.module, self.optimizer, self.ctx.rank, self.engine
                )
                log.info(
                    "resumed from %s at step %d (%.3g FLOPs used)", previous, self.progress.step, self.progress.flops
                )
        self.last_checkpoint = self.progress.step if self.progress.step else -1
        if self.ctx.rank == 0 and make_tracker is not None:
            self.tracker = make_tracker(self.progress.tracking_run_id)
            self.progress.tracking_run_id = self.tracker.run_id
            if self.tracker.enabled and self.progress.step == 0:
                self.tracker.log_params(flatten(self.cfg))

    def checkpoint(self, metrics: dict[str, float]) -> None:
        with self.ctx.new_checkpoint_dir(self.progress.step) as directory:
            save_checkpoint(directory, self.wrapped.module, self.optimizer, self.progress, self.ctx.rank, self.engine)
            self.ctx.report(metrics, directory)
        self.last_checkpoint = self.progress.step

    def train(self) -> None:
        """Epochs until the budget is spent; a resumed run skips the batches its epoch already trained on."""
        done = not self.budget.allows(self.progress, 0.0)
        while not done:
            seen_any = False
            for index, rows in enumerate(self.ctx.batches(self.progress.epoch, self.local_batch, self.cfg.train.seed)):
                seen_any = True
                if index < self.progress.batches_in_epoch:
                    continue
                done = self.step(rows, index)
                if done:
                    break
            else:
                if not seen_any:
                    raise ValueError(
                        f"the training data gives this worker no full batch of {self.local_batch} rows; "
                        "add examples or lower train.batch_size"
                    )
                self.progress.epoch += 1
                self.progress.batches_in_epoch = 0

    def step(self, rows: Mapping[str, Any], index: int) -> bool:
        """Train on one batch unless it would exceed the budget; True when training is done."""
        progress = self.progress
        batch = self.task.collate(rows, progress.epoch)
        local_flops, local_tokens = self.task.step_cost(batch)
        step_flops, step_tokens = _global_sum([local_flops, float(local_tokens)], self.ctx.world_size, self.device)
        if not self.budget.allows(progress, step_flops):
            return True
        lr = self.cfg.train.lr * lr_factor(self.budget.fraction(progress), self.cfg.train.warmup_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        out = self.task.loss(self.wrapped.module, self.task.to_device(batch, self.device), progress.step)
        self._apply_gradients(out)
        progress.step += 1
        progress.flops += step_flops
        progress.tokens += int(step_tokens)
        progress.batches_in_epoch = index + 1
        self.window.tokens += int(step_tokens)
        _maybe_inject_failure(progress.step, self.ctx.rank)
        done = not self.budget.allows(progress, 0.0)
        self._record(out, lr, done)
        return done

    def _apply_gradients(self, out: LossOutput) -> None:
        loss = out.total * self.wrapped.loss_scale
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
            return
        loss.backward()
        if self.cfg.train.max_grad_norm:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _record(self, out: LossOutput, lr: float, done: bool) -> None:
        """Log every `log_every` steps, checkpoint every `checkpoint_every` steps, both at the end."""
        progress = self.progress
        metrics = {f"loss/{k}": v for k, v in out.floats().items()}
        metrics.update(
            step=progress.step,
            flops=progress.flops,
            tokens=progress.tokens,
            lr=lr,
            epoch=progress.epoch,
            budget_fraction=self.budget.fraction(progress),
        )
        due_log = progress.step % self.cfg.train.log_every == 0 or done
        if due_log:
            metrics["tokens_per_s"] = self.window.throughput()
            self.tracker.log_metrics(metrics, step=progress.step)
        if progress.step % self.cfg.train.checkpoint_every == 0 or done:
            self.checkpoint(metrics)
        elif due_log:
            self.ctx.report(metrics)

    def finish(self, run_dir: Path, planned_steps: int | None, probe_texts: list[str] | None) -> LoopResult:
        progress = self.progress
        if self.last_checkpoint != progress.step:
            self.checkpoint({"step": progress.step, "flops": progress.flops, "tokens": progress.tokens})
        export_dir = Path(run_dir) / self.task.product
        self.task.export(self.wrapped.module, export_dir, self.ctx.rank)
        probe = self.task.probe(self.wrapped.module, probe_texts, self.device) if probe_texts else None
        if self.ctx.rank == 0:
            self.tracker.log_metrics({"final/flops": progress.flops, "final/steps": progress.step}, step=progress.step)
            self.tracker.end()
        return LoopResult(
            steps=progress.step,
            flops=progress.flops,
            tokens=progress.tokens,
            epochs_completed=progress.epoch,
            stopped_by="budget" if self.budget.flops is not None else "max_steps",
            export_dir=str(export_dir),
            tracking_run_id=progress.tracking_run_id,
            planned_steps=planned_steps,
            probe_encodings=probe,
        )


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
    training = _Training(cfg, task, ctx)
    training.resume(make_tracker)
    training.train()
    return training.finish(run_dir, planned_steps, probe_texts)
