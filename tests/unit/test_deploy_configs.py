"""Cluster configs are validated offline: the launcher YAML against Ray's own schema, the KubeRay job's shape."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ray.autoscaler
import yaml
from jsonschema import validate

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_matches_the_ray_cluster_launcher_schema():
    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0")


def test_kuberay_rayjob_runs_the_sweep_entry_point():
    job = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayjob-sweep.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("python -m ray_jobs.sweep configs/paper.yaml")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    gpu = cluster["workerGroupSpecs"][0]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "4"
