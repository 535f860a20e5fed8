"""Shard manifests: what a shard directory holds, and the checks that refuse a shard that does not match it.

``manifest.json`` records the format version, the index kind and paradigm, the encoder (path and sha256), the
document count, the dimension (dense) or vocabulary size (sparse), the build and search parameters, the pruning
settings, the doc-id file, and the sha256 and size of every other file in the directory. A ``checksum`` over the
manifest's own content catches hand edits. Loading verifies all of it; any mismatch raises ``IndexFormatError``
saying what is wrong and to rebuild the shard. Nothing here uses pickle: manifests are JSON, doc ids are text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retriever.checksums import sha256_file
from retriever.errors import DataFormatError, UserError

FORMAT = "retriever-index-shard"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DOC_IDS_FILE = "doc_ids.txt"
REBUILD = "rebuild the index (`retriever index ...`) into an empty folder"


class IndexFormatError(UserError, ValueError):
    """A shard that is missing, corrupted, edited or built for something else; the message says how to fix it."""


class IndexMismatchError(UserError, ValueError):
    """Queries or an expected encoder that do not fit the index (dimension, vocabulary, paradigm, encoder hash)."""


def content_checksum(content: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest without its checksum field."""
    body = {k: v for k, v in content.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


@dataclass
class Manifest:
    kind: str
    paradigm: str
    encoder: dict[str, str]  # {"path", "sha256"}
    doc_count: int
    dimension: int | None  # dense
    vocab_size: int | None  # sparse
    params: dict[str, Any]  # build and default search parameters of the kind
    pruning: dict[str, int | None]  # {"doc_top_k", "query_top_k", "encoding_top_k"}
    doc_ids_file: str = DOC_IDS_FILE
    doc_order: str = "doc id ascending (Python str order); a document's position in doc_ids_file is its index id"
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"sha256", "bytes"}
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def size(self) -> int:
        """The query vectors' length: the dimension (dense) or the vocabulary size (sparse)."""
        return int(self.dimension if self.paradigm == "dense" else self.vocab_size)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        content = asdict(self)
        content["checksum"] = content_checksum(content)
        return content


def write_doc_ids(path: str | Path, doc_ids: Sequence[str]) -> None:
    """One id per line, UTF-8; ids may not be empty or contain line breaks (the file could not be read back)."""
    for doc_id in doc_ids:
        if not doc_id or "\n" in doc_id or "\r" in doc_id:
            raise DataFormatError(f"document id {doc_id!r} is empty or contains a line break; use ids without them")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(doc_ids))
        if doc_ids:
            f.write("\n")


def read_doc_ids(path: str | Path, expected: int) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    ids = text.split("\n")
    if ids and ids[-1] == "":
        ids.pop()
    if len(ids) != expected:
        raise IndexFormatError(f"{path}: {len(ids)} document ids but the manifest says {expected}; {REBUILD}")
    return ids


def write_manifest(directory: str | Path, manifest: Manifest) -> Manifest:
    """Hash every file in ``directory`` (other than the manifest) into ``manifest.files`` and write it."""
    folder = Path(directory)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.iterdir()):
        if path.name == MANIFEST_FILE:
            continue
        if not path.is_file():
            raise IndexFormatError(f"{path}: shard directories hold plain files only")
        files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    if manifest.doc_ids_file not in files:
        raise IndexFormatError(f"{folder}: the doc-id file {manifest.doc_ids_file} was not written")
    manifest.files = files
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(
    directory: str | Path, *, verify_hashes: bool = True, expected_encoder_sha256: str | None = None
) -> Manifest:
    """Read and verify a shard's manifest against the directory's files. ``verify_hashes=False`` checks presence
    and sizes only (fast for very large shards you trust)."""
    folder = Path(directory)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise IndexFormatError(f"{folder}: shard directory not found")
    if not path.is_file():
        raise IndexFormatError(
            f"{path}: missing; {folder} is not an index shard (or its build did not finish); {REBUILD}"
        )
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = getattr(exc, "lineno", "?")
        raise IndexFormatError(
            f"{path}:{line}: not valid JSON ({exc}); the manifest is corrupted; {REBUILD}"
        ) from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise IndexFormatError(f"{path}: not a {FORMAT} manifest; {REBUILD}")
    version = content.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: index format version {version!r}, but this version of retriever reads version "
            f"{FORMAT_VERSION}; {REBUILD} with this version"
        )
    if content.get("checksum") != content_checksum(content):
        raise IndexFormatError(
            f"{path}: the manifest's checksum does not match its content (it was edited or corrupted); {REBUILD}"
        )
    try:
        manifest = Manifest(**{k: v for k, v in content.items() if k != "checksum"})
    except TypeError as exc:
        raise IndexFormatError(f"{path}: unexpected manifest fields ({exc}); {REBUILD}") from None

    on_disk = {p.name for p in folder.iterdir() if p.name != MANIFEST_FILE}
    missing = sorted(set(manifest.files) - on_disk)
    if missing:
        raise IndexFormatError(f"{folder}: missing file(s) {', '.join(missing)} listed in {MANIFEST_FILE}; {REBUILD}")
    extra = sorted(on_disk - set(manifest.files))
    if extra:
        raise IndexFormatError(
            f"{folder}: unexpected file(s) {', '.join(extra)} not listed in {MANIFEST_FILE}; remove them or {REBUILD}"
        )
    for name, entry in sorted(manifest.files.items()):
        file = folder / name
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise IndexFormatError(
                f"{file}: {size} bytes but the manifest says {entry['bytes']} (truncated or modified); {REBUILD}"
            )
        if verify_hashes:
            digest = sha256_file(file)
            if digest != entry["sha256"]:
                raise IndexFormatError(
                    f"{file}: sha256 {digest[:16]}… does not match the manifest's {entry['sha256'][:16]}… (the file "
                    f"is corrupted or was modified); {REBUILD}"
                )
    if manifest.doc_ids_file not in manifest.files:
        raise IndexFormatError(f"{path}: the doc-id file {manifest.doc_ids_file} is not covered; {REBUILD}")
    check_encoder(manifest, expected_encoder_sha256, str(folder))
    return manifest


def check_encoder(manifest: Manifest, expected_sha256: str | None, where: str) -> None:
    if expected_sha256 is not None and manifest.encoder.get("sha256") != expected_sha256:
        raise IndexMismatchError(
            f"{where}: the index was built with encoder {manifest.encoder.get('path')!r} (sha256 "
            f"{str(manifest.encoder.get('sha256'))[:16]}…), but encoder sha256 {expected_sha256[:16]}… was expected; "
            "search with the encoder the index was built from, or rebuild the index from encodings of this encoder"
        )
