"""The classic IR test collections offline: Cranfield and NPL (ir_datasets ``cranfield``/``vaswani``), MED, CISI.

``import_classic`` places the Glasgow originals where ir_datasets' own ``cranfield`` and ``vaswani`` modules
read their cached files (``$IR_DATASETS_HOME/<name>/{docs,queries,qrels}.txt``, the members of the original
archives, uncompressed), so ``ir_datasets.load("vaswani")`` works without a download. MED and CISI are not in
ir_datasets: their SMART files (``.I .T .A .W .X``) are registered as local datasets ``classic/med`` and
``classic/cisi``.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import ir_datasets
from ir_datasets.formats import GenericQuery, TrecQrel

from retriever.data.local import (
    FORMATS,
    DataFormatError,
    LocalDoc,
    Located,
    numbered_lines,
    register_local_dataset,
    split_lines,
)
from retriever.errors import UnknownNameError

_FIELD = re.compile(r"^\.([A-Z])(\s.*)?$")


def _smart_id(value: str) -> str:
    # ".I 001" and a qrels "1" name the same record.
    value = value.strip()
    return str(int(value)) if value.isdigit() else value


def smart_records(path: Path) -> Iterator[tuple[int, str, dict[str, str]]]:
    """(line of .I, id, {field letter: text}) for each record of a SMART file (``.I id`` then ``.X`` fields).

    Field text keeps its line breaks; text on the tag line itself (``.I 12``) is the field's first line.
    """
    record: dict[str, list[str]] | None = None
    record_id, start, field = "", 0, ""
    for lineno, line in numbered_lines(path):
        match = _FIELD.match(line.rstrip())
        if match and match.group(1) == "I":
            if record is not None:
                yield start, record_id, {k: "\n".join(v) for k, v in record.items()}
            record_id = (match.group(2) or "").strip()
            if not record_id:
                raise DataFormatError(f"{path}:{lineno}: '.I' without a record id (expected '.I <id>')")
            record, start, field = {}, lineno, ""
        elif match:
            if record is None:
                raise DataFormatError(f"{path}:{lineno}: field {line.strip()!r} before the first '.I <id>' line")
            field = match.group(1)
            rest = (match.group(2) or "").strip()
            record.setdefault(field, [])
            if rest:
                record[field].append(rest)
        elif record is None:
            if line.strip():
                raise DataFormatError(f"{path}:{lineno}: expected '.I <id>' to start a record, got {line[:80]!r}")
        elif not field:
            if line.strip():
                raise DataFormatError(
                    f"{path}:{lineno}: text before any field tag (.T/.A/.W/...) in record {record_id}"
                )
        else:
            record[field].append(line)
    if record is not None:
        yield start, record_id, {k: "\n".join(v) for k, v in record.items()}


def _clean(text: str) -> str:
    # SMART files pad lines with spaces and wrap at 72 columns; one space between words is what the text means.
    return " ".join(text.split())


def docs_smart(paths: Sequence[Path]) -> Iterator[Located]:
    """SMART documents: id from .I, title from .T, text from .W (authors, citations etc. are not text)."""
    for path in paths:
        for lineno, record_id, fields in smart_records(path):
            yield Located(
                path, lineno, LocalDoc(_smart_id(record_id), _clean(fields.get("T", "")), _clean(fields.get("W", "")))
            )


def queries_smart(paths: Sequence[Path]) -> Iterator[Located]:
    """SMART queries: the .W text (the .T title when a query has no .W), id from .I."""
    for path in paths:
        for lineno, record_id, fields in smart_records(path):
            text = _clean(fields.get("W", "")) or _clean(fields.get("T", ""))
            if not text:
                raise DataFormatError(f"{path}:{lineno}: query {record_id} has no text (.W)")
            yield Located(path, lineno, GenericQuery(_smart_id(record_id), text))


def qrels_pairs(paths: Sequence[Path]) -> Iterator[Located]:
    """``qid docid [ignored columns]`` per line, each pair relevant (CISI.REL, MED.REL.OLD: ``q d 0 0.000000``)."""
    for path, lineno, line, cols in split_lines(paths):
        if len(cols) < 2 or not cols[0].isdigit() or not cols[1].isdigit():
            raise DataFormatError(f"{path}:{lineno}: expected 'query-number doc-number ...', got {line[:80]!r}")
        yield Located(path, lineno, TrecQrel(_smart_id(cols[0]), _smart_id(cols[1]), 1, "0"))


FORMATS.add("docs/smart", docs_smart)
FORMATS.add("queries/smart", queries_smart)
FORMATS.add("qrels/pairs", qrels_pairs)


# Where ir_datasets' cranfield/vaswani modules read their cached files: name -> {cache file: (folder, source file)}
IR_DATASETS_LAYOUT: dict[str, dict[str, tuple[str, str]]] = {
    "vaswani": {
        "docs.txt": ("npl", "doc-text"),
        "queries.txt": ("npl", "query-text"),
        "qrels.txt": ("npl", "rlv-ass"),
    },
    "cranfield": {
        "docs.txt": ("cran", "cran.all.1400"),
        "queries.txt": ("cran", "cran.qry"),
        # cran.tar.gz calls it "cranqrel"; the same file is often distributed as cran.qrels
        "qrels.txt": ("cran", "cran.qrels|cranqrel"),
    },
}

# Local SMART collections: dataset id -> {entity: (folder, file, format)}
SMART_COLLECTIONS: dict[str, dict[str, tuple[str, str, str]]] = {
    "classic/med": {
        "docs": ("med", "MED.ALL", "smart"),
        "queries": ("med", "MED.QRY", "smart"),
        "qrels": ("med", "MED.REL", "trec"),
    },
    "classic/cisi": {
        "docs": ("cisi", "CISI.ALL", "smart"),
        "queries": ("cisi", "CISI.QRY", "smart"),
        "qrels": ("cisi", "CISI.REL", "pairs"),
    },
}

CLASSIC_IDS = ("vaswani", "cranfield", "classic/med", "classic/cisi")


def _find_source(src_dir: Path, folder: str, names: str) -> Path:
    tried = []
    for name in names.split("|"):
        for candidate in (
            src_dir / folder / name,
            src_dir / folder / f"{name}.gz",
            src_dir / name,
            src_dir / f"{name}.gz",
        ):
            if candidate.is_file():
                return candidate
            tried.append(str(candidate))
    raise FileNotFoundError(
        f"{src_dir}: cannot find {names.replace('|', ' or ')} (tried {', '.join(tried[:2])}, ...); expected the "
        "Glasgow test collections laid out as cran/, med/, cisi/, npl/ (files may be gzipped)"
    )


def _read_original(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def _place(data: bytes, target: Path) -> bool:
    """Write ``data`` to ``target`` atomically unless it already holds exactly these bytes. True if written."""
    if target.is_file() and target.read_bytes() == data:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    return True


def import_classic(
    src_dir: str | Path,
    ir_datasets_home: str | Path | None = None,
    collections: Sequence[str] = CLASSIC_IDS,
) -> list[str]:
    """Make the classic collections usable offline under ``ir_datasets_home`` (default: IR_DATASETS_HOME).

    ``src_dir`` holds the originals as distributed (``cran/cran.all.1400[.gz] cran.qry cran.qrels``,
    ``npl/doc-text[.gz] query-text rlv-ass``, ``med/MED.ALL[.gz] MED.QRY MED.REL``,
    ``cisi/CISI.ALL[.gz] CISI.QRY CISI.REL``). Idempotent; returns the dataset ids made available.

    Note: ir_datasets fixes the cache paths of its built-in datasets when it is imported, so a process sees the
    placed ``vaswani``/``cranfield`` files only if its IR_DATASETS_HOME was this home when ir_datasets loaded.
    """
    src = Path(src_dir)
    if not src.is_dir():
        what = "is a file, not a folder" if src.exists() else "not found"
        raise FileNotFoundError(f"{src}: folder of the classic collections {what} (it holds cran/ med/ cisi/ npl/)")
    home = Path(ir_datasets_home) if ir_datasets_home is not None else ir_datasets.util.home_path()
    unknown = [c for c in collections if c not in CLASSIC_IDS]
    if unknown:
        raise UnknownNameError(f"unknown classic collection(s) {unknown}; known: {', '.join(CLASSIC_IDS)}")
    done = []
    for dataset_id in collections:
        if dataset_id in IR_DATASETS_LAYOUT:
            changed = False
            for cache_name, (folder, names) in IR_DATASETS_LAYOUT[dataset_id].items():
                data = _read_original(_find_source(src, folder, names))
                changed |= _place(data, home / dataset_id / cache_name)
            store = home / dataset_id / "docs.pklz4"
            if changed and store.exists():
                shutil.rmtree(store)  # built from the previous files
        else:
            spec = {}
            for entity, (folder, name, fmt) in SMART_COLLECTIONS[dataset_id].items():
                target = home / dataset_id / name
                _place(_read_original(_find_source(src, folder, name)), target)
                spec[entity] = {"format": fmt, "paths": [str(target)]}
            register_local_dataset(dataset_id, spec, home=home)
        done.append(dataset_id)
    return done
