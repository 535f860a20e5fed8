"""ir_datasets handlers serving local files: docs (with a docstore), queries and qrels."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ir_datasets
from ir_datasets.formats import BaseDocs, BaseQrels, BaseQueries, GenericQuery, TrecQrel
from ir_datasets.indices import DEFAULT_DOCSTORE_OPTIONS, PickleLz4FullStore

from retriever.data.local.readers import FORMATS, LocalDoc, require_file

# ---------------------------------------------------------------------------------------------------------- handlers


def _fingerprint(parts: Iterable[Any]) -> str:
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True).encode()).hexdigest()[:16]


class _LocalFiles:
    """The files of one entity (`_entity`: docs, queries or qrels) of a local dataset, all in one format."""

    _entity: str

    def __init__(self, dataset_id: str, fmt: str, paths: Sequence[Path]) -> None:
        super().__init__()
        self._dataset_id = dataset_id
        self._fmt = fmt
        self._paths = [Path(p) for p in paths]

    def required_files(self) -> list[Path]:
        return list(self._paths)

    def _records(self) -> Iterator[Any]:
        """The records of every file, in order, read by the format's reader."""
        for item in FORMATS.get(f"{self._entity}/{self._fmt}")(self._paths):
            yield item.record


class LocalDocs(_LocalFiles, BaseDocs):
    """Docs of a local dataset; the docs store lives under IR_DATASETS_HOME, keyed by the files' size and mtime."""

    _entity = "docs"

    def _iter_files(self) -> Iterator[LocalDoc]:
        return self._records()

    @ir_datasets.util.use_docstore
    def docs_iter(self) -> Iterator[LocalDoc]:
        return self._iter_files()

    def docs_cls(self) -> type:
        return LocalDoc

    def docs_path(self, force: bool = True) -> Path:
        return self._paths[0]

    def _store_path(self) -> Path:
        stats = []
        for path in self._paths:
            st = require_file(path, f"docs file of {self._dataset_id}").stat()
            stats.append([str(path), st.st_size, st.st_mtime_ns])
        # A changed file gets a fresh store instead of silently serving stale documents.
        return ir_datasets.util.home_path() / self._dataset_id / f"docs-{_fingerprint([self._fmt, stats])}.pklz4"

    def docs_store(self, field: str = "doc_id", options: Any = DEFAULT_DOCSTORE_OPTIONS) -> PickleLz4FullStore:
        return PickleLz4FullStore(
            path=str(self._store_path()),
            init_iter_fn=self._iter_files,
            data_cls=LocalDoc,
            lookup_field=field,
            index_fields=["doc_id"],
            options=options,
        )

    def docs_count(self) -> int | None:
        store = self.docs_store()
        return store.count() if store.built() else None

    def docs_namespace(self) -> str:
        return self._dataset_id


class LocalQrels(_LocalFiles, BaseQrels):
    _entity = "qrels"

    def qrels_iter(self) -> Iterator[TrecQrel]:
        return self._records()

    def qrels_cls(self) -> type:
        return TrecQrel

    def qrels_path(self) -> Path:
        return self._paths[0]

    def qrels_defs(self) -> dict[int, str]:
        return {}


class LocalQueries(_LocalFiles, BaseQueries):
    """Queries of a local dataset, optionally restricted to the queries that have qrels (BEIR convention)."""

    _entity = "queries"

    def __init__(
        self, dataset_id: str, fmt: str, paths: Sequence[Path], only_judged_by: LocalQrels | None = None
    ) -> None:
        super().__init__(dataset_id, fmt, paths)
        self._only_judged_by = only_judged_by

    def required_files(self) -> list[Path]:
        extra = self._only_judged_by.required_files() if self._only_judged_by is not None else []
        return super().required_files() + extra

    def queries_iter(self) -> Iterator[GenericQuery]:
        records = self._records()
        if self._only_judged_by is None:
            return records
        judged = {q.query_id for q in self._only_judged_by.qrels_iter()}
        return (q for q in records if q.query_id in judged)

    def queries_cls(self) -> type:
        return GenericQuery

    def queries_path(self) -> Path:
        return self._paths[0]

    def queries_namespace(self) -> str:
        return self._dataset_id
