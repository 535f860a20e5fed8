"""`retriever serve --sweep`: champions come from the sweep's MLflow registry; their index is built once and reused."""

from __future__ import annotations

import asyncio
import json

import pytest

from retriever.errors import SettingError
from retriever.serving.catalog import build_catalog
from retriever.serving.champions import SERVE_DIR, champion_config
from retriever.serving.local import LocalBackend
from retriever.serving.schema import SearchRequest
from retriever.serving.service import SearchService
from tests.conftest import make_config


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, serving_world):
    from mlflow.tracking import MlflowClient

    from retriever.tracking import tracking_uri

    root = tmp_path_factory.mktemp("champions")
    cfg = make_config(
        root,
        "champs",
        sweep={"paradigms": ["sparse"]},
        eval={"datasets": [serving_world["corpus"]], "passage_max_length": 48},
        tracking={"enabled": True, "experiment": "champs"},
    )
    sweep_dir = root / "sweeps" / "champs"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "sweep.json").write_text(json.dumps({"config": cfg.model_dump(mode="json")}))
    uri = tracking_uri(cfg.tracking, cfg.train.output_dir)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("champs", artifact_location=str(root / "artifacts"))
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(serving_world["sparse"]["encoder"]), "encoder")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("champs-sparse")
    version = client.create_model_version("champs-sparse", f"runs:/{run.info.run_id}/encoder", run.info.run_id)
    client.set_registered_model_alias("champs-sparse", "champion", version.version)
    client.set_model_version_tag("champs-sparse", version.version, "cell", "tiny-s__sparse__cl")
    return sweep_dir


def test_champions_are_fetched_indexed_once_and_served(sweep, serving_world) -> None:
    settings, uri = champion_config(sweep, overrides=["port=8321"])
    (model,) = settings.models
    assert (model.name, model.encoder, model.corpus, settings.port) == (
        "sparse",
        "models:/champs-sparse@champion",
        serving_world["corpus"],
        8321,
    )
    index = sweep / SERVE_DIR / "corpus"
    assert model.index.startswith(str(index)) and (index.parent / "models" / "champs-sparse" / "v1").is_dir()
    built = sorted(p.stat().st_mtime_ns for p in index.rglob("*") if p.is_file())
    again, _ = champion_config(sweep)
    assert again.models[0].index == model.index
    assert sorted(p.stat().st_mtime_ns for p in index.rglob("*") if p.is_file()) == built  # reused, not rebuilt

    served = build_catalog(settings, tracking_uri=uri, cache_dir=sweep / SERVE_DIR / "models")
    service = SearchService(LocalBackend(served), settings)
    hits = asyncio.run(service.search(SearchRequest(query="ray workers on the cluster", k=5, model="sparse"))).hits
    assert len(hits) == 5 and all(hit.docid in serving_world["docs"] for hit in hits)


def test_a_sweep_without_champions_says_how_to_get_them(sweep, tmp_path) -> None:
    state = json.loads((sweep / "sweep.json").read_text())
    state["config"]["sweep"]["paradigms"] = ["dense"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "sweep.json").write_text(json.dumps(state))
    with pytest.raises(SettingError, match=r"models:/champs-dense@champion: not in the registry"):
        champion_config(other)
