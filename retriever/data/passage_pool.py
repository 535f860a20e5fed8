"""A real-text mini corpus: the MS MARCO passages retrieved for TREC DL topics by several retrievers.

rank_llm's retrieve-results files (``<RETRIEVER>/retrieve_results_<year>.json.gz``, e.g. ``dl19``) are JSON lists of
``{"query": str, "hits": [{"qid", "docid", "rank", "score", "content"}]}``. The union of their passages, one text
per passage id, is a small corpus with real MS MARCO text (for DL19: 14,581 passages). It is a biased subset of
the 8.8M-passage collection (only the candidates of the pooled retrievers), good for smoke tests and
reranking-style evaluation, not for absolute numbers.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from retriever.data.local import (
    FORMATS,
    DataFormatError,
    LocalDoc,
    Located,
    check_name,
    register_local_dataset,
    require_file,
    sniff_format,
)
from retriever.errors import SettingError

# Every retrieve-results file at any depth, whatever its TREC DL year (dl19, dl20, ...).
DEFAULT_PATTERN = "**/retrieve_results_*.json.gz"


def result_files(results_dir: str | Path, pattern: str = DEFAULT_PATTERN) -> list[Path]:
    """The retrieve-results files under ``results_dir``, sorted by path (this order decides duplicates)."""
    folder = Path(results_dir)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise FileNotFoundError(f"{folder}: folder of rank_llm retrieve results {what}")
    try:
        files = sorted(p for p in folder.glob(pattern) if p.is_file())
    except ValueError as exc:  # an absolute or otherwise invalid glob
        raise SettingError(f"pattern {pattern!r}: not a glob relative to {folder} ({exc})") from None
    if not files:
        raise FileNotFoundError(
            f"{folder}: no file matches {pattern!r} (expected e.g. <RETRIEVER>/retrieve_results_dl19.json.gz; "
            "pass the pattern of your files)"
        )
    return files


def _load_results(path: Path) -> list[dict]:
    require_file(path, "retrieve-results file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except gzip.BadGzipFile as exc:
        raise DataFormatError(f"{path}: not a gzip file ({exc}); drop the .gz suffix for plain JSON") from None
    except EOFError:
        raise DataFormatError(f"{path}: the gzip file is truncated; copy it again") from None
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 JSON ({exc.reason} at byte {exc.start})") from None
    if not isinstance(data, list):
        raise DataFormatError(
            f"{path}: expected a JSON list of {{'query', 'hits'}} entries, got {type(data).__name__}"
        )
    return data


def docs_rank_llm(paths: Sequence[Path]) -> Iterator[Located]:
    """Distinct passages of retrieve-results files: the first text seen per docid wins (files in the given order,
    then queries and hits in file order), so the result does not depend on anything but the inputs."""
    seen: set[str] = set()
    for path in paths:
        for i, entry in enumerate(_load_results(path)):
            hits = entry.get("hits") if isinstance(entry, dict) else None
            if not isinstance(hits, list):
                raise DataFormatError(f"{path}: entry {i}: expected an object with a 'hits' list")
            for j, hit in enumerate(hits):
                if not isinstance(hit, dict) or "docid" not in hit or not isinstance(hit.get("content"), str):
                    raise DataFormatError(f"{path}: entry {i}, hit {j}: expected 'docid' and a string 'content'")
                doc_id = str(hit["docid"]).strip()
                if doc_id not in seen:
                    seen.add(doc_id)
                    # JSON has no line numbers here; the entry index locates the record.
                    yield Located(path, i + 1, LocalDoc(doc_id, "", hit["content"]))


FORMATS.add("docs/rank-llm", docs_rank_llm)


def load_passage_pool(results_dir: str | Path, pattern: str = DEFAULT_PATTERN) -> dict[str, str]:
    """``{passage id: text}`` over all retrieve-results files matching ``pattern`` under ``results_dir``."""
    return {item.record.doc_id: item.record.text for item in docs_rank_llm(result_files(results_dir, pattern))}


def register_passage_pool(
    name: str,
    results_dir: str | Path,
    topics: str | Path,
    qrels: str | Path,
    *,
    pattern: str = DEFAULT_PATTERN,
    home: str | Path | None = None,
    validate: bool = True,
) -> str:
    """Register the passage pool with its topics (``qid<TAB>query``) and qrels (TREC) as ``local/<name>``."""
    check_name(name)
    spec = {
        "docs": {"format": "rank-llm", "paths": [str(p) for p in result_files(results_dir, pattern)]},
        "queries": {"format": sniff_format("queries", require_file(Path(topics), "topics")), "paths": [str(topics)]},
        "qrels": {"format": sniff_format("qrels", require_file(Path(qrels), "qrels")), "paths": [str(qrels)]},
    }
    return register_local_dataset(f"local/{name}", spec, home=home, validate=validate)
