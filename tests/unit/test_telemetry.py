"""The metric registry and the recording contract (what each stage records is tested with the stage)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from retriever import telemetry


def test_metric_names_are_unique_and_exported_as_ray_names():
    names = [m.name for m in telemetry.METRICS]
    assert len(names) == len(set(names)) and all(n.startswith("retriever_") for n in names)
    assert telemetry.TRAIN_FLOPS.series == "ray_retriever_train_flops"
    assert telemetry.TRAIN_STEPS.series == "ray_retriever_train_steps_total"
    assert telemetry.TRAIN_STEP_SECONDS.series == "ray_retriever_train_step_seconds_bucket"
    assert telemetry.TRAIN_STEP_SECONDS.sample("count") == "ray_retriever_train_step_seconds_count"
    assert all(m.boundaries for m in telemetry.METRICS if m.kind == "histogram")
    with pytest.raises(AssertionError):
        telemetry.TRAIN_FLOPS.sample("sum")


def test_recording_takes_exactly_the_metric_tags():
    with pytest.raises(ValueError, match=r"takes the tags \('run',\)"):
        telemetry.record(telemetry.TRAIN_FLOPS, 1.0, cell="a")
    with pytest.raises(ValueError):
        telemetry.record(telemetry.TRAIN_LOSS, 1.0, run="a")


def test_outside_ray_recording_is_a_no_op_that_never_imports_ray():
    code = (
        "import sys\n"
        "from retriever import telemetry\n"
        "for m in telemetry.METRICS:\n"
        "    telemetry.record(m, 1.0, **{tag: 'x' for tag in m.tags})\n"
        "assert 'ray' not in sys.modules and not telemetry._created\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_counter_given_nothing_to_add_records_nothing(recorded_metrics):
    # Ray's counters refuse 0 (an empty encode call adds 0 texts).
    telemetry.record(telemetry.ENCODE_TEXTS, 0, kind="query")
    telemetry.record(telemetry.ENCODE_TEXTS, 3, kind="query")
    assert recorded_metrics.values["retriever_encode_texts"] == {(("kind", "query"),): [3]}
