"""TREC run and qrels files (optionally gzipped): the one reader and writer, shared by index search and evaluation.

Runs and qrels are plain dicts: ``{qid: {docid: score}}`` and ``{qid: {docid: grade}}``. A run's ranking is
trec_eval's: score descending, ties by document id descending (``trec_order``); the rank column is not used.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Literal, TypeVar

from retriever.errors import UserError

RunDict = dict[str, dict[str, float]]
QrelsDict = dict[str, dict[str, int]]
_Value = TypeVar("_Value")


class TrecFormatError(UserError, ValueError):
    """A TREC run or qrels file (or an in-memory run/qrels) is malformed."""


def _open_text(path: Path, mode: Literal["rt", "wt"]) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, mode, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def _numbered_lines(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, whitespace-split fields) for every non-blank line."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a TREC file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with _open_text(path, "rt") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                fields = line.split()
                if fields:
                    yield lineno, fields
        except gzip.BadGzipFile as err:
            raise TrecFormatError(f"{path}: not a gzip file ({err}); drop the .gz suffix for plain text") from None
        except EOFError:
            raise TrecFormatError(
                f"{path}: the gzip file is truncated (it ends early); copy or write it again"
            ) from None
        except UnicodeDecodeError as err:
            raise TrecFormatError(
                f"{path}: not UTF-8 text ({err}); TREC files are plain text, optionally .gz"
            ) from None


def _read_trec_pairs(
    path: str | Path, columns: str, parse: Callable[[str, list[str]], _Value], duplicate: str, rule: str
) -> dict[str, dict[str, _Value]]:
    """``{qid: {docid: value}}`` of a TREC file whose lines hold the whitespace-separated ``columns``.

    The query id is the first column and the document id the third; ``parse(where, fields)`` turns a line into
    its value. A (query, document) pair may occur once: ``duplicate`` and ``rule`` word the error otherwise.
    """
    table: dict[str, dict[str, _Value]] = {}
    first_seen: dict[tuple[str, str], int] = {}
    expected = len(columns.split())
    for lineno, fields in _numbered_lines(path):
        where = f"{path}:{lineno}"
        if len(fields) != expected:
            raise TrecFormatError(
                f"{where}: expected {expected} whitespace-separated fields '{columns}', got {len(fields)}: "
                f"{' '.join(fields)!r}"
            )
        qid, docid = fields[0], fields[2]
        value = parse(where, fields)
        key = (qid, docid)
        if key in first_seen:
            raise TrecFormatError(
                f"{where}: {duplicate} {docid!r} for query {qid!r} (first at line {first_seen[key]}); "
                f"{rule} (query, document) pair once"
            )
        first_seen[key] = lineno
        table.setdefault(qid, {})[docid] = value
    return table


def _run_score(where: str, fields: list[str]) -> float:
    rank, score_text = fields[3], fields[4]
    try:
        int(rank)
    except ValueError:
        raise TrecFormatError(f"{where}: rank (field 4) must be an integer, got {rank!r}") from None
    try:
        score = float(score_text)
    except ValueError:
        raise TrecFormatError(f"{where}: score (field 5) must be a number, got {score_text!r}") from None
    if not math.isfinite(score):
        raise TrecFormatError(f"{where}: score (field 5) must be finite, got {score_text!r}")
    return score


def _qrels_grade(where: str, fields: list[str]) -> int:
    try:
        return int(fields[3])
    except ValueError:
        raise TrecFormatError(f"{where}: relevance grade (field 4) must be an integer, got {fields[3]!r}") from None


def read_run(path: str | Path) -> RunDict:
    """Read a TREC run (``qid Q0 docid rank score tag``, optionally gzipped).

    The rank column must be an integer but is not used: like trec_eval, the ranking comes from the scores.
    """
    return _read_trec_pairs(path, "qid Q0 docid rank score tag", _run_score, "duplicate document", "a run lists each")


def read_qrels(path: str | Path) -> QrelsDict:
    """Read TREC qrels (``qid iteration docid grade``, optionally gzipped); grades are integers."""
    return _read_trec_pairs(
        path, "qid 0 docid grade", _qrels_grade, "duplicate judgment of document", "qrels judge each"
    )


def trec_order(docs: Mapping[str, float]) -> list[tuple[str, float]]:
    """A query's (docid, score) pairs in trec_eval order: score descending, then docid descending."""
    bad = [d for d, s in docs.items() if not math.isfinite(s)]
    if bad:
        raise TrecFormatError(f"non-finite scores for documents {bad[:5]}; scores must be finite numbers")
    # Python's sort is stable, also with reverse=True: sort by the secondary key first, then the primary one.
    # str comparison is by code point, which matches strcmp on UTF-8 bytes.
    by_docid = sorted(docs.items(), key=lambda item: item[0], reverse=True)
    return sorted(by_docid, key=lambda item: item[1], reverse=True)


def _check_ids(value: str, what: str) -> None:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise TrecFormatError(f"{what} {value!r} must be a non-empty string without whitespace for a TREC file")


def write_run(run: Mapping[str, Mapping[str, float]], path: str | Path, tag: str, depth: int | None = None) -> None:
    """Write a TREC run (gzipped when ``path`` ends in .gz); ranks follow trec_eval's order (see ``trec_order``).

    Queries are written in sorted id order; ``depth`` keeps only the top ``depth`` documents of each query.
    """
    _check_ids(tag, "run tag")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open_text(path, "wt") as f:
        for qid in sorted(run):
            _check_ids(qid, "query id")
            ranked = trec_order(run[qid])
            for rank, (docid, score) in enumerate(ranked[:depth] if depth else ranked, start=1):
                _check_ids(docid, f"document id (query {qid!r})")
                f.write(f"{qid} Q0 {docid} {rank} {float(score)!r} {tag}\n")
