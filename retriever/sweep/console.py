"""The sweep's console: one progress line for the whole grid and one line per finished cell.

    [sweep quickstart] 7/18 done, 0 failed | running: tiny-m dense cl (312 steps, 40%) | 4m12s elapsed, ETA 6m30s
    ✓ tiny-s sparse cl+kd  nDCG@10 0.612  1.2e12 FLOPs  41s

On a terminal the progress line is redrawn in place; in a pipe or CI log it is printed again only when a cell
starts, finishes or fails. Unless `verbose`, everything else goes to files in the sweep folder: Tune's tables and
log messages to `<sweep>/tune.log` (its per-trial results stay in `<sweep>/tune/`), and each trial's own output
(tqdm bars, warnings, tracebacks) to `<sweep>/cells/<cell>/trial.log`.

`SweepConsole` knows nothing of Ray; `SweepConsole.callback()` is the Ray Tune callback that drives it.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import pickle
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from retriever import telemetry
from retriever.records import CELLS_DIR, cell_id
from retriever.report.formatting import format_flops, format_metric, metric_label

if TYPE_CHECKING:
    from ray.tune import Callback, Tuner

    from retriever.config import ExperimentConfig

TUNE_LOG = "tune.log"
CELL_LOG = "trial.log"
TTY_REFRESH_S = 1.0  # on a terminal, redraw the progress line at most this often when only the clock moved


class Trial(Protocol):
    """What the console reads of a Tune trial."""

    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any]


def cell_name(config: Mapping[str, Any]) -> str:
    """How the console names a cell: `tiny-s sparse cl+kd`."""
    return f"{config['backbone']} {config['paradigm']} {config['loss']}"


def cell_log(config: Mapping[str, Any]) -> Path:
    """The file that receives a cell's trial output: `<sweep>/cells/<cell>/trial.log`."""
    return (
        Path(config["sweep_dir"])
        / CELLS_DIR
        / cell_id(config["backbone"], config["paradigm"], config["loss"])
        / CELL_LOG
    )


def format_duration(seconds: float) -> str:
    """`41s`, `4m12s`, `1h02m`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _cells(count: int) -> str:
    return f"{count} cell" if count == 1 else f"{count} cells"


def _shown(path: Path) -> str:
    """A path as the user best reads it: relative to the working directory when it lies below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _activity(result: Mapping[str, Any]) -> str:
    """What a running cell is doing, from its last report: `starting`, `312 steps, 40%`, `evaluating`."""
    if "step" not in result:
        return "starting"
    fraction = result.get("budget_fraction")
    if fraction is not None and fraction >= 1:
        return "evaluating"
    steps = f"{int(result['step'])} steps"
    return steps if fraction is None else f"{steps}, {fraction:.0%}"


def _error_summary(trial: Trial) -> str:
    """`ValueError: <first line>` of the exception that failed the trial (Tune pickles it next to the trial)."""
    path = getattr(trial, "pickled_error_file", None)
    try:
        error = pickle.loads(Path(path).read_bytes()) if path else None
    except Exception:  # an unreadable error file: the cell's log still has the traceback
        error = None
    if error is None:
        return "unknown error"
    cause = getattr(error, "cause", None) or error  # a RayTaskError wraps the trainable's own exception
    message = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {message[0]}" if message else type(cause).__name__


