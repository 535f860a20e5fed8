"""What a serve config serves, checked before anything starts: each model's encoder (a folder, or an MLflow model
URI fetched once into a local folder), its index shards and their agreement."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from retriever.config import ServeConfig, ServedModelConfig
from retriever.errors import SettingError
from retriever.index.manifest import MANIFEST_FILE, IndexMismatchError, read_manifest
from retriever.index.shards import SHARDS_FILE, read_shard_set
from retriever.serving.schema import ModelInfo

MODEL_URI_PREFIX = "models:/"


@dataclass(frozen=True)
class ServedModel:
    """One served model as every deployment needs it: local encoder folder, fingerprint, shards by name."""

    config: ServedModelConfig
    encoder_dir: str
    fingerprint: str
    paradigm: str
    index_kind: str
    documents: int
    shards: dict[str, str]  # shard name -> shard folder

    @property
    def name(self) -> str:
        return self.config.name

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            paradigm=self.paradigm,  # type: ignore[arg-type]
            encoder=self.config.encoder,
            index_kind=self.index_kind,
            documents=self.documents,
            shards=list(self.shards),
            texts=self.config.corpus is not None,
        )


def shard_folders(index_dir: str | Path) -> dict[str, str]:
    """Shard name -> folder of an index folder (its `shards.json`), or of a single shard folder."""
    index_dir = Path(index_dir)
    if (index_dir / MANIFEST_FILE).is_file() and not (index_dir / SHARDS_FILE).is_file():
        return {index_dir.name: str(index_dir.resolve())}
    content = read_shard_set(index_dir)
    return {entry["dir"]: str((index_dir / entry["dir"]).resolve()) for entry in content["shards"]}


def fetch_model_uri(uri: str, tracking_uri: str | None, into: Path) -> Path:
    """An MLflow registry model (``models:/<name>@<alias>`` or ``models:/<name>/<version>``) downloaded into
    ``into/<name>/v<version>`` (kept: a version never changes), returned as the encoder folder."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    reference = uri[len(MODEL_URI_PREFIX) :]
    name, _, rest = reference.partition("@")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if rest:
            version = client.get_model_version_by_alias(name, rest)
        else:
            name, _, number = reference.partition("/")
            version = client.get_model_version(name, number)
        target = into / name / f"v{version.version}"
        encoder = target / "encoder"
        if not (encoder / "encoder.json").is_file():
            from mlflow.artifacts import download_artifacts

            target.mkdir(parents=True, exist_ok=True)
            download_artifacts(artifact_uri=version.source, dst_path=str(target), tracking_uri=tracking_uri)
    except MlflowException as exc:
        where = tracking_uri or "the default MLflow tracking URI"
        raise SettingError(f"{uri}: not found in the model registry at {where} ({exc.message})") from None
    if not (encoder / "encoder.json").is_file():
        raise SettingError(f"{uri}: the registered artifact {version.source} holds no encoder folder")
    return encoder


def build_catalog(
    cfg: ServeConfig, *, tracking_uri: str | None = None, cache_dir: str | Path = "."
) -> list[ServedModel]:
    """Resolve and check every served model: the encoder folder is read (not loaded), every shard's manifest is
    verified, and the index must have been built from this very encoder (same fingerprint)."""
    from retriever.encoding.encoder import EncoderInfo

    models = []
    for model in cfg.models:
        encoder_dir = Path(model.encoder)
        if model.encoder.startswith(MODEL_URI_PREFIX):
            encoder_dir = fetch_model_uri(model.encoder, tracking_uri, Path(cache_dir))
        encoder = EncoderInfo.read(encoder_dir)
        shards = shard_folders(model.index)
        manifests = [read_manifest(Path(folder), verify_hashes=False) for folder in shards.values()]
        for folder, manifest in zip(shards.values(), manifests):
            if manifest.encoder.get("sha256") != encoder.fingerprint:
                raise IndexMismatchError(
                    f"model {model.name!r}: index shard {folder} was built from another encoder "
                    f"({manifest.encoder.get('path')}) than {encoder_dir}; serve the index built from this encoder"
                )
        if model.corpus is not None:
            from retriever.data.sources import require_known_dataset

            require_known_dataset(model.corpus)
        models.append(
            ServedModel(
                config=model,
                encoder_dir=str(encoder.path),
                fingerprint=encoder.fingerprint,
                paradigm=encoder.paradigm,
                index_kind=manifests[0].kind,
                documents=sum(m.doc_count for m in manifests),
                shards=shards,
            )
        )
    return models


def read_token(settings: ServeConfig) -> str | None:
    """The bearer token from the environment variable `auth_token_env` names (None: no authentication)."""
    if settings.auth_token_env is None:
        return None
    token = os.environ.get(settings.auth_token_env, "")
    if not token:
        raise SettingError(
            f"auth_token_env is {settings.auth_token_env!r} but that environment variable is not set; export it "
            "(the token clients must send as `Authorization: Bearer <token>`) or leave auth_token_env unset"
        )
    return token
