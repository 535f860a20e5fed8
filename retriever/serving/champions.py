"""What `retriever serve --sweep DIR` serves: the champion encoder of each paradigm from the sweep's MLflow registry
(`models:/<experiment>-<paradigm>@champion`) with the index of a corpus (the sweep's evaluation corpus by default),
reused when the sweep's evaluation already built it, else encoded and indexed once under `<sweep>/serve/`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retriever.config import ServeConfig, config_from_dict
from retriever.errors import SettingError
from retriever.records import CELLS_DIR, EVAL_DIR, SWEEP_STATE_FILE, read_sweep_state
from retriever.serving.catalog import MODEL_URI_PREFIX, fetch_model_uri

CHAMPION_ALIAS = "champion"
SERVE_DIR = "serve"


def champion_config(
    sweep_dir: str | Path, corpus: str | None = None, overrides: list[str] | None = None
) -> tuple[ServeConfig, str]:
    """The serve config of a sweep's champions and the tracking URI of their registry. Models are named after their
    paradigm (`sparse`, `dense`); the encoder entries stay `models:/` URIs (fetched into `<sweep>/serve/models`)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from retriever.data.catalog import resolve_dataset
    from retriever.pipeline import corpus_index
    from retriever.tracking import tracking_uri

    sweep_dir = Path(sweep_dir).resolve()
    state = read_sweep_state(sweep_dir)
    cfg = config_from_dict(state["config"], f"{sweep_dir / SWEEP_STATE_FILE}: 'config'")
    if not cfg.tracking.enabled:
        raise SettingError(
            f"{sweep_dir}: the sweep ran without MLflow tracking, so it registered no champions; serve its encoders "
            "with `retriever serve CONFIG` (a serve config naming encoder and index folders)"
        )
    uri = tracking_uri(cfg.tracking, cfg.train.output_dir)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    dataset = corpus or cfg.eval.datasets[0]
    source_id = resolve_dataset(dataset, cfg)
    models: list[dict[str, Any]] = []
    for paradigm in cfg.sweep.paradigms:
        registered = f"{cfg.tracking.experiment}-{paradigm}"
        model_uri = f"{MODEL_URI_PREFIX}{registered}@{CHAMPION_ALIAS}"
        try:
            version = client.get_model_version_by_alias(registered, CHAMPION_ALIAS)
        except MlflowException:
            raise SettingError(
                f"{model_uri}: not in the registry at {uri}; the sweep registers its champions when it finishes "
                f"(`retriever report {sweep_dir}` registers them for a finished sweep)"
            ) from None
        encoder_dir = fetch_model_uri(model_uri, uri, sweep_dir / SERVE_DIR / "models")
        cell = (version.tags or {}).get("cell")
        reuse = [sweep_dir / CELLS_DIR / cell / EVAL_DIR] if cell else []
        index = corpus_index(encoder_dir, dataset, cfg, sweep_dir / SERVE_DIR, reuse=reuse)
        models.append({"name": paradigm, "encoder": model_uri, "index": str(index), "corpus": source_id})
    settings = config_from_dict({"models": models}, f"champions of {sweep_dir}", overrides, ServeConfig)
    return settings, uri