@dataclass
class _Running:
    name: str
    started: float
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepConsole:
    """The console of one sweep run: feed it trial events (or use `callback()`); it prints the progress line and
    the finished cells to `stream` (default: the current `sys.stderr`)."""

    name: str
    cells: Sequence[str]  # every cell's name, in grid order
    concurrency: int
    metric_key: str  # the reported key of the primary metric: `eval/synthetic/test/ndcg_at_10`
    metric_label: str  # and how to show it: `nDCG@10`
    directory: Path
    verbose: bool = False
    stream: IO[str] | None = None
    clock: Callable[[], float] = time.monotonic
    started: float = field(init=False)
    done: int = field(default=0, init=False)
    failed: int = field(default=0, init=False)
    durations: list[float] = field(default_factory=list, init=False)
    running: dict[str, _Running] = field(default_factory=dict, init=False)
    seen: set[str] = field(default_factory=set, init=False)
    _drawn: str = field(default="", init=False)  # the progress line on the terminal ("" when none)
    _drawn_at: float = field(default=float("-inf"), init=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    @classmethod
    def for_sweep(
        cls, cfg: ExperimentConfig, directory: Path, concurrency: int, *, verbose: bool = False
    ) -> SweepConsole:
        """The console of `cfg`'s grid; its metric is the report's primary one (first dataset, first metric)."""
        from retriever.report.ranking import primary_metric
        from retriever.tracking import safe_metric_name

        dataset, metric = primary_metric(cfg)
        axes = cfg.sweep
        cells = [
            cell_name({"backbone": b, "paradigm": p, "loss": loss})
            for b in axes.backbones
            for p in axes.paradigms
            for loss in axes.losses
        ]
        return cls(
            name=cfg.name,
            cells=cells,
            concurrency=concurrency,
            metric_key=f"eval/{dataset}/{safe_metric_name(metric)}",  # as `run_cell` reports it
            metric_label=metric_label(metric),
            directory=directory,
            verbose=verbose,
        )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "stream": None}  # Tune pickles its callbacks; a terminal stream does not pickle

    # ---------------------------------------------------------------------------------------------- events
    def trial_started(self, trial: Trial) -> None:
        self._running(trial)
        self._update(force=True)

    def trial_reported(self, trial: Trial, result: Mapping[str, Any]) -> None:
        self._running(trial).result = dict(result)
        self._update()

    def trial_finished(self, trial: Trial) -> None:
        cell = self._finish(trial)
        if cell is None:
            return
        result = trial.last_result or cell.result
        duration = self.clock() - cell.started
        self.done += 1
        self.durations.append(duration)
        metric = result.get(self.metric_key)
        shown = "n/a" if metric is None else format_metric(metric, percent=False, decimals=3)
        flops = "" if result.get("flops") is None else f"  {format_flops(result['flops'])} FLOPs"
        self._print(f"✓ {cell.name:{self._width}}  {self.metric_label} {shown}{flops}  {format_duration(duration)}")
        self._update(force=True)

    def trial_failed(self, trial: Trial) -> None:
        cell = self._finish(trial)
        if cell is None:
            return
        self.failed += 1
        where = "" if self.verbose else f"  (log: {_shown(cell_log(trial.config))})"
        self._print(f"✗ {cell.name:{self._width}}  failed: {_error_summary(trial)}{where}")
        self._update(force=True)

    def refresh(self, trials: Sequence[Trial] = ()) -> None:
        """Count the trials that ended in an earlier run of a resumed sweep; redraw the clock on a terminal."""
        for trial in trials:
            status = getattr(trial, "status", None)
            if trial.trial_id not in self.seen and status in ("TERMINATED", "ERROR"):
                self.seen.add(trial.trial_id)
                if status == "TERMINATED":
                    self.done += 1
                else:
                    self.failed += 1
        self._update()

    # ---------------------------------------------------------------------------------------------- output
    def status_line(self, width: int | None = None) -> str:
        """`[sweep NAME] D/N done, F failed | running: CELL (ACTIVITY), ... | ELAPSED elapsed, ETA T`; within
        `width` it names the running cells without their activity, then only counts them, then cuts the line."""
        counts = f"[sweep {self.name}] {self._counts()}"
        timing = f"{format_duration(self.clock() - self.started)} elapsed"
        if self.remaining:
            eta = self.eta()
            timing += ", ETA " + ("--" if eta is None else format_duration(eta))
        running = self.running.values()
        candidates = [f"{counts} | {timing}"]
        if running:
            candidates = [
                f"{counts} | running: {cells} | {timing}"
                for cells in (
                    ", ".join(f"{cell.name} ({_activity(cell.result)})" for cell in running),
                    ", ".join(cell.name for cell in running),
                    _cells(len(running)),
                )
            ]
        for line in candidates:
            if width is None or len(line) <= width:
                return line
        return line[: width - 1] + "…"

    @property
    def remaining(self) -> int:
        return max(0, len(self.cells) - self.done - self.failed)

    def eta(self) -> float | None:
        """Seconds left: the mean duration of the cells finished here x the cells left / the cells run at once."""
        if not self.remaining:
            return 0.0
        if not self.durations:
            return None
        return statistics.fmean(self.durations) * self.remaining / min(self.concurrency, self.remaining)

    def header(self) -> None:
        """Where the sweep's files go; printed once, before the first cell."""
        lines = [f"sweep {self.name}: {_cells(len(self.cells))}, up to {self.concurrency} at a time"]
        lines.append(f"  sweep folder: {_shown(self.directory)}")
        if self.verbose:
            lines.append(f"  Tune results per trial: {_shown(self.directory / 'tune')}/")
        else:
            lines.append(f"  Tune's tables and log: {_shown(self.directory / TUNE_LOG)} (results per trial: tune/)")
            lines.append(f"  each cell's output: cells/<cell>/{CELL_LOG}   (--verbose shows it all here)")
        for line in lines:
            self._print(line)

    def close(self) -> None:
        """End the progress display with the final counts (and how to go on after an interruption)."""
        self._clear()
        self._drawn = ""
        elapsed = format_duration(self.clock() - self.started)
        if self.remaining:
            line = (
                f"[sweep {self.name}] stopped after {elapsed}: {self._counts()}; {_cells(self.remaining)} left "
                "(`retriever sweep CONFIG --resume` or `retriever quickstart` again finishes them)"
            )
        else:
            line = f"[sweep {self.name}] finished in {elapsed}: {self._counts()}"
        self._write(line + "\n")

    @contextlib.contextmanager
    def session(self) -> Iterator[SweepConsole]:
        """Around `Tuner.fit()`: the header, Tune's own output into `<sweep>/tune.log` (unless verbose), then the
        final counts."""
        self.header()
        tune_output = contextlib.nullcontext() if self.verbose else _tune_output_to(self.directory / TUNE_LOG)
        try:
            with tune_output:
                yield self
        finally:
            self.close()

    # ---------------------------------------------------------------------------------------------- Tune
    def callback(self) -> Callback:
        """The Ray Tune callback that feeds this console."""
        from ray.tune import Callback

        console = self

        class SweepConsoleCallback(Callback):
            def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
                console.refresh(trials)

            def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
                console.trial_started(trial)

            def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any) -> None:
                console.trial_reported(trial, result)

            def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
                console.trial_finished(trial)

            def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
                console.trial_failed(trial)

        return SweepConsoleCallback()

    def attach(self, tuner: Tuner, verbosity: int) -> None:
        """Use this console (and `verbosity`) in a restored Tuner, whose run config is the pickled original."""
        internal = getattr(tuner, "_local_tuner", None)  # None only under Ray Client
        if internal is not None:
            run_config = internal.get_run_config()
            run_config.callbacks = [self.callback()]
            run_config.verbose = verbosity

    def trainable(self, trainable: Callable[..., None]) -> Callable[..., None]:
        """`trainable` as the sweep runs it: unless verbose, its output goes to the cell's `trial.log`."""
        return trainable if self.verbose else output_to_cell_log(trainable)

    # ---------------------------------------------------------------------------------------------- internals
    def _counts(self) -> str:
        return f"{self.done}/{len(self.cells)} done, {self.failed} failed"

    @property
    def _width(self) -> int:
        return max(map(len, self.cells), default=0)

    def _running(self, trial: Trial) -> _Running:
        self.seen.add(trial.trial_id)
        if trial.trial_id not in self.running:
            self.running[trial.trial_id] = _Running(cell_name(trial.config), self.clock())
        return self.running[trial.trial_id]

    def _finish(self, trial: Trial) -> _Running | None:
        """The trial's running state, removed; None when its ending was counted already."""
        if trial.trial_id in self.seen and trial.trial_id not in self.running:
            return None
        self.seen.add(trial.trial_id)
        return self.running.pop(trial.trial_id, None) or _Running(cell_name(trial.config), self.clock())

    def _out(self) -> IO[str]:
        return self.stream or sys.stderr

    def _tty(self) -> bool:
        isatty = getattr(self._out(), "isatty", None)
        return bool(isatty and isatty())

    def _write(self, text: str) -> None:
        out = self._out()
        out.write(text)
        out.flush()

    def _clear(self) -> None:
        if self._tty() and self._drawn:
            self._write("\r\x1b[K")

    def _print(self, line: str) -> None:
        """A line of its own where the progress line was (the caller draws that again)."""
        self._clear()
        self._write(line + "\n")

    def cell_states(self) -> dict[str, int]:
        """Cells by state (`telemetry.SWEEP_CELLS`)."""
        running = len(self.running)
        return {
            "pending": max(0, self.remaining - running),
            "running": running,
            "done": self.done,
            "failed": self.failed,
        }

    def _update(self, force: bool = False) -> None:
        """Show the progress line: on a terminal redrawn in place (at once on `force`, else at most every
        `TTY_REFRESH_S`); elsewhere printed only on `force` (a cell started, finished or failed) while cells run.
        The cell counts go to the sweep's Prometheus gauge."""
        for state, count in self.cell_states().items():
            telemetry.record(telemetry.SWEEP_CELLS, count, sweep=self.name, state=state)
        if self._tty():
            now = self.clock()
            if force or now - self._drawn_at >= TTY_REFRESH_S:
                self._drawn = self.status_line(width=shutil.get_terminal_size().columns - 1)
                self._drawn_at = now
                self._write("\r\x1b[K" + self._drawn)
        elif force and self.running:
            self._write(self.status_line() + "\n")


