"""One interface over every retrieval data source: ir_datasets hub datasets and local collections alike.

``load_source(dataset_id)`` returns a ``Source`` with ``docs()``, ``queries()``, ``qrels()``, ``docs_store()`` and
``docs_count()``. Hub ids (``msmarco-passage/dev/small``, ``beir/scifact/test``, ``vaswani``...) and local ids
(``local/<name>``, ``classic/med``...) go through the same ir_datasets code path; local collections are
registered with ``register_beir_folder``, ``register_trec``, ``register_passage_pool`` or ``import_classic``, and
those registrations persist in ``$IR_DATASETS_HOME/retriever_local.json`` (re-registered when this module loads).

Offline (``RETRIEVER_OFFLINE``, ``IR_DATASETS_OFFLINE``, ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` set to 1, or
``download=False``) nothing is downloaded: before reading an entity the files ir_datasets would need are looked
up in its cache, and a missing one raises ``SourceUnavailableError`` at once, naming the exact paths to fill
under IR_DATASETS_HOME and what each must contain.
"""

from __future__ import annotations

import difflib
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ir_datasets
from ir_datasets.datasets.base import FilteredQueries
from ir_datasets.util.download import Download, LocalDownload
from ir_datasets.util.fileio import (
    Bz2Extract,
    Cache,
    GzipExtract,
    Lz4Extract,
    PackageDataFile,
    StringFile,
    TarExtract,
    TarExtractAll,
    ZipExtract,
    ZipExtractCache,
)

from retriever.data import local as local_data
from retriever.data.classic import CLASSIC_IDS, import_classic
from retriever.data.passage_pool import load_passage_pool, register_passage_pool
from retriever.errors import DataFormatError, UnknownNameError, UserError
from retriever.registry import Registry

__all__ = [
    "BEIR_13",
    "CLASSIC_IDS",
    "MSMARCO",
    "PRODUCT_DATASETS",
    "DocTexts",
    "IrDatasetsSource",
    "MissingEntityError",
    "MissingFile",
    "Source",
    "SourceUnavailableError",
    "UnknownSourceError",
    "doc_text",
    "downloads_allowed",
    "import_classic",
    "load_passage_pool",
    "load_source",
    "local_datasets",
    "missing_files",
    "register_passage_pool",
    "register_source_provider",
    "require_known_dataset",
]

# MS MARCO passage: training queries with judgements, dev/small (MRR@10), TREC DL 2019/2020 judged topics.
MSMARCO: dict[str, str] = {
    "train": "msmarco-passage/train/judged",
    "dev": "msmarco-passage/dev/small",
    "dl19": "msmarco-passage/trec-dl-2019/judged",
    "dl20": "msmarco-passage/trec-dl-2020/judged",
}

# The 13 public BEIR sets of the paper's protocol: name (as in BEIR/Pyserini file names) -> ir_datasets id of the
# test split. Sets with a single split carry no suffix in ir_datasets; Touché-2020 is BEIR's v2 release.
BEIR_13: dict[str, str] = {
    "arguana": "beir/arguana",
    "climate-fever": "beir/climate-fever",
    "dbpedia-entity": "beir/dbpedia-entity/test",
    "fever": "beir/fever/test",
    "fiqa": "beir/fiqa/test",
    "hotpotqa": "beir/hotpotqa/test",
    "nfcorpus": "beir/nfcorpus/test",
    "nq": "beir/nq",
    "quora": "beir/quora/test",
    "scidocs": "beir/scidocs",
    "scifact": "beir/scifact/test",
    "trec-covid": "beir/trec-covid",
    "webis-touche2020": "beir/webis-touche2020/v2",
}

PRODUCT_DATASETS: tuple[str, ...] = (*MSMARCO.values(), *BEIR_13.values())

