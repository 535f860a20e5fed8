"""Strict readers of local collection files (TSV, JSONL, TREC topics and qrels, BEIR qrels); every problem is
reported as ``file:line: what is wrong; how to fix it``."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ir_datasets.formats import GenericQuery, TrecQrel

from retriever.errors import DataFormatError
from retriever.registry import Registry

# Ids of local datasets start with one of these; they never shadow ir_datasets' own ids.
LOCAL_PREFIXES = ("local", "classic")
ENTITIES = ("docs", "queries", "qrels")

DOC_ID_KEYS = ("_id", "doc_id", "docid", "id", "pid")
DOC_TEXT_KEYS = ("text", "contents", "body", "passage")
QUERY_ID_KEYS = ("_id", "query_id", "qid", "id")
QUERY_TEXT_KEYS = ("text", "query", "title")
BEIR_QRELS_HEADER = ["query-id", "corpus-id", "score"]


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
