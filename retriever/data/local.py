"""Local collections served through ir_datasets: strict file readers, handlers and persistent registrations.

A local dataset is described by a *spec*: for each entity (docs, queries, qrels) a file format and a list of
paths. The spec is turned into an ``ir_datasets`` ``Dataset`` and registered under its id (``local/<name>`` or
``classic/<name>``), so ``ir_datasets.load(id)`` and ``retriever.data.sources.load_source(id)`` serve it like any
hub dataset. Specs are persisted in ``$IR_DATASETS_HOME/retriever_local.json`` so that other processes (the CLI,
Ray workers, later commands) see the same registrations once they import ``retriever.data.sources``.

Readers check every line and report problems as ``file:line: what is wrong; how to fix it``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import ir_datasets
from ir_datasets.datasets.base import Dataset
from ir_datasets.formats import BaseDocs, BaseQrels, BaseQueries, GenericQuery, TrecQrel
from ir_datasets.indices import DEFAULT_DOCSTORE_OPTIONS, PickleLz4FullStore

from retriever.registry import Registry

REGISTRY_FILE = "retriever_local.json"
REGISTRY_FORMAT = 1
# Ids of local datasets start with one of these; they never shadow ir_datasets' own ids.
LOCAL_PREFIXES = ("local", "classic")
ENTITIES = ("docs", "queries", "qrels")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
DOC_ID_KEYS = ("_id", "doc_id", "docid", "id", "pid")
DOC_TEXT_KEYS = ("text", "contents", "body", "passage")
QUERY_ID_KEYS = ("_id", "query_id", "qid", "id")
QUERY_TEXT_KEYS = ("text", "query", "title")
BEIR_QRELS_HEADER = ["query-id", "corpus-id", "score"]


class DataFormatError(ValueError):
    """A local data file (or the registry file) does not have the expected format."""


class LocalDoc(NamedTuple):
    """A document of a local collection; ``default_text`` is ``title + " " + text`` (just ``text`` without title)."""

    doc_id: str
    title: str
    text: str

    def default_text(self) -> str:
        return join_title_text(self.title, self.text)


class Located(NamedTuple):
    """A parsed record with where it came from (used for duplicate detection and error messages)."""

    path: Path
    lineno: int
    record: Any


def join_title_text(title: str, text: str) -> str:
    """BEIR convention: ``title + " " + text``, stripped (so an empty title leaves just the text)."""
    return (f"{title} {text}" if title and title.strip() else text).strip()


# ----------------------------------------------------------------------------------------------------------- reading


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found" + (" (it is a directory)" if path.is_dir() else ""))
    return path


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a UTF-8 text file, gzip-compressed when it ends with .gz.

    Lines are decoded one at a time so a bad byte is reported at its exact line; CRLF endings are accepted.
    """
    require_file(path, "file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                msg = f"{path}:{lineno}: not valid UTF-8 ({exc.reason}); re-encode the file as UTF-8"
                raise DataFormatError(msg) from None
            yield lineno, line.rstrip("\r\n")


def split_lines(paths: Sequence[Path]) -> Iterator[tuple[Path, int, str, list[str]]]:
    """(path, line number, line, whitespace-separated columns) of every non-blank line of the files, in order."""
    for path in paths:
        for lineno, line in numbered_lines(path):
            cols = line.split()
            if cols:
                yield path, lineno, line, cols


def _pick(data: dict[str, Any], keys: Sequence[str]) -> tuple[str | None, Any]:
    for key in keys:
        if key in data:
            return key, data[key]
    return None, None


def _jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, line in numbered_lines(path):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(
                f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); each line must hold one JSON object"
            ) from None
        if not isinstance(data, dict):
            raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(data).__name__}")
        yield lineno, data


def _jsonl_id_text(
    paths: Sequence[Path], id_keys: Sequence[str], text_keys: Sequence[str]
) -> Iterator[tuple[Path, int, dict[str, Any], str, str]]:
    """(path, line number, object, id, text) of every JSON object of the files; the id and the text are the values
    of the first of `id_keys` and of `text_keys` that the object has."""
    for path in paths:
        for lineno, data in _jsonl_objects(path):
            id_key, ident = _pick(data, id_keys)
            text_key, text = _pick(data, text_keys)
            if id_key is None or text_key is None:
                missing = "an id (one of " + ", ".join(id_keys) + ")" if id_key is None else ""
                if text_key is None:
                    missing += (" and " if missing else "") + "a text (one of " + ", ".join(text_keys) + ")"
                raise DataFormatError(f"{path}:{lineno}: missing {missing}; keys present: {sorted(data)}")
            yield path, lineno, data, _as_id(ident, path, lineno, id_key), _as_text(text, path, lineno, text_key)