OFFLINE_ENV_VARS = ("RETRIEVER_OFFLINE", "IR_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}


def cranfield_gain(code: int) -> int:
    """Cranfield codes are 1 = complete answer ... 4 = minimum interest, -1 = no interest (Cleverdon's 5);
    as a gain (larger = more relevant): 1 -> 4, 2 -> 3, 3 -> 2, 4 -> 1, anything else -> 0."""
    return 5 - code if 1 <= code <= 4 else 0


# Datasets whose raw relevance codes are not gains; ``Source.qrels()`` maps them so that larger = more relevant.
RELEVANCE_GAINS: Registry[Callable[[int], int]] = Registry("relevance mapping")
RELEVANCE_GAINS.add("cranfield", cranfield_gain)

# Extra advice appended to "missing files" errors, by dataset id prefix.
_HINTS: dict[str, str] = {
    "vaswani": "the original NPL files can be placed with `retriever data import-classic SRC`.",
    "cranfield": "the original Cranfield files can be placed with `retriever data import-classic SRC`.",
    "beir": "a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv) can also be registered with "
    "register_beir_folder(name, path).",
    "local": "restore the file, or register the dataset again (register_trec / register_beir_folder / "
    "register_passage_pool).",
    "classic": "run `retriever data import-classic SRC` again.",
    "msmarco-passage": "a local copy of the collection (collection.tsv) can also be registered with "
    "register_trec(name, docs=..., topics=..., qrels=...).",
}


class SourceUnavailableError(UserError, FileNotFoundError):
    """The files a dataset needs are not in IR_DATASETS_HOME and cannot (or may not) be downloaded."""


class UnknownSourceError(UnknownNameError):
    """No dataset is registered under this id (a `LookupError`, as before, and a `KeyError` like other unknown
    names)."""


class MissingEntityError(UserError, ValueError):
    """The dataset has no docs, queries or qrels where they are needed (e.g. the qrels of a corpus-only id)."""


def downloads_allowed(download: bool | None = None) -> bool:
    """Explicit ``download`` wins; otherwise downloads are allowed unless an offline variable is set."""
    if download is not None:
        return download
    return not any(os.environ.get(var, "").strip().lower() in _TRUE for var in OFFLINE_ENV_VARS)


def doc_text(doc: Any) -> str:
    """The text of a document: a string as it is; an ir_datasets document's ``title + " " + text`` when it has both
    (BEIR convention, stripped when the title is empty), else its ``default_text()``, else its ``text``. Training,
    mining and indexing all read passages through this, so a passage is the same text in each."""
    if isinstance(doc, str):
        return doc
    title, text = getattr(doc, "title", None), getattr(doc, "text", None)
    if isinstance(title, str) and isinstance(text, str):
        return local_data.join_title_text(title, text)
    if callable(getattr(doc, "default_text", None)):
        return str(doc.default_text()).strip()
    if isinstance(text, str):
        return text.strip()
    raise TypeError(f"cannot turn a {type(doc).__name__} into text (expected str, .text or .default_text())")


class DocTexts:
    """Document id → text (`doc_text`) over a mapping, an ir_datasets docs store or any ``.get`` store: one at a time
    (``docs[id]``, a KeyError when unknown) or many (`get_many`, in one pass of the store's own ``get_many``)."""

    def __init__(self, store: Any, name: str = "the docs store") -> None:
        if not callable(getattr(store, "get", None)):
            raise TypeError(f"docs must be a mapping or have .get(doc_id), got {type(store).__name__}")
        self._store = store
        self.name = name

    def _get(self, docid: str) -> Any:
        try:
            return self._store.get(docid)
        except KeyError:  # ir_datasets stores raise it for an unknown id, mappings return None
            return None

    def __getitem__(self, docid: str) -> str:
        value = self._get(docid)
        if value is None:
            raise UnknownNameError(
                f"document {docid!r} is not in {self.name}; the examples and data.docs do not match"
            )
        return _text_of(value, docid)

    def get_many(self, doc_ids: Iterable[str], needed_by: Mapping[str, str] | None = None) -> dict[str, str]:
        """Texts of ``doc_ids`` (each once, in first-seen order). An unknown id is a `DataFormatError`, naming what
        asked for it where ``needed_by`` maps the id to that (e.g. "query 'q7'")."""
        wanted = list(dict.fromkeys(doc_ids))
        get_many = getattr(self._store, "get_many", None)
        if callable(get_many) and not isinstance(self._store, Mapping):
            found = dict(get_many(wanted))
        else:
            found = {docid: value for docid in wanted if (value := self._get(docid)) is not None}
        for docid in wanted:
            if docid not in found:
                who = (needed_by or {}).get(docid)
                where = f"{who}: " if who else ""
                raise DataFormatError(
                    f"{where}unknown document id {docid!r} (not in {self.name}); fix the id or use the corpus it "
                    "comes from"
                )
        return {docid: _text_of(found[docid], docid) for docid in wanted}


def _text_of(value: Any, docid: str) -> str:
    try:
        return doc_text(value)
    except TypeError as exc:
        raise TypeError(f"document {docid!r}: {exc}") from None


def query_text(query: Any) -> str:
    if hasattr(query, "default_text"):
        return str(query.default_text()).strip()
    return str(query.text).strip()


# ------------------------------------------------------------------------------------------------ availability


@dataclass(frozen=True)
class MissingFile:
    """A file a dataset needs: where ir_datasets looks for it, what it must hold, and what can replace it."""

    path: Path | None
    holds: str
    alternatives: tuple[MissingFile, ...] = ()

    def describe(self, indent: str = "  ") -> list[str]:
        lines = [f"{indent}- {self.path if self.path is not None else '(no cache file: fetched on demand)'}"]
        lines.append(f"{indent}    content: {self.holds}")
        if self.alternatives:
            lines.append(f"{indent}    or instead{' all of' if len(self.alternatives) > 1 else ''}:")
            for alt in self.alternatives:
                lines.extend(alt.describe(indent + "    "))
        return lines


def _fields(node: Any) -> dict[str, Any]:
    # vars(), not getattr: several ir_datasets wrappers forward unknown attributes to what they wrap.
    return vars(node) if hasattr(node, "__dict__") else {}


def _describe(node: Any, depth: int = 0) -> str:
    f = _fields(node)
    if depth > 20:
        return type(node).__name__
    if isinstance(node, Download):
        urls = [_fields(m).get("url") for m in f.get("mirrors", []) if _fields(m).get("url")]
        md5 = f.get("expected_md5")
        return (urls[0] if urls else "a download") + (f" (md5 {md5})" if md5 else "")
    if isinstance(node, LocalDownload):
        return f"the local file {f.get('_path')}"
    if isinstance(node, TarExtract):
        return f"{f['_tar_path']!r} extracted from the archive {_describe(f['_streamer'], depth + 1)}"
    if isinstance(node, ZipExtract):
        return f"{f['zip_path']!r} extracted from the zip {_describe(f['dlc'], depth + 1)}"
    if isinstance(node, (GzipExtract, Bz2Extract, Lz4Extract)):
        return f"the decompressed content of {_describe(f['_streamer'], depth + 1)}"
    for key in ("_streamer", "_dlc", "dlc", "streamer"):
        if key in f:
            return _describe(f[key], depth + 1)
    return type(node).__name__


def _cached(path: Path, inner: list[MissingFile], holds: str) -> list[MissingFile]:
    if not inner:
        return []
    alternatives = tuple(m for m in inner if m.path is not None)
    return [MissingFile(path, holds, alternatives)]


def _walk(node: Any, seen: set[int]) -> list[MissingFile]:
    """Files missing for ``node`` (empty: everything it needs is on disk)."""
    if node is None or isinstance(node, (str, bytes, int, float, Path)) or id(node) in seen:
        return []
    seen.add(id(node))
    if isinstance(node, (list, tuple, set, frozenset)):
        return [m for item in node for m in _walk(item, seen)]
    if isinstance(node, dict):
        return [m for item in node.values() for m in _walk(item, seen)]
    f = _fields(node)
    if isinstance(node, (StringFile, PackageDataFile)):
        return []
    if isinstance(node, Cache):
        path = Path(f["_path"])
        return [] if path.exists() else _cached(path, _walk(f["_streamer"], seen), _describe(f["_streamer"]))
    if isinstance(node, (TarExtractAll, ZipExtractCache)):
        path = Path(f["_extract_path"] if "_extract_path" in f else f["extract_path"])
        inner_node = f.get("_streamer", f.get("dlc"))
        return [] if path.exists() else _cached(path, _walk(inner_node, seen), _describe(inner_node))
    if isinstance(node, Download):
        cache = f.get("_cache_path")
        if f.get("_path") is not None or (cache and cache != os.devnull and os.path.exists(cache)):
            return []
        local = [Path(_fields(m)["_path"]) for m in f.get("mirrors", []) if isinstance(m, LocalDownload)]
        if any(p.exists() for p in local):
            return []
        target = Path(cache) if cache else (local[0] if local else None)
        return [MissingFile(target, f"the file {_describe(node)}")]
    if isinstance(node, LocalDownload):
        path = Path(f["_path"])
        return [] if path.exists() else [MissingFile(path, "a local file (no download source)")]
    if callable(getattr(type(node), "required_files", None)):
        registry = local_data.registry_file()
        return [
            MissingFile(p, f"a file of the local dataset {getattr(node, '_dataset_id', '')} (see {registry})")
            for p in node.required_files()
            if not Path(p).exists()
        ]
    module = type(node).__module__ or ""
    if module.startswith(("ir_datasets", "retriever")) and not isinstance(node, ir_datasets.util.Lazy):
        return [m for value in f.values() for m in _walk(value, seen)]
    return []


def _dedupe(missing: list[MissingFile]) -> list[MissingFile]:
    out, seen = [], set()
    for m in missing:
        if m.path is None or m.path not in seen:
            out.append(m)
            seen.add(m.path)
    return out


def _entity_missing(dataset: Any, entity: str) -> list[MissingFile]:
    if not dataset.has(entity):
        return []
    if entity == "docs":
        try:
            if dataset.docs_store().built():
                return []  # the docs store answers both iteration and lookups
        except Exception:
            pass  # no usable store: look for the files it is built from
    handler = getattr(dataset, f"{entity}_handler")()
    roots = [handler]
    if entity == "queries" and isinstance(handler, FilteredQueries) and dataset.has("qrels"):
        roots.append(dataset.qrels_handler())  # "judged" query sets are filtered by their qrels
    return _dedupe(_walk(roots, set()))


def missing_files(dataset_id: str, entity: str = "docs") -> list[MissingFile]:
    """The files ``dataset_id`` needs for ``entity`` (docs, queries, qrels) that are not on disk (none: all there)."""
    return _entity_missing(_load_dataset(dataset_id), entity)


def _unavailable_message(dataset_id: str, entity: str, missing: list[MissingFile], why: str) -> str:
    home = ir_datasets.util.home_path()
    lines = [
        f"{dataset_id}: the {entity} cannot be read: {why}. "
        f"Place {'this file' if len(missing) == 1 else 'these files'} (IR_DATASETS_HOME={home}):"
    ]
    for m in missing:
        lines.extend(m.describe())
    hint = _HINTS.get(dataset_id.split("/", 1)[0])
    if hint:
        lines.append(f"Hint: {hint}")
    return "\n".join(lines)


def _download_failure(exc: Exception) -> str:
    detail = " ".join(str(exc).split())
    return f"downloading failed ({type(exc).__name__}: {detail[:200]}{'...' if len(detail) > 200 else ''})"


def _offline_reason(download: bool | None) -> str:
    if download is False:
        return "downloads are disabled (download=False)"
    set_vars = [v for v in OFFLINE_ENV_VARS if os.environ.get(v, "").strip().lower() in _TRUE]
    return f"downloads are disabled ({', '.join(f'{v}=1' for v in set_vars)})"


# -------------------------------------------------------------------------------------------------------- sources


class Source(ABC):
    """A retrieval dataset: documents, queries and graded relevance judgements."""

    id: str

    @abstractmethod
    def docs(self) -> Iterator[tuple[str, str]]:
        """(doc_id, text) pairs."""

    @abstractmethod
    def queries(self) -> Iterator[tuple[str, str]]:
        """(query_id, text) pairs."""

    @abstractmethod
    def qrels(self) -> dict[str, dict[str, int]]:
        """{query_id: {doc_id: gain}}, larger gain = more relevant."""

    @abstractmethod
    def docs_store(self) -> Any:
        """An ir_datasets docs store (``get(doc_id)``, ``get_many(ids)``)."""

    @abstractmethod
    def docs_count(self) -> int:
        """Number of documents."""

    def doc_texts(self, doc_ids: Iterable[str]) -> dict[str, str]:
        """Texts of the given documents, looked up in the docs store (`DocTexts.get_many`)."""
        return DocTexts(self.docs_store(), f"dataset {self.id!r}").get_many(doc_ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r})"


