"""Cluster configs are validated offline: the launcher YAML against Ray's own schema, the KubeRay job's shape."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ray.autoscaler
import yaml
from jsonschema import validate

ROOT = Path(__file__).resolve().parents[2]


KUBERAY = ROOT / "deploy" / "kuberay"
IMAGE = "retriever:0.1.0"  # the tag deploy/Dockerfile documents
SHARED = "/mnt/shared"
# The GPU node types of cluster.yaml: instance type -> (the custom resource its workers advertise, GPUs).
GPU_NODES = {"p4d.24xlarge": ("A100_40G", 8), "p4de.24xlarge": ("A100_80G", 8), "p5.48xlarge": ("H100_80G", 8)}


def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def kubernetes_objects() -> list[dict]:
    return [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_cluster_yaml_matches_the_ray_cluster_launcher_schema():
    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())
    config = cluster_config()
    validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0")


def test_cluster_yaml_installs_this_folder_sizes_gpu_workers_and_shares_storage():
    config = cluster_config()
    # Installed from the synced working directory, never from a URL.
    ((target, source),) = config["file_mounts"].items()
    assert source == "."
    assert any(f'pip install --no-cache-dir "{target}[gpu,serve,seismic]"' in c for c in config["setup_commands"])
    assert not any("git+" in c or "http" in c for c in config["setup_commands"])
    # GPU worker types for 1B/3B (A100 40 GB) and 8B (A100 80 GB, H100 80 GB), autoscaled from zero.
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    assert {t["node_config"]["InstanceType"] for t in workers.values()} == set(GPU_NODES)
    for node_type in workers.values():
        resource, gpus = GPU_NODES[node_type["node_config"]["InstanceType"]]
        assert node_type["resources"] == {resource: gpus}
        assert 0 == node_type["min_workers"] < node_type["max_workers"] <= config["max_workers"]
    # One shared file system on every node: mounted on the host, visible in the container, holding MLflow.
    assert any(f" {SHARED}" in c and "mount -t nfs4" in c for c in config["initialization_commands"])
    assert f"-v {SHARED}:{SHARED}" in config["docker"]["run_options"]
    mlflow = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    assert "--serve-artifacts" in mlflow and f"--artifacts-destination {SHARED}/mlflow/artifacts" in mlflow
    assert f"sqlite:///{SHARED}/mlflow/mlflow.db" in mlflow
    head = next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)
    assert "--dashboard-host=127.0.0.1" in head  # the job API runs code: loopback, reached through `ray dashboard`


def test_the_image_is_the_launchers_ray_with_this_project_installed():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"FROM {cluster_config()['docker']['image']}\n" in dockerfile
    assert "COPY --chown=ray:users . /home/ray/retriever" in dockerfile
    assert 'pip install --no-cache-dir "/home/ray/retriever[gpu,serve,seismic]"' in dockerfile
    assert f"{IMAGE} ." in dockerfile  # the build command names the tag the manifests use


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(group name, pod template) of every pod a KubeRay object or Deployment makes."""
    spec = obj["spec"]
    if obj["kind"] == "Deployment":
        return [("deployment", spec["template"])]
    if obj["kind"] == "RayJob":
        return [("submitter", spec["submitterPodTemplate"])]
    cluster = spec["rayClusterConfig"] if obj["kind"] == "RayService" else spec
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, group["template"]) for name, group in groups]


def test_kubernetes_objects_are_complete_and_share_one_image_and_volume():
    objects = kubernetes_objects()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["Deployment", "PersistentVolumeClaim", "RayCluster", "RayJob", "RayService", "Service"]
    for obj in objects:
        assert obj["apiVersion"] in {"v1", "apps/v1", "ray.io/v1"} and obj["metadata"]["name"]
    (claim,) = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node reads and writes it
    for obj in objects:
        if obj["kind"] in {"PersistentVolumeClaim", "Service"}:
            continue
        for group, template in pod_templates(obj):
            where = f"{obj['kind']} {obj['metadata']['name']} {group}"
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            for container in template["spec"]["containers"]:
                assert container["image"] == IMAGE, where
                resources = container["resources"]
                assert resources["requests"] == resources["limits"], where  # guaranteed: no eviction mid-run
                if group == "submitter":
                    continue
                (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == SHARED]
                assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], where


def test_the_ray_cluster_scales_the_gpu_node_types_of_the_launcher_config():
    objects = kubernetes_objects()
    (cluster,) = [o for o in objects if o["kind"] == "RayCluster"]
    spec = cluster["spec"]
    assert spec["rayVersion"] == "2.60.0" and spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # the job API is not exposed outside the cluster
    launcher = {resource: gpus for resource, gpus in GPU_NODES.values()}
    advertised = {}
    for group in spec["workerGroupSpecs"]:
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        resources = json.loads(json.loads(group["rayStartParams"]["resources"]))
        (container,) = group["template"]["spec"]["containers"]
        for name, count in resources.items():
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == count
            advertised[name] = count
    assert advertised == launcher


def test_the_ray_job_runs_the_sweep_on_that_cluster_with_mlflow_and_shared_outputs():
    from retriever.cli import build_parser
    from retriever.config import load_config

    objects = kubernetes_objects()
    (job,) = [o for o in objects if o["kind"] == "RayJob"]
    (cluster,) = [o for o in objects if o["kind"] == "RayCluster"]
    (mlflow,) = [o for o in objects if o["kind"] == "Service"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    command = job["spec"]["entrypoint"].split()
    assert command[:3] == ["python", "-m", "ray_jobs.sweep"]
    args = build_parser().parse_args(["sweep", *command[3:]])
    # The config ships in the image at /home/ray/retriever (deploy/Dockerfile); outputs go to the shared volume.
    config = load_config(ROOT / Path(args.config).relative_to("/home/ray/retriever"), args.overrides)
    assert config.train.output_dir.startswith(f"{SHARED}/")
    assert config.train.storage.startswith(f"file://{SHARED}/")  # checkpoints every node finds (several nodes)
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    port = mlflow["spec"]["ports"][0]["port"]
    assert env["MLFLOW_TRACKING_URI"] == f"http://{mlflow['metadata']['name']}:{port}"


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
