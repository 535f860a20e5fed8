"""Persistent registrations of local collections under ``local/<name>`` or ``classic/<name>``.

A local dataset is described by a *spec*: for each entity (docs, queries, qrels) a file format and a list of
paths. The spec is turned into an ``ir_datasets`` ``Dataset`` and registered under its id (``local/<name>`` or
``classic/<name>``), so ``ir_datasets.load(id)`` and ``retriever.data.sources.load_source(id)`` serve it like any
hub dataset. Specs are persisted in ``$IR_DATASETS_HOME/retriever_local.json`` so that other processes (the CLI,
Ray workers, later commands) see the same registrations once they import ``retriever.data.sources``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ir_datasets
from ir_datasets.datasets.base import Dataset

from retriever.data.local.readers import ENTITIES, LOCAL_PREFIXES, DataFormatError, require_file, sniff_format
from retriever.data.local.specs import build_dataset, check_dataset_id, check_name, validate_dataset
from retriever.errors import SettingError, UnknownNameError

REGISTRY_FILE = "retriever_local.json"
REGISTRY_FORMAT = 1


# ------------------------------------------------------------------------------------------------------ persistence


def resolve_home(home: str | Path | None = None) -> Path:
    """``home``, or this process's IR_DATASETS_HOME (read at call time)."""
    return Path(home) if home is not None else ir_datasets.util.home_path()


def registry_file(home: str | Path | None = None) -> Path:
    return resolve_home(home) / REGISTRY_FILE


def _is_current_home(home: str | Path | None) -> bool:
    return home is None or Path(home).resolve() == ir_datasets.util.home_path().resolve()


def _encode_paths(spec: dict[str, Any], home: Path) -> dict[str, Any]:
    """Paths under IR_DATASETS_HOME are stored relative to it, so the home folder can move as a whole."""
    out = json.loads(json.dumps(spec))
    for entity in ENTITIES:
        if isinstance(out.get(entity), dict):
            encoded = []
            for p in out[entity]["paths"]:
                path = Path(p).resolve()
                try:
                    encoded.append(path.relative_to(home.resolve()).as_posix())
                except ValueError:
                    encoded.append(str(path))
            out[entity]["paths"] = encoded
    return out


def _decode_paths(spec: dict[str, Any], home: Path) -> dict[str, Any]:
    out = json.loads(json.dumps(spec))
    for entity in ENTITIES:
        if isinstance(out.get(entity), dict) and isinstance(out[entity].get("paths"), list):
            out[entity]["paths"] = [str(p if Path(p).is_absolute() else home / p) for p in out[entity]["paths"]]
    return out


