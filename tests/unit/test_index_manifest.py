"""Shard manifests: a corrupted, incomplete, edited or mismatched shard is refused with a message that says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_encodings

from retriever.checksums import sha256_file
from retriever.encoding import DenseBatch, SparseBatch
from retriever.index import (
    FORMAT_VERSION,
    IndexFormatError,
    IndexMismatchError,
    build_shard,
    build_shards,
    open_shard,
    open_shards,
)
from retriever.index.manifest import MANIFEST_FILE

SHA = "5" * 64


def sparse_batch(n: int = 50) -> SparseBatch:
    rng = np.random.default_rng(0)
    terms = [(np.sort(rng.choice(30, 4, replace=False)), rng.uniform(0.1, 1, 4)) for _ in range(n)]
    return SparseBatch.from_terms([f"d{i}" for i in range(n)], terms, vocab_size=30)


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    build_shard(sparse_batch(), tmp_path / "shard", "exact", encoder_path="enc", encoder_sha256=SHA)
    return tmp_path / "shard"


def test_manifest_content(shard_dir: Path) -> None:
    content = json.loads((shard_dir / MANIFEST_FILE).read_text())
    assert content["format_version"] == FORMAT_VERSION
    assert (content["kind"], content["paradigm"], content["doc_count"], content["vocab_size"]) == (
        "exact",
        "sparse",
        50,
        30,
    )
    assert content["dimension"] is None
    assert content["encoder"] == {"path": "enc", "sha256": SHA}
    assert content["doc_ids_file"] == "doc_ids.txt"
    assert sorted(content["files"]) == ["doc_ids.txt", "doc_indices.npy", "term_offsets.npy", "weights.npy"]
    for name, entry in content["files"].items():
        assert entry == {"sha256": sha256_file(shard_dir / name), "bytes": (shard_dir / name).stat().st_size}
    # doc ids are stored sorted (str order): d0, d1, d10, d11, ...
    assert (shard_dir / "doc_ids.txt").read_text().split("\n")[:4] == ["d0", "d1", "d10", "d11"]
    assert open_shard(shard_dir).doc_count == 50


def test_flipped_bytes_are_detected(shard_dir: Path) -> None:
    path = shard_dir / "weights.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        IndexFormatError, match=r"weights.npy: sha256 .* does not match .*corrupted.*rebuild the index"
    ):
        open_shard(shard_dir)
    open_shard(shard_dir, verify_hashes=False)  # sizes still match: the fast check cannot see it, by design


def test_truncated_file_is_detected_without_hashing(shard_dir: Path) -> None:
    path = shard_dir / "doc_indices.npy"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(IndexFormatError, match=r"doc_indices.npy: \d+ bytes but the manifest says \d+ .*rebuild"):
        open_shard(shard_dir, verify_hashes=False)


def test_missing_and_extra_files(shard_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    (shard_dir / "term_offsets.npy").unlink()
    with pytest.raises(IndexFormatError, match=r"missing file\(s\) term_offsets.npy listed in manifest.json; rebuild"):
        open_shard(shard_dir)
    (copy / "stray.bin").write_bytes(b"x")
    with pytest.raises(IndexFormatError, match=r"unexpected file\(s\) stray.bin not listed"):
        open_shard(copy)
    (copy / "stray.bin").unlink()
    (copy / MANIFEST_FILE).unlink()
    with pytest.raises(IndexFormatError, match="manifest.json: missing; .* is not an index shard"):
        open_shard(copy)


def test_edited_manifest_is_detected(shard_dir: Path) -> None:
    path = shard_dir / MANIFEST_FILE
    original = path.read_text()
    content = json.loads(original)
    content["doc_count"] = 49
    path.write_text(json.dumps(content))
    with pytest.raises(
        IndexFormatError, match="checksum does not match its content .it was edited or corrupted.; rebuild"
    ):
        open_shard(shard_dir)
    path.write_text(original[: len(original) // 2])
    with pytest.raises(IndexFormatError, match=r"manifest.json:\d+: not valid JSON"):
        open_shard(shard_dir)


def test_other_format_version_is_refused(shard_dir: Path) -> None:
    from retriever.index.manifest import content_checksum

    path = shard_dir / MANIFEST_FILE
    content = json.loads(path.read_text())
    content["format_version"] = FORMAT_VERSION + 1
    content["checksum"] = content_checksum(content)
    path.write_text(json.dumps(content))
    with pytest.raises(
        IndexFormatError, match=f"format version {FORMAT_VERSION + 1}, but .* reads version 1; rebuild"
    ):
        open_shard(shard_dir)


def test_expected_encoder_and_query_vocabulary(shard_dir: Path) -> None:
    assert open_shard(shard_dir, expected_encoder_sha256=SHA).manifest.encoder["sha256"] == SHA
    with pytest.raises(
        IndexMismatchError, match="built with encoder 'enc' .* but encoder sha256 6666666666666666… was"
    ):
        open_shard(shard_dir, expected_encoder_sha256="6" * 64)
    shard = open_shard(shard_dir)
    wrong = SparseBatch.from_terms(["q"], [(np.array([1]), np.array([1.0]))], vocab_size=31)
    with pytest.raises(IndexMismatchError, match="vocabulary of 30 terms but the queries have 31"):
        shard.search(wrong, 3)


def test_dense_index_file_corruption(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    vectors = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    build_shard(
        DenseBatch([f"d{i}" for i in range(20)], vectors), tmp_path / "s", encoder_path="e", encoder_sha256=SHA
    )
    path = tmp_path / "s" / "index.faiss"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="index.faiss: sha256"):
        open_shard(tmp_path / "s")


def test_shard_set_checks(tmp_path: Path) -> None:
    write_encodings(tmp_path / "enc", sparse_batch(40), encoder_path="enc", encoder_sha256=SHA)
    build_shards(tmp_path / "enc", tmp_path / "index", 3)
    assert len(open_shards(tmp_path / "index")) == 3
    assert len(open_shards(tmp_path / "index" / "shard-00001")) == 1  # a single shard folder opens too
    shutil.copytree(tmp_path / "index", tmp_path / "copy")
    shutil.rmtree(tmp_path / "index" / "shard-00002")
    with pytest.raises(IndexFormatError, match="shard-00002: shard listed in shards.json is missing; rebuild"):
        open_shards(tmp_path / "index")
    content = json.loads((tmp_path / "copy" / "shards.json").read_text())
    content["num_shards"] = 2
    (tmp_path / "copy" / "shards.json").write_text(json.dumps(content))
    with pytest.raises(IndexFormatError, match="shards.json: checksum does not match"):
        open_shards(tmp_path / "copy")
    with pytest.raises(IndexFormatError, match="shards.json: missing"):
        open_shards(tmp_path / "enc")
    # a shard from another index dropped into the set
    build_shards(tmp_path / "enc", tmp_path / "other", 1)
    shutil.rmtree(tmp_path / "copy")
    shutil.copytree(tmp_path / "other", tmp_path / "copy")
    shutil.copytree(tmp_path / "other" / "shard-00000", tmp_path / "copy" / "shard-00007")
    with pytest.raises(IndexFormatError, match=r"unexpected folder\(s\) shard-00007 not listed in shards.json"):
        open_shards(tmp_path / "copy")