def known_datasets_hint() -> str:
    """The dataset ids to suggest when an id is unknown: product, classic and this home's local ones."""
    local = sorted(local_data.persisted_datasets())
    return (
        f"product datasets: {', '.join(PRODUCT_DATASETS)}; classic: {', '.join(CLASSIC_IDS)}; local "
        f"({local_data.registry_file()}): {', '.join(local) or 'none'}. Any ir_datasets id works too; register "
        "local data with `retriever data register-trec / register-beir / register-pool / import-classic`"
    )


def _load_dataset(dataset_id: str) -> Any:
    try:
        return ir_datasets.load(dataset_id)
    except KeyError:
        candidates = [*ir_datasets.registry, *local_data.persisted_datasets()]
        close = difflib.get_close_matches(dataset_id, candidates, n=1, cutoff=0.8)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownSourceError(f"unknown dataset id {dataset_id!r}{guess}; {known_datasets_hint()}") from None


def require_known_dataset(dataset_id: str) -> None:
    """Fail with `UnknownSourceError` (listing the known ids) unless ``load_source`` can resolve ``dataset_id``;
    nothing is read or downloaded."""
    if dataset_id.split("/", 1)[0] not in SOURCE_PROVIDERS:
        _load_dataset(dataset_id)


class IrDatasetsSource(Source):
    """A Source backed by an ir_datasets dataset (hub or local registration)."""

    def __init__(self, dataset_id: str, download: bool | None = None) -> None:
        self.id = dataset_id
        self.dataset = _load_dataset(dataset_id)
        self.download = download
        self._gain = RELEVANCE_GAINS.get(dataset_id) if dataset_id in RELEVANCE_GAINS else None

    def __getstate__(self) -> dict[str, Any]:
        # ir_datasets objects hold locks and lambdas; a worker process re-resolves the id instead.
        return {"id": self.id, "download": self.download}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["id"], download=state["download"])

    def has(self, entity: str) -> bool:
        return bool(self.dataset.has(entity))

    def missing(self, entity: str) -> list[MissingFile]:
        return _entity_missing(self.dataset, entity)

    def _require(self, entity: str) -> bool:
        """Fail now if ``entity`` cannot be read; True when ir_datasets will have to download something."""
        if not self.has(entity):
            raise MissingEntityError(f"{self.id} has no {entity} (it provides: {self._provides()})")
        missing = self.missing(entity)
        if missing and not downloads_allowed(self.download):
            raise SourceUnavailableError(
                _unavailable_message(self.id, entity, missing, _offline_reason(self.download))
            )
        return bool(missing)

    def _provides(self) -> str:
        return ", ".join(e for e in ("docs", "queries", "qrels") if self.has(e)) or "nothing"

    def _reading(self, entity: str, will_download: bool, it: Iterable[Any]) -> Iterator[Any]:
        try:
            yield from it
        except Exception as exc:
            still_missing = self.missing(entity) if will_download else []
            if still_missing:
                why = _download_failure(exc)
                raise SourceUnavailableError(_unavailable_message(self.id, entity, still_missing, why)) from exc
            raise

    def docs(self) -> Iterator[tuple[str, str]]:
        will_download = self._require("docs")
        return ((d.doc_id, doc_text(d)) for d in self._reading("docs", will_download, self.dataset.docs_iter()))

    def queries(self) -> Iterator[tuple[str, str]]:
        will_download = self._require("queries")
        return (
            (q.query_id, query_text(q)) for q in self._reading("queries", will_download, self.dataset.queries_iter())
        )

    def judgments(self) -> Iterator[tuple[str, str, int]]:
        """(query id, doc id, gain) per qrels line in file order, under the same availability and offline checks
        as ``qrels()`` (which merges them)."""
        will_download = self._require("qrels")
        for q in self._reading("qrels", will_download, self.dataset.qrels_iter()):
            gain = self._gain(q.relevance) if self._gain is not None else int(q.relevance)
            yield str(q.query_id), str(q.doc_id), gain

    def qrels(self) -> dict[str, dict[str, int]]:
        """Graded judgements; a (query, doc) pair judged twice keeps its largest gain."""
        out: dict[str, dict[str, int]] = {}
        for query_id, doc_id, gain in self.judgments():
            per_query = out.setdefault(query_id, {})
            per_query[doc_id] = max(gain, per_query.get(doc_id, gain))
        return out

    def docs_store(self) -> Any:
        will_download = self._require("docs")
        if not will_download:
            return self.dataset.docs_store()
        try:
            store = self.dataset.docs_store()
            store.build()
            return store
        except Exception as exc:
            still_missing = self.missing("docs")
            if still_missing:
                why = _download_failure(exc)
                raise SourceUnavailableError(_unavailable_message(self.id, "docs", still_missing, why)) from exc
            raise

    def docs_count(self) -> int:
        """From the built docs store or ir_datasets' metadata (no file needed), else by building the store."""
        if not self.has("docs"):
            raise MissingEntityError(f"{self.id} has no docs (it provides: {self._provides()})")
        count = self.dataset.docs_count()
        if count is None:
            count = self.docs_store().count()  # builds the store once: one pass over the docs
        return int(count)


