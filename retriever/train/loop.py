"""The training loop shared by every task (retrieval fine-tuning, MNTP) and every placement (in-process, Ray Train).

Per step: collate → count the step's FLOPs analytically and all-reduce them (every rank sees the same global
number) → stop *before* a step that would exceed the budget → forward/backward/optimizer step → report metrics
(and, every `checkpoint_every` steps and at the end, a sharded checkpoint). The learning rate follows the progress
through the budget (4% linear warm-up, then linear decay to 0 at the budget), so the schedule ends exactly where
training ends also when sequence lengths vary.

Trust: a run resumes from its newest checkpoint that verifies (checksums, see `checkpoint`), saying which ones it
skipped and why; with none valid it stops rather than train over them. A non-finite loss or gradient (any rank)
stops the run (`train.on_nonfinite: stop`) or skips that optimizer step (`skip`: the step still counts toward the
budget, its FLOPs were spent). The export is written into a temporary folder, checked finite and renamed into
place. The MLflow run ends FAILED on an exception (tag `error`) and KILLED on an interrupt; a resumed run does not
log again the steps it had logged before it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from retriever import telemetry
from retriever.config import ExperimentConfig, flatten
from retriever.errors import SettingError
from retriever.losses import LossOutput
from retriever.outputs import atomic_directory
from retriever.tracking import RunTracker
from retriever.train.checkpoint import Progress, load_checkpoint, save_checkpoint, verify_checkpoint
from retriever.train.collective import any_rank
from retriever.train.context import TrainContext
from retriever.train.errors import NonFiniteLossError, NonFiniteWeightsError, NoValidCheckpointError
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
            raise SettingError("train.use_gpu=true but CUDA is not available on this worker; set train.use_gpu=false")
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
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    resumed_from: str | None = None  # the checkpoint this run continued from
    resumed_from_step: int = 0
    skipped_checkpoints: list[str] = field(default_factory=list)  # "<checkpoint>: <why it is invalid>"

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
            raise SettingError(
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
        self.resumed_from: str | None = None
        self.resumed_from_step = 0
        self.skipped_checkpoints: list[str] = []
        self.logged_through = 0  # steps up to here are already in the tracking run (logged before a restart)
        self.final_logged_at = 0

    def _adamw(self) -> torch.optim.Optimizer:
        params = [p for p in self.wrapped.module.parameters() if p.requires_grad]
        if not params:
            raise SettingError("nothing to train: every parameter is frozen (enable LoRA or full fine-tuning)")
        return torch.optim.AdamW(params, lr=self.cfg.train.lr, weight_decay=self.cfg.train.weight_decay)

    def _say(self, message: str) -> None:
        """A line on rank 0's console (stderr: shown without logging configured) and in the log."""
        if self.ctx.rank == 0:
            print(message, file=sys.stderr, flush=True)
            log.info(message)

    def resume(self, make_tracker: Callable[[str | None], RunTracker] | None) -> None:
        """Continue from the newest valid checkpoint (if any) and open rank 0's tracking run (the checkpoint's run
        id), tagged with where it resumed from and the checkpoints it skipped."""
        self._restore()
        self.last_checkpoint = self.progress.step if self.progress.step else -1
        if self.ctx.rank == 0 and make_tracker is not None:
            self.tracker = make_tracker(self.progress.tracking_run_id)
            self.progress.tracking_run_id = self.tracker.run_id
            if self.tracker.enabled and self.progress.step == 0:
                self.tracker.log_params(flatten(self.cfg))
            if self.resumed_from is not None:
                self.tracker.set_tags({"resumed_from": self.resumed_from, "resumed_from_step": self.progress.step})
                # Steps replayed from the checkpoint up to where the previous attempt stopped were logged then.
                self.logged_through = self.tracker.last_step("step")
                self.final_logged_at = self.tracker.last_step("final/steps")
            if self.skipped_checkpoints:
                self.tracker.set_tags({"skipped_checkpoints": "; ".join(self.skipped_checkpoints)})

    def _restore(self) -> None:
        """Load the newest checkpoint that verifies (collective: every rank checks its share and all agree)."""
        refs = self.ctx.checkpoints()
        for ref in refs:
            with ref.open() as directory:
                problem = verify_checkpoint(Path(directory), self.ctx.rank, self.ctx.world_size)
                if problem is None:
                    self.progress = load_checkpoint(
                        Path(directory), self.wrapped.module, self.optimizer, self.ctx.rank, self.engine
                    )
                    self.resumed_from, self.resumed_from_step = ref.name, self.progress.step
                    self._say(f"resumed from step {self.progress.step} (checkpoint {ref.name})")
                    return
            self.skipped_checkpoints.append(f"{ref.name}: {problem}")
            self._say(f"checkpoint {ref.name} skipped: {problem}")
        if refs:
            raise NoValidCheckpointError(
                f"no valid checkpoint to resume {self.cfg.name!r} from: {'; '.join(self.skipped_checkpoints)}. "
                f"Delete {self.ctx.checkpoint_home()} to train from scratch, or use another run name"
            )

    def checkpoint(self, metrics: dict[str, float]) -> None:
        with self.ctx.new_checkpoint_dir(self.progress.step) as directory:
            save_checkpoint(
                directory,
                self.wrapped.module,
                self.optimizer,
                self.progress,
                self.ctx.rank,
                self.engine,
                self.ctx.world_size,
            )
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
                    raise SettingError(
                        f"the training data gives this worker no full batch of {self.local_batch} rows; "
                        "add examples or lower train.batch_size"
                    )
                self.progress.epoch += 1
                self.progress.batches_in_epoch = 0

    def step(self, rows: Mapping[str, Any], index: int) -> bool:
        """Train on one batch unless it would exceed the budget; True when training is done."""
        progress = self.progress
        started = time.perf_counter()
        batch = self.task.collate(rows, progress.epoch)
        local_flops, local_tokens = self.task.step_cost(batch)
        step_flops, step_tokens = _global_sum([local_flops, float(local_tokens)], self.ctx.world_size, self.device)
        if not self.budget.allows(progress, step_flops):
            return True
        lr = self.cfg.train.lr * lr_factor(self.budget.fraction(progress), self.cfg.train.warmup_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        out = self.task.loss(self.wrapped.module, self.task.to_device(batch, self.device), progress.step)
        if not self._apply_gradients(out):
            progress.skipped_steps += 1
        progress.step += 1
        progress.flops += step_flops
        progress.tokens += int(step_tokens)
        progress.batches_in_epoch = index + 1
        self.window.tokens += int(step_tokens)
        _maybe_inject_failure(progress.step, self.ctx.rank)
        done = not self.budget.allows(progress, 0.0)
        self._record(out, lr, done, time.perf_counter() - started)
        return done

    def _apply_gradients(self, out: LossOutput) -> bool:
        """Backward and optimizer step; False when the step was skipped for a non-finite loss or gradient."""
        loss = out.total * self.wrapped.loss_scale
        if self.engine is not None:
            # DeepSpeed owns the (ZeRO-partitioned) gradients: the loss is checked, before backward.
            bad_loss, _ = self._nonfinite(out.total, [])
            if bad_loss:
                return self._on_nonfinite("loss", out)
            self.engine.backward(loss)
            self.engine.step()
            return True
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        bad_loss, bad_grad = self._nonfinite(out.total, [p.grad for p in params if p.grad is not None])
        if bad_loss or bad_grad:
            self.optimizer.zero_grad(set_to_none=True)
            return self._on_nonfinite("loss" if bad_loss else "gradient", out)
        if self.cfg.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _nonfinite(self, loss: torch.Tensor, grads: list[torch.Tensor]) -> tuple[bool, bool]:
        """Whether the loss, and any gradient, is non-finite on any rank (every rank gets the same answer)."""
        bad_loss = ~torch.isfinite(loss.detach()).all()
        local = [_local(g) for g in grads]
        bad_grad = ~torch.stack([torch.isfinite(g).all() for g in local]).all() if local else torch.tensor(False)
        flags = [bool(bad_loss), bool(bad_grad)]
        return tuple(any_rank(flags, self.ctx.world_size, self.device))

    def _on_nonfinite(self, what: str, out: LossOutput) -> bool:
        step = self.progress.step + 1
        value = out.total.detach().float().item()
        if self.cfg.train.on_nonfinite == "stop":
            checkpoint = f"step {self.last_checkpoint}" if self.last_checkpoint > 0 else "none yet"
            raise NonFiniteLossError(
                f"{self.cfg.name}: non-finite {what} at step {step} (loss {value}); training stopped (last "
                f"checkpoint: {checkpoint}). Lower train.lr or set train.max_grad_norm, or set "
                "train.on_nonfinite: skip to skip such steps"
            )
        if self.ctx.rank == 0:
            log.warning("step %d: non-finite %s (loss %s), optimizer step skipped", step, what, value)
        return False

    def _record(self, out: LossOutput, lr: float, done: bool, step_seconds: float) -> None:
        """Log every `log_every` steps, checkpoint every `checkpoint_every` steps, both at the end; the Prometheus
        metrics (`retriever.telemetry`) every step."""
        progress = self.progress
        losses = out.floats()
        metrics = {f"loss/{k}": v for k, v in losses.items()}
        metrics.update(
            step=progress.step,
            flops=progress.flops,
            tokens=progress.tokens,
            lr=lr,
            epoch=progress.epoch,
            budget_fraction=self.budget.fraction(progress),
        )
        if self.cfg.train.on_nonfinite == "skip":
            metrics["skipped_steps"] = progress.skipped_steps
        due_log = progress.step % self.cfg.train.log_every == 0 or done
        if due_log:
            metrics["tokens_per_s"] = self.window.throughput()
        if self.ctx.rank == 0:  # the FLOPs and tokens are already sums over the workers
            self._export_metrics(losses, metrics, step_seconds)
            if progress.step > self.logged_through:  # MLflow would add a second point for a replayed step
                self.tracker.log_metrics(metrics, step=progress.step)
        if progress.step % self.cfg.train.checkpoint_every == 0 or done:
            self.checkpoint(metrics)
        elif due_log:
            self.ctx.report(metrics)

    def _export_metrics(self, losses: dict[str, float], metrics: dict[str, float], step_seconds: float) -> None:
        run = self.cfg.name
        telemetry.record(telemetry.TRAIN_STEPS, 1, run=run)
        telemetry.record(telemetry.TRAIN_STEP_SECONDS, step_seconds, run=run)
        telemetry.record(telemetry.TRAIN_FLOPS, self.progress.flops, run=run)
        telemetry.record(telemetry.TRAIN_BUDGET_FRACTION, metrics["budget_fraction"], run=run)
        if self.budget.flops is not None:
            telemetry.record(telemetry.TRAIN_FLOP_BUDGET, self.budget.flops, run=run)
        if "tokens_per_s" in metrics:
            telemetry.record(telemetry.TRAIN_TOKENS_PER_SECOND, metrics["tokens_per_s"], run=run)
        for part, value in losses.items():
            telemetry.record(telemetry.TRAIN_LOSS, value, run=run, part=part)

    def finish(self, run_dir: Path, planned_steps: int | None, probe_texts: list[str] | None) -> LoopResult:
        progress = self.progress
        if self.last_checkpoint != progress.step:
            self.checkpoint({"step": progress.step, "flops": progress.flops, "tokens": progress.tokens})
        export_dir = Path(run_dir) / self.task.product
        self.export(export_dir)
        probe = self.task.probe(self.wrapped.module, probe_texts, self.device) if probe_texts else None
        if self.ctx.rank == 0:
            final = {"final/flops": progress.flops, "final/steps": progress.step}
            if self.cfg.train.on_nonfinite == "skip":
                final["final/skipped_steps"] = progress.skipped_steps
            if progress.step > self.final_logged_at:
                self.tracker.log_metrics(final, step=progress.step)
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
            skipped_steps=progress.skipped_steps,
            resumed_from=self.resumed_from,
            resumed_from_step=self.resumed_from_step,
            skipped_checkpoints=list(self.skipped_checkpoints),
        )

    def export(self, export_dir: Path) -> None:
        """Collective: the task's product, written by rank 0 into a temporary sibling, checked finite (the weights
        on every rank, then every tensor of the written files) and only then renamed into place."""
        flags = [not all(bool(torch.isfinite(_local(p.detach())).all()) for p in _parameter_data(self.wrapped.module))]
        if any_rank(flags, self.ctx.world_size, self.device)[0]:
            raise NonFiniteWeightsError(
                f"{self.cfg.name}: the trained weights hold NaN or infinite values at step {self.progress.step}; "
                f"nothing was exported to {export_dir}"
            )
        if self.ctx.rank != 0:
            self.task.export(self.wrapped.module, export_dir, self.ctx.rank)
            return
        with atomic_directory(export_dir, overwrite=True, what=f"the {self.task.product} export") as tmp:
            self.task.export(self.wrapped.module, tmp, self.ctx.rank)
            check_finite_files(tmp, export_dir)

    def fail(self, exc: BaseException) -> None:
        """End rank 0's tracking run as FAILED (KILLED for an interrupt), the error as its tag."""
        if self.ctx.rank == 0:
            try:
                self.tracker.fail(exc)
            except Exception:  # never hide the training error behind a tracking one
                log.exception("could not mark the tracking run %s as failed", self.tracker.run_id)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly FSDP2-sharded) tensor."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def _parameter_data(module: nn.Module) -> Iterator[torch.Tensor]:
    """This rank's share of every parameter (DeepSpeed ZeRO-3 keeps it in `ds_tensor`)."""
    for param in module.parameters():
        yield getattr(param, "ds_tensor", param)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_finite_files(directory: Path, shown: Path | None = None) -> None:
    """Raise `NonFiniteWeightsError` when a tensor of a weights file under `directory` holds NaN or inf."""
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.suffix not in _WEIGHT_SUFFIXES:
            continue
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors: Any = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        bad = [name for name, t in _tensors(tensors) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            where = (shown or directory) / path.relative_to(directory)
            raise NonFiniteWeightsError(
                f"{where}: {len(bad)} tensor(s) hold NaN or infinite values ({', '.join(bad[:3])}); nothing was "
                "exported"
            )


def _tensors(value: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix or "tensor", value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{prefix}[{index}]")


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """In the main thread, SIGTERM (where nothing else handles it) raises SystemExit, so the run is marked KILLED
    and temporary outputs are removed instead of the process vanishing mid-write."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
    with _interrupt_on_sigterm():
        try:
            training.resume(make_tracker)
            training.train()
            return training.finish(run_dir, planned_steps, probe_texts)
        except BaseException as exc:
            training.fail(exc)
            raise
