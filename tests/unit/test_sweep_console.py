"""The sweep console (`retriever.sweep.console`) driven by fake trials and a fake clock, without a Ray cluster."""

from __future__ import annotations

import io
import logging
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from retriever.config import ExperimentConfig
from retriever.sweep.console import SweepConsole, format_duration, output_to_cell_log

METRIC = "eval/synthetic/test/ndcg_at_10"
CELLS = ["tiny-s dense cl", "tiny-s dense kd", "tiny-s dense cl+kd"]  # the widest name has 18 characters


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@dataclass
class FakeTrial:
    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)
    status: str = "RUNNING"
    pickled_error_file: str | None = None


def trial(root: Path, trial_id: str, loss: str) -> FakeTrial:
    config = {"sweep_dir": str(root), "backbone": "tiny-s", "paradigm": "dense", "loss": loss}
    return FakeTrial(trial_id, config)


def make_console(root: Path, stream: io.StringIO, clock: Clock, **kwargs: Any) -> SweepConsole:
    return SweepConsole(
        name="demo",
        cells=CELLS,
        concurrency=2,
        metric_key=METRIC,
        metric_label="nDCG@10",
        directory=root,
        stream=stream,
        clock=clock,
        **kwargs,
    )


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0s"), (41.4, "41s"), (59.6, "1m00s"), (252, "4m12s"), (3725, "1h02m")]
)
def test_durations_read_as_seconds_minutes_and_hours(seconds, shown):
    assert format_duration(seconds) == shown


def test_a_pipe_gets_a_status_line_when_a_cell_starts_or_ends_and_a_line_per_finished_cell(tmp_path):
    out, clock = io.StringIO(), Clock()
    console = make_console(tmp_path, out, clock)
    cl, kd = trial(tmp_path, "a", "cl"), trial(tmp_path, "b", "kd")

    console.trial_started(cl)
    console.trial_reported(cl, {"step": 12, "budget_fraction": 0.4, "flops": 3e11})  # no line: nothing started/ended
    clock.now = 5
    console.trial_started(kd)
    clock.now = 41
    cl.last_result = {"step": 30, "done": 1, "flops": 1.2e12, METRIC: 0.61234}
    console.trial_finished(cl)

    assert lines(out) == [
        "[sweep demo] 0/3 done, 0 failed | running: tiny-s dense cl (starting) | 0s elapsed, ETA --",
        "[sweep demo] 0/3 done, 0 failed | running: tiny-s dense cl (12 steps, 40%), tiny-s dense kd (starting)"
        " | 5s elapsed, ETA --",
        "✓ tiny-s dense cl     nDCG@10 0.612  1.2e12 FLOPs  41s",
        # ETA: 41 s a cell x 2 cells left / 2 at a time
        "[sweep demo] 1/3 done, 0 failed | running: tiny-s dense kd (starting) | 41s elapsed, ETA 41s",
    ]


def test_a_failed_cell_shows_its_error_and_its_log_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, clock = io.StringIO(), Clock()
    console = make_console(tmp_path, out, clock)
    kd = trial(tmp_path, "b", "kd")
    error_file = tmp_path / "error.pkl"
    error_file.write_bytes(pickle.dumps(ValueError("no full batch\nof 16 rows")))
    kd.pickled_error_file = str(error_file)

    console.trial_started(kd)
    clock.now = 3
    console.trial_failed(kd)

    assert lines(out)[1:] == [  # and no status line while no cell runs
        "✗ tiny-s dense kd     failed: ValueError: no full batch  (log: cells/tiny-s__dense__kd/trial.log)",
    ]


def test_a_failure_without_a_readable_error_is_still_reported(tmp_path):
    out = io.StringIO()
    console = make_console(tmp_path, out, Clock(), verbose=True)  # verbose: Tune prints the traceback itself
    console.trial_failed(trial(tmp_path, "b", "kd"))
    assert lines(out)[0] == "✗ tiny-s dense kd     failed: unknown error"


def test_a_cell_without_the_metric_shows_n_a(tmp_path):
    out = io.StringIO()
    console = make_console(tmp_path, out, Clock())
    cl = trial(tmp_path, "a", "cl")
    cl.last_result = {"flops": 2.5e12}  # e.g. stopped by the Tune-side FLOP stopper before evaluation
    console.trial_finished(cl)
    assert lines(out)[0] == "✓ tiny-s dense cl     nDCG@10 n/a  2.5e12 FLOPs  0s"


