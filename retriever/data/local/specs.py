"""Dataset specs: for each entity (docs, queries, qrels) a file format and paths, checked and built into an
ir_datasets ``Dataset``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ir_datasets.datasets.base import Dataset

from retriever.data.local.handlers import LocalDocs, LocalQrels, LocalQueries
from retriever.data.local.readers import ENTITIES, FORMATS, LOCAL_PREFIXES, DataFormatError, require_file
from retriever.errors import SettingError

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # one path segment: the <name> of local/<name>


# --------------------------------------------------------------------------------------------------------- specs


def check_dataset_id(dataset_id: str) -> str:
    prefix = dataset_id.split("/", 1)[0]
    if not _ID_RE.match(dataset_id) or prefix not in LOCAL_PREFIXES or "/" not in dataset_id:
        raise SettingError(
            f"invalid local dataset id {dataset_id!r}: use '<prefix>/<name>' with prefix one of "
            f"{', '.join(LOCAL_PREFIXES)} and a name of letters, digits, '.', '_', '-' (e.g. 'local/my-corpus')"
        )
    return dataset_id


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise SettingError(
            f"invalid dataset name {name!r}: use letters, digits, '.', '_', '-' and no '/' (e.g. 'my-corpus'); it is "
            "registered as local/<name>"
        )
    return name


def _entity_spec(spec: dict[str, Any], entity: str, where: str) -> tuple[str, list[Path], dict[str, Any]] | None:
    part = spec.get(entity)
    if part is None:
        return None
    if (
        not isinstance(part, dict)
        or not isinstance(part.get("format"), str)
        or not isinstance(part.get("paths"), list)
    ):
        raise DataFormatError(f"{where}: {entity} must be {{'format': str, 'paths': [str, ...]}}, got {part!r}")
    fmt = part["format"]
    if f"{entity}/{fmt}" not in FORMATS:
        known = [n.split("/", 1)[1] for n in FORMATS.names() if n.startswith(entity + "/")]
        raise DataFormatError(f"{where}: unknown {entity} format {fmt!r}; known: {', '.join(sorted(known))}")
    return fmt, [Path(p) for p in part["paths"]], part


def build_dataset(dataset_id: str, spec: dict[str, Any], where: str = "spec") -> Dataset:
    """The ir_datasets ``Dataset`` of a spec (lazy: no file is read here)."""
    parts = [_entity_spec(spec, entity, f"{where} ({dataset_id})") for entity in ENTITIES]
    if all(p is None for p in parts):
        raise DataFormatError(f"{where} ({dataset_id}): needs at least one of {', '.join(ENTITIES)}")
    docs_part, queries_part, qrels_part = parts
    docs = LocalDocs(dataset_id, docs_part[0], docs_part[1]) if docs_part else None
    qrels = LocalQrels(dataset_id, qrels_part[0], qrels_part[1]) if qrels_part else None
    queries = None
    if queries_part:
        only_judged = bool(queries_part[2].get("only_judged")) and qrels is not None
        queries = LocalQueries(dataset_id, queries_part[0], queries_part[1], qrels if only_judged else None)
    return Dataset(docs, queries, qrels)


def _record_key(entity: str, record: Any) -> Any:
    return (record.query_id, record.doc_id) if entity == "qrels" else record[0]


def validate_dataset(dataset_id: str, spec: dict[str, Any]) -> dict[str, int]:
    """Parse every file of a spec once: format errors (file:line), duplicate ids. Returns the counts."""
    counts: dict[str, int] = {}
    for entity in ENTITIES:
        part = _entity_spec(spec, entity, dataset_id)
        if part is None:
            continue
        fmt, paths, _ = part
        for path in paths:
            require_file(path, f"{entity} file")
        reader = FORMATS.get(f"{entity}/{fmt}")
        seen: set[Any] = set()  # keys only: a location per key would cost too much memory on big collections
        n = 0
        for item in reader(paths):
            key = _record_key(entity, item.record)
            if key in seen:
                first = next(f"{i.path}:{i.lineno}" for i in reader(paths) if _record_key(entity, i.record) == key)
                what = f"judgement (query {key[0]!r}, doc {key[1]!r})" if entity == "qrels" else f"id {key!r}"
                raise DataFormatError(f"{item.path}:{item.lineno}: duplicate {entity} {what} (first at {first})")
            seen.add(key)
            n += 1
        counts[entity] = n
    return counts