def persisted_datasets(home: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The registrations stored in ``<home>/retriever_local.json`` (absolute paths), by dataset id."""
    base = resolve_home(home)
    path = base / REGISTRY_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        msg = f"{path}: not a valid registry file ({exc}); fix or delete it and register again"
        raise DataFormatError(msg) from None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), dict):
        raise DataFormatError(f"{path}: expected {{'format': 1, 'datasets': {{id: spec}}}}; fix or delete it")
    return {ds_id: _decode_paths(spec, base) for ds_id, spec in data["datasets"].items()}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock around read-modify-write of the registry file (processes may register concurrently)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - platforms without fcntl get no inter-process lock
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _update_registry(home: Path, update: Callable[[dict[str, Any]], None]) -> None:
    path = home / REGISTRY_FILE
    with _locked(path):
        current = {k: _encode_paths(v, home) for k, v in persisted_datasets(home).items()}
        update(current)
        payload = json.dumps({"format": REGISTRY_FORMAT, "datasets": current}, indent=2, sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=home, prefix=".retriever_local.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(payload + "\n")
        os.replace(tmp, path)


def _register_in_process(dataset_id: str, dataset: Dataset) -> None:
    registered = ir_datasets.registry._registered
    if dataset_id in registered:
        # ir_datasets refuses overwrites; replacing one of our own local ids in place is intended.
        del registered[dataset_id]
    ir_datasets.registry.register(dataset_id, dataset)


def register_local_dataset(
    dataset_id: str,
    spec: dict[str, Any],
    *,
    home: str | Path | None = None,
    validate: bool = True,
    persist: bool = True,
) -> str:
    """Register a spec under ``dataset_id`` in ir_datasets (this process) and persist it in ``<home>``.

    ``validate`` parses every file once so that format errors surface now, with file:line. With a ``home`` other
    than this process's IR_DATASETS_HOME the registration is only persisted (processes using that home see it).
    """
    check_dataset_id(dataset_id)
    spec = {k: v for k, v in spec.items() if v is not None}
    for entity in ENTITIES:
        if isinstance(spec.get(entity), dict):
            spec[entity] = {**spec[entity], "paths": [str(Path(p).resolve()) for p in spec[entity]["paths"]]}
    dataset = build_dataset(dataset_id, spec)
    if validate:
        validate_dataset(dataset_id, spec)
    base = resolve_home(home)
    if persist:
        _update_registry(base, lambda entries: entries.__setitem__(dataset_id, _encode_paths(spec, base)))
    if _is_current_home(home):
        _register_in_process(dataset_id, dataset)
    return dataset_id


def unregister_local_dataset(dataset_id: str, *, home: str | Path | None = None) -> bool:
    """Remove a local registration (from the registry file and from this process). True if it existed."""
    check_dataset_id(dataset_id)
    base = resolve_home(home)
    existed = dataset_id in persisted_datasets(base)
    if existed:
        _update_registry(base, lambda entries: entries.pop(dataset_id, None))
    if _is_current_home(home):
        existed = ir_datasets.registry._registered.pop(dataset_id, None) is not None or existed
    return existed


def reregister_persisted(home: str | Path | None = None) -> list[str]:
    """Register in this process every dataset persisted in the current IR_DATASETS_HOME. Returns their ids.

    A broken entry does not stop the others; the problems are raised together at the end.
    """
    ids, problems = [], []
    for dataset_id, spec in persisted_datasets(home).items():
        try:
            _register_in_process(dataset_id, build_dataset(dataset_id, spec, str(registry_file(home))))
            ids.append(dataset_id)
        except (DataFormatError, ValueError) as exc:
            problems.append(str(exc))
    if problems:
        raise DataFormatError("; ".join(problems))
    return ids


def _lazy_initializer(key: str, groups: tuple[str, ...]) -> Dataset:
    """Resolve a local id persisted by another process after this one started."""
    specs = persisted_datasets()
    if key not in specs:
        raise UnknownNameError(
            f"{key} is not registered (looked in {registry_file()}); register it first, e.g. with "
            "retriever.data.local.register_trec / register_beir_folder, or import-classic for classic/*"
        )
    return build_dataset(key, specs[key], str(registry_file()))


_PATTERN_INSTALLED = False


def install_lazy_lookup() -> None:
    """Make ``ir_datasets.load('local/...')`` consult the registry file for ids unknown to this process."""
    global _PATTERN_INSTALLED
    if not _PATTERN_INSTALLED:
        prefixes = "|".join(re.escape(p) for p in LOCAL_PREFIXES)
        ir_datasets.registry.register_pattern(rf"^({prefixes})/.+$", _lazy_initializer)
        _PATTERN_INSTALLED = True


# ------------------------------------------------------------------------------------------------- public helpers


def register_beir_folder(
    name: str, path: str | Path, split: str = "test", *, home: str | Path | None = None, validate: bool = True
) -> str:
    """Register a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) as ``local/<name>``.

    Queries are restricted to those judged in the split, as BEIR's own loader does. Files may be gzipped (.gz).
    """
    check_name(name)
    folder = Path(path)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise FileNotFoundError(f"{folder}: BEIR folder {what} (expected corpus.jsonl, queries.jsonl, qrels/)")

    def find(rel: str) -> Path:
        for candidate in (folder / rel, folder / (rel + ".gz")):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"{folder / rel}: not found; a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/{split}.tsv"
        )

    spec = {
        "docs": {"format": "jsonl", "paths": [str(find("corpus.jsonl"))]},
        "queries": {"format": "jsonl", "paths": [str(find("queries.jsonl"))], "only_judged": True},
        "qrels": {"format": "beir", "paths": [str(find(f"qrels/{split}.tsv"))]},
    }
    return register_local_dataset(f"local/{name}", spec, home=home, validate=validate)


def register_trec(
    name: str,
    docs: str | Path | None = None,
    topics: str | Path | None = None,
    qrels: str | Path | None = None,
    *,
    docs_format: str | None = None,
    topics_format: str | None = None,
    qrels_format: str | None = None,
    home: str | Path | None = None,
    validate: bool = True,
) -> str:
    """Register a collection with TREC-style topics and qrels as ``local/<name>``.

    docs: TSV ``doc_id<TAB>text`` or JSONL (by file name); topics: TSV ``qid<TAB>query``, JSONL or TREC SGML
    ``<top>``; qrels: TREC ``qid iter docid rel`` or BEIR TSV with header (both sniffed from the content unless
    the format is given). Any of the three may be omitted (e.g. a docs-only collection for encoding).
    """
    check_name(name)
    spec: dict[str, Any] = {}
    for entity, value, fmt in (
        ("docs", docs, docs_format),
        ("queries", topics, topics_format),
        ("qrels", qrels, qrels_format),
    ):
        if value is not None:
            path = require_file(Path(value), "topics" if entity == "queries" else entity)
            spec[entity] = {"format": fmt or sniff_format(entity, path), "paths": [str(path)]}
    if not spec:
        raise SettingError(
            "register_trec needs at least one of docs, topics, qrels (`retriever data register-trec NAME --docs FILE "
            "[--topics FILE] [--qrels FILE]`)"
        )
    return register_local_dataset(f"local/{name}", spec, home=home, validate=validate)