def test_the_eta_is_the_mean_cell_time_times_the_cells_left_over_the_cells_run_at_once(tmp_path):
    out, clock = io.StringIO(), Clock()
    console = make_console(tmp_path, out, clock)
    assert console.eta() is None  # no cell finished yet
    for trial_id, loss, seconds in (("a", "cl", 30), ("b", "kd", 90)):
        cell = trial(tmp_path, trial_id, loss)
        console.trial_started(cell)
        clock.now += seconds
        console.trial_finished(cell)
    assert console.eta() == 60  # mean 60 s x 1 cell left / min(2 at a time, 1 left)
    assert console.status_line().endswith("| 2m00s elapsed, ETA 1m00s")

    last = trial(tmp_path, "c", "cl+kd")
    console.trial_started(last)
    clock.now += 45
    console.trial_finished(last)
    console.close()
    assert console.eta() == 0 and console.status_line() == "[sweep demo] 3/3 done, 0 failed | 2m45s elapsed"
    assert lines(out)[-3:] == [
        "[sweep demo] 2/3 done, 0 failed | running: tiny-s dense cl+kd (starting) | 2m00s elapsed, ETA 1m00s",
        "✓ tiny-s dense cl+kd  nDCG@10 n/a  45s",
        "[sweep demo] finished in 2m45s: 3/3 done, 0 failed",
    ]


def test_a_terminal_gets_one_line_redrawn_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.get_terminal_size", lambda: os.terminal_size((200, 50)))
    out, clock = Terminal(), Clock()
    console = make_console(tmp_path, out, clock)
    cl = trial(tmp_path, "a", "cl")

    console.trial_started(cl)
    clock.now = 0.5
    console.trial_reported(cl, {"step": 3, "budget_fraction": 0.1})  # within a second of the last draw: not drawn
    clock.now = 1.5
    console.trial_reported(cl, {"step": 7, "budget_fraction": 0.2})
    clock.now = 2
    cl.last_result = {"flops": 1.2e12, METRIC: 0.5}
    console.trial_finished(cl)
    console.close()

    assert out.getvalue().split("\r\x1b[K") == [
        "",
        "[sweep demo] 0/3 done, 0 failed | running: tiny-s dense cl (starting) | 0s elapsed, ETA --",
        "[sweep demo] 0/3 done, 0 failed | running: tiny-s dense cl (7 steps, 20%) | 2s elapsed, ETA --",
        "✓ tiny-s dense cl     nDCG@10 0.500  1.2e12 FLOPs  2s\n",
        "[sweep demo] 1/3 done, 0 failed | 2s elapsed, ETA 2s",
        "[sweep demo] stopped after 2s: 1/3 done, 0 failed; 2 cells left (`retriever sweep CONFIG --resume` or "
        "`retriever quickstart` again finishes them)\n",
    ]


def test_a_narrow_terminal_drops_the_activities_then_the_names(tmp_path):
    console = make_console(tmp_path, io.StringIO(), Clock())
    console.trial_started(trial(tmp_path, "a", "cl"))
    console.trial_started(trial(tmp_path, "b", "kd"))
    full = console.status_line()
    assert "tiny-s dense cl (starting), tiny-s dense kd (starting)" in full
    assert console.status_line(width=len(full)) == full
    names = console.status_line(width=len(full) - 1)
    assert "running: tiny-s dense cl, tiny-s dense kd |" in names
    assert "running: 2 cells |" in console.status_line(width=len(names) - 1)
    assert console.status_line(width=20) == "[sweep demo] 0/3 do…"


def test_cells_that_ended_in_an_earlier_run_are_counted_once(tmp_path):
    out = io.StringIO()
    console = make_console(tmp_path, out, Clock())
    done, failed, pending = trial(tmp_path, "a", "cl"), trial(tmp_path, "b", "kd"), trial(tmp_path, "c", "cl+kd")
    done.status, failed.status, pending.status = "TERMINATED", "ERROR", "PENDING"
    for _ in range(2):
        console.refresh([done, failed, pending])
    console.trial_finished(done)  # Tune does not call this for restored trials; were it called, it counts once
    assert (console.done, console.failed, console.remaining) == (1, 1, 1)
    assert out.getvalue() == ""  # a pipe gets no line for the clock alone