SourceFactory = Callable[[str], Source]
# Sources that are not ir_datasets datasets, by id prefix (e.g. "synthetic" -> the offline benchmark).
SOURCE_PROVIDERS: Registry[SourceFactory] = Registry("source provider")


def register_source_provider(prefix: str, factory: SourceFactory) -> None:
    """Serve ids ``<prefix>/...`` with ``factory(dataset_id)`` instead of ir_datasets."""
    SOURCE_PROVIDERS.add(prefix, factory)


def load_source(dataset_id: str, download: bool | None = None) -> Source:
    """The Source for ``dataset_id``: a provider's id prefix, else any ir_datasets id (hub or local).

    ``download``: None = allowed unless an offline variable is set (see module doc); False = never download.
    """
    prefix = dataset_id.split("/", 1)[0]
    if prefix in SOURCE_PROVIDERS:
        return SOURCE_PROVIDERS.get(prefix)(dataset_id)
    return IrDatasetsSource(dataset_id, download=download)


def local_datasets() -> dict[str, dict[str, Any]]:
    """Local registrations of the current IR_DATASETS_HOME: id -> spec (formats and paths)."""
    return local_data.persisted_datasets()


local_data.install_lazy_lookup()
try:
    local_data.reregister_persisted()
except local_data.DataFormatError as _exc:  # a broken registry file must not make the package unusable
    warnings.warn(f"local datasets not registered: {_exc}", stacklevel=1)