@contextlib.contextmanager
def _tune_output_to(path: Path) -> Iterator[None]:
    """Tune's printed tables (stdout) and its log messages (logger `ray.tune`) appended to `path`."""
    tune_logger = logging.getLogger("ray.tune")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        propagate = tune_logger.propagate
        tune_logger.addHandler(handler)
        tune_logger.propagate = False
        try:
            yield
        finally:
            tune_logger.removeHandler(handler)
            tune_logger.propagate = propagate


def output_to_cell_log(trainable: Callable[..., None]) -> Callable[..., None]:
    """`trainable` with its process's stdout and stderr (file descriptors 1 and 2: prints, tqdm, warnings, C++
    messages) appended to its cell's `trial.log` while it runs, and its traceback there when it fails. The name
    stays `trainable`'s, so `Tuner.restore` accepts it for an experiment started without it."""

    @functools.wraps(trainable)
    def run(config: dict[str, Any], **parameters: Any) -> None:
        path = cell_log(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as log:
            log.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')} {cell_name(config)}\n")
            log.flush()
            with redirected_output(log):
                try:
                    trainable(config, **parameters)
                except Exception:  # not SystemExit: Tune ends a finished trial's thread with it
                    traceback.print_exc()
                    raise

    return run


@contextlib.contextmanager
def stage_output(path: Path, verbose: bool) -> Iterator[None]:
    """The output of a sweep stage that runs in this process (pre-training, baselines): appended to `path` unless
    `verbose`, so the console keeps to one line per result."""
    if verbose:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as log, redirected_output(log):
        yield


@contextlib.contextmanager
def redirected_output(target: IO[str]) -> Iterator[None]:
    """Inside the block, this process's output goes to `target`: `sys.stdout` and `sys.stderr`, and file descriptors
    1 and 2 (C++ messages, subprocesses, streams bound to them before)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [(fd, os.dup(fd)) for fd in (1, 2)]
    try:
        for fd, _ in saved:
            os.dup2(target.fileno(), fd)
        with contextlib.redirect_stdout(target), contextlib.redirect_stderr(target):
            yield
    finally:
        target.flush()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