def test_the_console_of_a_config_names_its_grid_and_primary_metric(tmp_path):
    cfg = ExperimentConfig.model_validate(
        {
            "name": "grid",
            "eval": {"datasets": ["synthetic/test"]},
            "sweep": {"backbones": ["tiny-s", "tiny-m"], "paradigms": ["sparse"], "losses": ["cl", "cl+kd"]},
        }
    )
    console = SweepConsole.for_sweep(cfg, tmp_path, 2)
    assert console.cells == ["tiny-s sparse cl", "tiny-s sparse cl+kd", "tiny-m sparse cl", "tiny-m sparse cl+kd"]
    assert console.metric_key == METRIC and console.metric_label == "nDCG@10"


def test_the_session_prints_where_files_go_and_sends_tunes_output_to_tune_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs" / "sweeps" / "demo"
    out = io.StringIO()
    console = make_console(root, out, Clock())
    with console.session():
        print("Trial status: 1 RUNNING")  # Tune prints its tables
        logging.getLogger("ray.tune.tune").warning("Trials did not complete")
    assert lines(out) == [
        "sweep demo: 3 cells, up to 2 at a time",
        "  sweep folder: runs/sweeps/demo",
        "  Tune's tables and log: runs/sweeps/demo/tune.log (results per trial: tune/)",
        "  each cell's output: cells/<cell>/trial.log   (--verbose shows it all here)",
        "[sweep demo] stopped after 0s: 0/3 done, 0 failed; 3 cells left (`retriever sweep CONFIG --resume` or "
        "`retriever quickstart` again finishes them)",
    ]
    log = (root / "tune.log").read_text()
    assert "Trial status: 1 RUNNING" in log and "WARNING ray.tune.tune: Trials did not complete" in log
    assert logging.getLogger("ray.tune").propagate and not logging.getLogger("ray.tune").handlers


def test_the_tune_callback_feeds_the_console_and_pickles_without_its_stream(tmp_path):
    from ray import cloudpickle

    out, clock = io.StringIO(), Clock()
    console = make_console(tmp_path, out, clock)
    callback = console.callback()
    cl = trial(tmp_path, "a", "cl")
    callback.on_trial_start(iteration=1, trials=[cl], trial=cl)
    callback.on_trial_result(iteration=2, trials=[cl], trial=cl, result={"step": 4})
    cl.last_result = {"flops": 1e12, METRIC: 0.25}
    callback.on_trial_complete(iteration=3, trials=[cl], trial=cl)
    callback.on_step_begin(iteration=4, trials=[cl])
    assert lines(out)[1] == "✓ tiny-s dense cl     nDCG@10 0.250  1.0e12 FLOPs  0s"
    assert console.done == 1
    # Tune pickles its callbacks into tuner.pkl
    assert cloudpickle.loads(cloudpickle.dumps(callback)) is not None
    assert pickle.loads(pickle.dumps(console)).stream is None


def test_a_trials_output_and_traceback_go_to_its_cell_log(tmp_path, capfd):
    def run_cell(config: dict[str, Any]) -> None:
        print("from python")
        sys.stderr.write("tqdm bar\n")
        os.write(2, b"from the file descriptor\n")
        raise RuntimeError("injected failure at step 2")

    wrapped = output_to_cell_log(run_cell)
    assert wrapped.__name__ == "run_cell"  # Tuner.restore checks the trainable's name
    config = {"sweep_dir": str(tmp_path), "backbone": "tiny-s", "paradigm": "dense", "loss": "kd"}
    with pytest.raises(RuntimeError):
        wrapped(config)
    print("after the trial")

    log = (tmp_path / "cells" / "tiny-s__dense__kd" / "trial.log").read_text()
    assert log.startswith("=== ") and log.splitlines()[0].endswith(" tiny-s dense kd")
    for text in ("from python", "tqdm bar", "from the file descriptor", "RuntimeError: injected failure at step 2"):
        assert text in log
    captured = capfd.readouterr()
    assert captured.out == "after the trial\n" and captured.err == ""


def test_the_console_publishes_the_cells_by_state(tmp_path, recorded_metrics):
    console = make_console(tmp_path, io.StringIO(), Clock())
    cl, kd = trial(tmp_path, "a", "cl"), trial(tmp_path, "b", "kd")
    console.trial_started(cl)
    console.trial_started(kd)
    assert console.cell_states() == {"pending": 1, "running": 2, "done": 0, "failed": 0}
    console.trial_finished(cl)
    console.trial_failed(kd)
    assert console.cell_states() == {"pending": 1, "running": 0, "done": 1, "failed": 1}
    gauges = recorded_metrics.values["retriever_sweep_cells"]
    assert {dict(tags)["state"]: values[-1] for tags, values in gauges.items()} == console.cell_states()
    assert {dict(tags)["sweep"] for tags in gauges} == {"demo"}