def _as_id(value: Any, path: Path, lineno: int, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFormatError(f"{path}:{lineno}: {key!r} must be a string or an integer, got {value!r}")
    text = str(value).strip()
    if not text:
        raise DataFormatError(f"{path}:{lineno}: {key!r} is empty")
    return text


def _as_text(value: Any, path: Path, lineno: int, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataFormatError(f"{path}:{lineno}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _split_tsv(path: Path, lineno: int, line: str, what: str) -> tuple[str, str]:
    parts = line.split("\t", 1)
    if len(parts) != 2:
        raise DataFormatError(f"{path}:{lineno}: expected {what} (2 tab-separated columns), got {line[:80]!r}")
    ident = parts[0].strip()
    if not ident:
        raise DataFormatError(f"{path}:{lineno}: empty id in the first column")
    return ident, parts[1]


def docs_tsv(paths: Sequence[Path]) -> Iterator[Located]:
    """``doc_id<TAB>text`` per line (MS MARCO collection.tsv layout)."""
    for path in paths:
        for lineno, line in numbered_lines(path):
            if line.strip():
                doc_id, text = _split_tsv(path, lineno, line, "doc_id<TAB>text")
                yield Located(path, lineno, LocalDoc(doc_id, "", text))


def docs_jsonl(paths: Sequence[Path]) -> Iterator[Located]:
    """One JSON object per line: BEIR ``{"_id", "title", "text"}`` or Pyserini ``{"id", "contents"}``."""
    for path, lineno, data, doc_id, text in _jsonl_id_text(paths, DOC_ID_KEYS, DOC_TEXT_KEYS):
        yield Located(path, lineno, LocalDoc(doc_id, _as_text(data.get("title"), path, lineno, "title"), text))


def queries_tsv(paths: Sequence[Path]) -> Iterator[Located]:
    """``qid<TAB>query`` per line (MS MARCO / Anserini topics)."""
    for path in paths:
        for lineno, line in numbered_lines(path):
            if line.strip():
                qid, text = _split_tsv(path, lineno, line, "qid<TAB>query")
                yield Located(path, lineno, GenericQuery(qid, text.strip()))


def queries_jsonl(paths: Sequence[Path]) -> Iterator[Located]:
    """One JSON object per line: BEIR ``{"_id", "text"}`` (also ``id``/``qid`` and ``query``)."""
    for path, lineno, _, qid, text in _jsonl_id_text(paths, QUERY_ID_KEYS, QUERY_TEXT_KEYS):
        yield Located(path, lineno, GenericQuery(qid, text))


_TREC_TAG = re.compile(r"^\s*<(/?)(top|num|title|desc|narr)>(.*)$", re.IGNORECASE)


def queries_trec(paths: Sequence[Path]) -> Iterator[Located]:
    """TREC SGML topics (``<top> <num> Number: 301 <title> ... </top>``); the query text is the title."""
    for path in paths:
        fields: dict[str, list[str]] | None = None
        current: str | None = None
        start = 0
        for lineno, line in numbered_lines(path):
            match = _TREC_TAG.match(line)
            if match:
                closing, tag, rest = match.group(1), match.group(2).lower(), match.group(3)
                if tag == "top" and not closing:
                    if fields is not None:
                        raise DataFormatError(f"{path}:{lineno}: <top> inside the topic opened at line {start}")
                    fields, current, start = {}, None, lineno
                    continue
                if fields is None:
                    raise DataFormatError(f"{path}:{lineno}: <{closing}{tag}> outside of a <top> ... </top> block")
                if tag == "top":
                    num = " ".join(fields.get("num", [])).strip()
                    num = re.sub(r"^Number:\s*", "", num, flags=re.IGNORECASE).strip()
                    title = " ".join(" ".join(fields.get("title", [])).split())
                    if not num:
                        raise DataFormatError(f"{path}:{start}: topic without <num> (ends at line {lineno})")
                    if not title:
                        raise DataFormatError(f"{path}:{start}: topic {num} has an empty <title>")
                    yield Located(path, start, GenericQuery(num, title))
                    fields, current = None, None
                    continue
                if not closing:
                    current = tag
                    fields.setdefault(tag, []).append(re.sub(r"</\w+>", "", rest))
            elif fields is not None and current is not None:
                fields[current].append(line)
            elif line.strip() and fields is None:
                raise DataFormatError(f"{path}:{lineno}: text outside of a <top> ... </top> block: {line[:80]!r}")
        if fields is not None:
            raise DataFormatError(f"{path}:{start}: <top> is never closed by </top>")


def _relevance(path: Path, lineno: int, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        try:
            as_float = float(value)
        except ValueError:
            as_float = None
        if as_float is not None and as_float.is_integer():
            return int(as_float)
        raise DataFormatError(f"{path}:{lineno}: relevance must be an integer, got {value!r}") from None


def qrels_trec(paths: Sequence[Path]) -> Iterator[Located]:
    """TREC qrels: ``qid iteration docid relevance`` (whitespace-separated)."""
    for path, lineno, line, cols in split_lines(paths):
        if len(cols) != 4:
            raise DataFormatError(
                f"{path}:{lineno}: expected 4 columns 'qid iteration docid relevance' (TREC qrels), "
                f"got {len(cols)}: {line[:80]!r}"
            )
        qid, iteration, doc_id, rel = cols
        yield Located(path, lineno, TrecQrel(qid, doc_id, _relevance(path, lineno, rel), iteration))


def qrels_beir(paths: Sequence[Path]) -> Iterator[Located]:
    """BEIR qrels: a header line ``query-id<TAB>corpus-id<TAB>score`` then ``qid<TAB>docid<TAB>score``."""
    for path in paths:
        header_seen = False
        for lineno, line in numbered_lines(path):
            cols = line.split()
            if not header_seen:
                if cols != BEIR_QRELS_HEADER:
                    raise DataFormatError(
                        f"{path}:{lineno}: expected the BEIR header 'query-id<TAB>corpus-id<TAB>score', "
                        f"got {line[:80]!r}"
                    )
                header_seen = True
                continue
            if not cols:
                continue
            if len(cols) != 3:
                raise DataFormatError(
                    f"{path}:{lineno}: expected 3 columns 'query-id corpus-id score', got {len(cols)}: {line[:80]!r}"
                )
            qid, doc_id, rel = cols
            yield Located(path, lineno, TrecQrel(qid, doc_id, _relevance(path, lineno, rel), "0"))
        if not header_seen:
            raise DataFormatError(f"{path}:1: empty qrels file (expected the header 'query-id corpus-id score')")


Reader = Callable[[Sequence[Path]], Iterator[Located]]
# Formats are keyed "<entity>/<format>"; other modules (classic, passage_pool) add theirs.
FORMATS: Registry[Reader] = Registry("local file format")
FORMATS.add("docs/tsv", docs_tsv)
FORMATS.add("docs/jsonl", docs_jsonl)
FORMATS.add("queries/tsv", queries_tsv)
FORMATS.add("queries/jsonl", queries_jsonl)
FORMATS.add("queries/trec", queries_trec)
FORMATS.add("qrels/trec", qrels_trec)
FORMATS.add("qrels/beir", qrels_beir)


def _first_content_line(path: Path) -> str:
    for _, line in numbered_lines(path):
        if line.strip():
            return line.strip()
    raise DataFormatError(f"{path}:1: the file is empty")


def sniff_format(entity: str, path: Path) -> str:
    """Guess the format of a file from its name (docs) or its first non-blank line (queries, qrels)."""
    require_file(path, entity)
    name = path.name.lower().removesuffix(".gz")
    if entity == "docs":
        return "jsonl" if name.endswith((".jsonl", ".json")) else "tsv"
    first = _first_content_line(path)
    if entity == "queries":
        if first.lower().startswith("<top>"):
            return "trec"
        return "jsonl" if first.startswith("{") else "tsv"
    if entity == "qrels":
        return "beir" if first.split() == BEIR_QRELS_HEADER else "trec"
    raise ValueError(f"unknown entity {entity!r}; expected one of {', '.join(ENTITIES)}")


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


# --------------------------------------------------------------------------------------------------------- specs


def check_dataset_id(dataset_id: str) -> str:
    prefix = dataset_id.split("/", 1)[0]
    if not _ID_RE.match(dataset_id) or prefix not in LOCAL_PREFIXES or "/" not in dataset_id:
        raise ValueError(
            f"invalid local dataset id {dataset_id!r}: use '<prefix>/<name>' with prefix one of "
            f"{', '.join(LOCAL_PREFIXES)} and a name of letters, digits, '.', '_', '-' (e.g. 'local/my-corpus')"
        )
    return dataset_id


def check_name(name: str) -> str:
    if not _ID_RE.match(name):
        raise ValueError(f"invalid dataset name {name!r}: use letters, digits, '.', '_', '-' (e.g. 'my-corpus')")
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
        raise KeyError(
            f"{key} is not registered (looked in {registry_file()}); register it first, e.g. with "
            "retriever.data.sources.register_trec / register_beir_folder, or import-classic for classic/*"
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
        raise FileNotFoundError(f"{folder}: BEIR folder not found (expected corpus.jsonl, queries.jsonl, qrels/)")

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
        raise ValueError("register_trec needs at least one of docs, topics, qrels")
    return register_local_dataset(f"local/{name}", spec, home=home, validate=validate)
