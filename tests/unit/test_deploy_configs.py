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


def _serve_schema():
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema


def _check_application_args(args: dict) -> None:
    from retriever.config import ServeConfig, config_from_dict

    args = dict(args)
    args.pop("tracking_uri", None)
    args.pop("cache_dir", None)
    config_from_dict(args, "application args", model=ServeConfig)


def test_kuberay_rayservice_serves_a_valid_serve_config():
    service = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice-search.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    _serve_schema().model_validate(serve_config)
    (app,) = serve_config["applications"]
    assert app["import_path"] == "retriever.serving.deployments:app_builder"
    _check_application_args(app["args"])
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    env = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "RETRIEVER_TOKEN", "valueFrom": {"secretKeyRef": {"name": "retriever-api", "key": "token"}}} in env


def test_serve_deploy_config_is_accepted_by_serve(serving_world, tmp_path):
    """`retriever serve --deploy-config` writes what `serve deploy` takes: ServeDeploySchema accepts it, its args are
    a valid serve config and every deployment it names exists in the application."""
    from retriever.cli import main

    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "name": "sparse",
                        "encoder": str(serving_world["sparse"]["encoder"]),
                        "index": str(serving_world["sparse"]["index3"]),
                    },
                    {
                        "name": "dense",
                        "encoder": str(serving_world["dense"]["encoder"]),
                        "index": str(serving_world["dense"]["index"]),
                    },
                ],
            }
        )
    )
    out = tmp_path / "deploy.yaml"
    assert main(["serve", str(config), "--set", "port=8123", "--deploy-config", str(out)]) == 0
    written = yaml.safe_load(out.read_text())
    _serve_schema().model_validate(written)
    assert written["http_options"] == {"host": "127.0.0.1", "port": 8123, "request_timeout_s": 30.0}
    (app,) = written["applications"]
    _check_application_args(app["args"])
    names = [d["name"] for d in app["deployments"]]
    assert names == [
        "QueryEncoder",
        "sparse--shard-00000",
        "sparse--shard-00001",
        "sparse--shard-00002",
        "dense--shard-00000",
        "Router",
    ]
    assert all(d["autoscaling_config"]["max_replicas"] >= 1 for d in app["deployments"])
    # The encoder's resources are left to the application (a GPU when the cluster has one): YAML options replace them.
    assert "ray_actor_options" not in app["deployments"][0]
    assert all(Path(m["index"]).is_absolute() and Path(m["encoder"]).is_absolute() for m in app["args"]["models"])
