"""Several nodes (`ray.cluster_utils.Cluster` on this machine: a head and two worker nodes, one `trainer_slot` each):
a run without `train.storage` is refused before anything is built; a 2-worker run places one worker per node and
checkpoints to `train.storage` (a `file://` URI: the simulated nodes share this disk); a worker node removed after
the first committed checkpoint and a fresh node added back, the run resumes from that checkpoint, ends at its FLOP
budget with every step counted once, and leaves no process of the cluster behind.

The scenario runs in `multinode_run.py`, in a process group of its own with its own Ray temp dir (so neither the
cluster's address file nor its processes mix with another Ray on this machine), under a hard timeout; the group is
killed if it overruns, and the test checks that no process of that cluster remains (and kills any that does).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import SMALL_SWEEP_EXPERIMENT, merged, stop_group
from tests.integration.multinode_run import committed_checkpoints

SCENARIO = Path(__file__).with_name("multinode_run.py")
SCENARIO_TIMEOUT_S = 420  # the whole script, cluster start and shutdown included; about 100 s on 2 idle cores
PLANNED_STEPS = 8
LEFTOVER_GRACE_S = 20

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(SCENARIO_TIMEOUT_S + 120)]


def cluster_processes(ray_tmpdir: Path) -> list[psutil.Process]:
    """Live processes of the cluster whose temp dir is `ray_tmpdir`: the scenario's environment, which every Ray
    process it starts inherits (their command lines are rewritten to `ray::...`, their environment is not)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.environ().get("RAY_TMPDIR") == str(ray_tmpdir):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def outliving(ray_tmpdir: Path, grace_s: float) -> list[str]:
    """The processes of the cluster still alive `grace_s` after the scenario ended, killed; as "pid name".

    Ray's workers and actors run in process groups of their own and exit once their node's raylet is gone, so they
    get a grace period; whatever is left after it is a leak.
    """
    deadline = time.monotonic() + grace_s
    while cluster_processes(ray_tmpdir) and time.monotonic() < deadline:
        time.sleep(0.5)
    killed = []
    for proc in cluster_processes(ray_tmpdir):
        with contextlib.suppress(psutil.Error):
            killed.append(f"{proc.pid} {proc.name()}")
            proc.kill()
    return killed


def experiment(root: Path) -> dict:
    """The small dense experiment on two Ray workers that each need a node's `trainer_slot`, checkpointing every 2
    steps to the shared `file://` storage; FLOP budget for `PLANNED_STEPS` steps (set by the caller)."""
    return merged(
        SMALL_SWEEP_EXPERIMENT,
        {
            "name": "multinode",
            "train": {
                "output_dir": str(root / "runs"),
                "storage": f"file://{root}/shared",
                "num_workers": 2,
                "cpus_per_worker": 0.5,
                "worker_resources": {"trainer_slot": 1},
                "strategy": "ddp",
                "max_failures": 2,
                "checkpoint_every": 2,
                "log_every": 1,
            },
        },
    )


