"""The several-nodes scenario of `test_multinode.py`, run as a script in a process group of its own (the test kills
the group when it ends, whatever happened here):

    python tests/integration/multinode_run.py SPEC.json

A `ray.cluster_utils.Cluster` on this machine (a head and two worker nodes, each with its own logical CPUs and one
`trainer_slot`); a run without `train.storage` is refused; then the 2-worker run of SPEC's config trains in a
thread while this (main) thread watches where its workers are placed, waits until Ray has committed a checkpoint
that verifies, removes one worker node and adds a fresh one. Everything seen goes to SPEC's `result` file as JSON.
Nodes are added and removed on the main thread: Ray installs signal handlers for each node it starts.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

SLOT = "trainer_slot"  # one per worker node: two workers can only run on two different nodes
# Ray Train's record of the checkpoints it registered (all ranks reported), rewritten on each registration.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def placements(names: dict[str, str]) -> list[list[str]]:
    """The nodes (by name) of each placed bundle of every created placement group that holds trainer slots."""
    from ray.util import placement_group_table

    placed = []
    for group in placement_group_table().values():
        if group["state"] != "CREATED" or not any(SLOT in b for b in group["bundles"].values()):
            continue
        placed.append([names.get(node, node) for _, node in sorted(group["bundles_to_node_id"].items())])
    return placed


def committed_checkpoints(experiment: Path) -> list[str]:
    """The checkpoint folders that Ray has registered (named in its snapshot) and that verify, newest first."""
    from retriever.train.checkpoint import verify_checkpoint

    try:
        snapshot = (experiment / RAY_SNAPSHOT).read_text()
    except OSError:  # not written yet
        return []
    names = sorted(set(re.findall(r"checkpoint_[0-9][0-9_.:-]*[0-9]", snapshot)), reverse=True)
    return [n for n in names if (experiment / n).is_dir() and verify_checkpoint(experiment / n) is None]


def train(config: Path, outcome: dict[str, Any]) -> None:
    from retriever.config import load_config
    from retriever.train.trainer import run_training

    try:
        outcome["result"] = run_training(load_config(config))
    except BaseException:  # the main thread reports it
        outcome["error"] = traceback.format_exc()


def scenario(spec: dict[str, Any], cluster: Any, report: dict[str, Any]) -> None:
    import ray
    from ray.data import DataContext

    from retriever.config import load_config
    from retriever.errors import SettingError
    from retriever.train.trainer import run_training

    workers = [cluster.add_node(num_cpus=1, resources={SLOT: 1}) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=True, configure_logging=False)
    DataContext.get_current().enable_progress_bars = False  # the log shows on failure: keep it readable
    names = {cluster.head_node.node_id: "head", **{w.node_id: f"worker-{i}" for i, w in enumerate(workers)}}
    report["alive_nodes"] = sum(1 for node in ray.nodes() if node["Alive"])

    started = time.monotonic()
    try:
        run_training(load_config(spec["unshared_config"]))
    except SettingError as exc:
        report["refused"] = str(exc)
    report["refused_after_s"] = round(time.monotonic() - started, 1)

    outcome: dict[str, Any] = {}
    trainer = threading.Thread(target=train, args=(Path(spec["config"]), outcome), daemon=True)
    trainer.start()
    seen: list[list[str]] = []
    deadline = time.monotonic() + spec["timeout_s"]

    def watch(until: Callable[[], Any]) -> Any:
        """Record placements every 0.2 s until `until()` gives something, training ends or time runs out."""
        while time.monotonic() < deadline and trainer.is_alive():
            for placed in placements(names):
                if placed not in seen:
                    seen.append(placed)
            found = until()
            if found:
                return found
            time.sleep(0.2)
        return None

    experiment = Path(spec["experiment_dir"])
    report["committed_before_removal"] = watch(lambda: next(iter(committed_checkpoints(experiment)), None))
    if report["committed_before_removal"] is not None:
        cluster.remove_node(workers[0])
        report["removed"] = "worker-0"
        replacement = cluster.add_node(num_cpus=1, resources={SLOT: 1})
        names[replacement.node_id] = "replacement"
        report["replaced_after_s"] = round(time.monotonic() - started, 1)
        watch(lambda: None)
    trainer.join(max(0.0, deadline - time.monotonic()))
    report["placements"] = seen
    report["training_finished"] = not trainer.is_alive()
    report.update(outcome)
    report["wall_s"] = round(time.monotonic() - started, 1)


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import ray
    from ray.cluster_utils import Cluster

    report: dict[str, Any] = {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        scenario(spec, cluster, report)
    except BaseException:
        report["error"] = traceback.format_exc()
    finally:
        Path(spec["result"]).write_text(json.dumps(report, indent=2))
        ray.shutdown()
        cluster.shutdown()
    return 0 if "result" in report else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