@pytest.fixture(scope="module")
def scenario():
    from retriever.config import config_from_dict
    from retriever.data.catalog import resolve_references
    from retriever.flops import plan_cell

    root = Path(tempfile.mkdtemp(prefix="rmn", dir="/tmp"))  # short: Ray's socket paths have a length limit
    data = experiment(root)
    per_step = plan_cell(resolve_references(config_from_dict(data))).flops_per_step
    data["budget"] = {"flops": per_step * (PLANNED_STEPS + 0.5)}
    assert plan_cell(resolve_references(config_from_dict(data))).steps == PLANNED_STEPS
    (root / "multinode.yaml").write_text(yaml.safe_dump(data))
    unshared = merged(data, {"name": "unshared", "train": {"output_dir": str(root / "unshared")}})
    del unshared["train"]["storage"]
    (root / "unshared.yaml").write_text(yaml.safe_dump(unshared))
    spec = {
        "config": str(root / "multinode.yaml"),
        "unshared_config": str(root / "unshared.yaml"),
        "experiment_dir": str(root / "shared" / "multinode-retrieval"),
        "result": str(root / "result.json"),
        "timeout_s": SCENARIO_TIMEOUT_S - 90,  # training; the rest is for starting and stopping the cluster
    }
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "RAY_TMPDIR": str(root / "ray"), "RAY_DEDUP_LOGS": "1"}
    env.pop("RAY_ADDRESS", None)
    log = root / "scenario.log"
    process = subprocess.Popen(
        [sys.executable, str(SCENARIO), str(root / "spec.json")],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        try:
            process.wait(timeout=SCENARIO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop_group(process)
        leftovers = outliving(root / "ray", LEFTOVER_GRACE_S)
        report = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).is_file() else {}
        yield {
            "root": root,
            "per_step": per_step,
            "report": report,
            "returncode": process.returncode,
            "log": log.read_text(errors="replace")[-6000:],
            "leftovers": leftovers,
        }
    finally:  # also when the fixture itself failed
        if process.poll() is None:
            stop_group(process)
        outliving(root / "ray", 0)
        shutil.rmtree(root, ignore_errors=True)


def test_a_run_over_several_nodes_without_shared_storage_is_refused_before_it_starts(scenario):
    report, root = scenario["report"], scenario["root"]
    assert report.get("alive_nodes") == 3, scenario["log"]
    assert report["refused"].startswith(
        f"train.storage is not set: checkpoints would go to {root}/unshared/ray on each node's own disk, which a run "
        "over 3 nodes cannot share"
    )
    assert "set train.storage to s3://bucket/path, gs://bucket/path, or file:///path" in report["refused"]
    assert not (root / "unshared").exists()  # no data, tracking store or run folder was made for it


def test_a_node_lost_mid_run_resumes_on_a_fresh_node_from_the_shared_checkpoint(scenario):
    from mlflow.tracking import MlflowClient

    from retriever.train.checkpoint import Progress

    report, root = scenario["report"], scenario["root"]
    assert scenario["returncode"] == 0 and "result" in report, report.get("error") or scenario["log"]
    result = report["result"]
    # One worker per node: each placement group of the run (before and after the loss) spans two worker nodes.
    assert report["placements"][0] in (["worker-0", "worker-1"], ["worker-1", "worker-0"])
    assert sorted(report["placements"][-1]) == ["replacement", "worker-1"]
    assert all(len(set(nodes)) == 2 and "head" not in nodes for nodes in report["placements"])
    # The node went after a checkpoint was committed, and the run continued from one, in the shared storage.
    experiment_dir = root / "shared" / "multinode-retrieval"
    assert report["removed"] == "worker-0" and report["committed_before_removal"]
    assert 0 < result["resumed_from_step"] < PLANNED_STEPS and result["resumed_from_step"] % 2 == 0
    assert result["resumed_from"].startswith(f"{experiment_dir}/checkpoint_")
    assert not result["skipped_checkpoints"]
    # The run's final checkpoint, as Ray registered it, is there too.
    (latest, *_) = committed_checkpoints(experiment_dir)
    assert Progress.read(experiment_dir / latest).step == PLANNED_STEPS
    assert not (root / "runs" / "ray").exists()  # not the one-node default
    # Stopped at the FLOP budget, each step's FLOPs counted once (steps redone after the loss are not added again).
    assert result["stopped_by"] == "budget" and result["steps"] == result["planned_steps"] == PLANNED_STEPS
    assert result["flops"] == PLANNED_STEPS * scenario["per_step"]
    client = MlflowClient(f"sqlite:///{root}/runs/mlflow.db")
    logged = sorted(m.step for m in client.get_metric_history(result["tracking_run_id"], "flops"))
    assert logged == list(range(1, PLANNED_STEPS + 1))  # every step once, none twice
    run = client.get_run(result["tracking_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == str(result["resumed_from_step"])
    # The export still goes to train.output_dir on rank 0.
    assert result["export_dir"] == str(root / "runs" / "multinode" / "encoder")
    assert (root / "runs" / "multinode" / "encoder" / "encoder.json").is_file()


def test_no_process_of_the_cluster_outlives_the_scenario(scenario):
    assert scenario["leftovers"] == []
    assert not cluster_processes(scenario["root"] / "ray")
