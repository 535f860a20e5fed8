"""The encodings format the indexer reads: round trip, validation with file and row, pruning while reading."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_encodings

from retriever.checksums import sha256_file
from retriever.encoding import DenseBatch, EncodingFormatError, SparseBatch, read_encodings
from retriever.errors import IntegrityError


def sparse_batch() -> SparseBatch:
    terms = [
        (np.array([0, 5, 9]), np.array([0.5, 2.0, 1.0])),
        (np.array([], dtype=np.int32), np.array([], dtype=np.float32)),
        (np.array([3, 4]), np.array([1.5, 0.25])),
    ]
    return SparseBatch.from_terms(["a", "b", "c"], terms, vocab_size=10)


def test_sparse_round_trip_across_files(tmp_path) -> None:
    info = write_encodings(tmp_path, sparse_batch(), encoder_path="m", encoder_sha256="s", rows_per_file=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoding.json", "part-00000.parquet", "part-00001.parquet"]
    assert json.loads((tmp_path / "encoding.json").read_text()) == {
        "format_version": 2,
        "paradigm": "sparse",
        "vocab_size": 10,
        "encoder": {"path": "m", "sha256": "s"},
        "count": 3,
        "prune_top_k": None,
        "kind": "passage",
        "max_length": 64,
        "files": ["part-00000.parquet", "part-00001.parquet"],
        "sha256": {name: sha256_file(tmp_path / name) for name in ("part-00000.parquet", "part-00001.parquet")},
    }
    schema = pq.read_schema(tmp_path / "part-00000.parquet")
    assert schema.field("term_ids").type == pa.list_(pa.int32())
    assert schema.field("weights").type == pa.list_(pa.float32())
    read_info, batch = read_encodings(tmp_path)
    assert read_info == info
    assert batch.ids == ["a", "b", "c"]
    assert batch.indptr.tolist() == [0, 3, 3, 5]
    assert batch.indices.tolist() == [0, 5, 9, 3, 4]
    assert batch.weights.tolist() == [0.5, 2.0, 1.0, 1.5, 0.25]
    _, pruned = read_encodings(tmp_path, prune_top_k=1)
    assert pruned.indices.tolist() == [5, 3] and pruned.weights.tolist() == [2.0, 1.5]


def test_dense_round_trip(tmp_path) -> None:
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    write_encodings(tmp_path, DenseBatch(["w", "x", "y", "z"], vectors), encoder_path="m", encoder_sha256="s")
    info, batch = read_encodings(tmp_path)
    assert (info.paradigm, info.size, info.count) == ("dense", 3, 4)
    assert batch.ids == ["w", "x", "y", "z"] and np.array_equal(batch.vectors, vectors)


def write_table(folder, table: pa.Table, info: dict) -> None:
    """A hand-made encodings folder (rows the writer would refuse), with a correct checksum."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-00000.parquet")
    digest = {"part-00000.parquet": sha256_file(folder / "part-00000.parquet")}
    (folder / "encoding.json").write_text(json.dumps({**info, "sha256": digest}))


COMMON = {"format_version": 2, "kind": "passage", "max_length": 64, "files": ["part-00000.parquet"]}
SPARSE_INFO = {"paradigm": "sparse", "vocab_size": 10, "encoder": {"path": "m", "sha256": "s"}, "count": 2, **COMMON}


def test_bad_rows_are_reported_with_file_and_row(tmp_path) -> None:
    table = pa.table({"doc_id": ["a", "b"], "term_ids": [[1, 2], [4, 3]], "weights": [[1.0, 1.0], [1.0, 1.0]]})
    write_table(tmp_path / "order", table, SPARSE_INFO)
    with pytest.raises(EncodingFormatError, match=r"part-00000.parquet: row 1 \(id 'b'\): term ids must be strictly"):
        read_encodings(tmp_path / "order")
    table = pa.table({"doc_id": ["a", "b"], "term_ids": [[1], [12]], "weights": [[1.0], [1.0]]})
    write_table(tmp_path / "range", table, SPARSE_INFO)
    with pytest.raises(EncodingFormatError, match=r"row 1 \(id 'b'\): term id 12 outside the vocabulary \[0, 10\)"):
        read_encodings(tmp_path / "range")
    table = pa.table({"doc_id": ["a", "b"], "term_ids": [[1], [2, 3]], "weights": [[1.0], [1.0]]})
    write_table(tmp_path / "lengths", table, SPARSE_INFO)
    with pytest.raises(EncodingFormatError, match=r"row 1 \(id 'b'\): 'term_ids' and 'weights' differ in length"):
        read_encodings(tmp_path / "lengths")
    table = pa.table({"doc_id": ["a", "b"], "weights": [[1.0], [1.0]]})
    write_table(tmp_path / "column", table, SPARSE_INFO)
    with pytest.raises(EncodingFormatError, match="missing column 'term_ids'"):
        read_encodings(tmp_path / "column")
    table = pa.table({"doc_id": ["a"], "term_ids": [[1]], "weights": [[1.0]]})
    write_table(tmp_path / "count", table, SPARSE_INFO)
    with pytest.raises(EncodingFormatError, match="hold 1 rows but encoding.json says count 2"):
        read_encodings(tmp_path / "count")
    dense_info = {"paradigm": "dense", "dimension": 3, "encoder": {"path": "m", "sha256": "s"}, "count": 2, **COMMON}
    write_table(
        tmp_path / "dense", pa.table({"doc_id": ["a", "b"], "vector": [[1.0, 2.0, 3.0], [1.0, 2.0]]}), dense_info
    )
    with pytest.raises(EncodingFormatError, match=r"row 1 \(id 'b'\): vector of length 2, but encoding.json says"):
        read_encodings(tmp_path / "dense")


def test_bad_encoding_json(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="encoding.json next to its parquet files"):
        read_encodings(tmp_path)
    (tmp_path / "encoding.json").write_text('{"format_version": 2, "paradigm": "sparse", "count": 1}')
    with pytest.raises(EncodingFormatError, match="sparse encodings need a positive integer 'vocab_size'"):
        read_encodings(tmp_path)
    (tmp_path / "encoding.json").write_text('{"paradigm": ')
    with pytest.raises(EncodingFormatError, match=r"encoding.json:1: invalid JSON"):
        read_encodings(tmp_path)


def test_a_folder_mixing_runs_is_refused(tmp_path) -> None:
    """A parquet file that encoding.json does not list (another writer's) is an error, not silently read."""
    write_encodings(tmp_path, sparse_batch(), encoder_path="m", encoder_sha256="s")
    pq.write_table(pq.read_table(tmp_path / "part-00000.parquet"), tmp_path / "part-00001.parquet")
    with pytest.raises(EncodingFormatError, match="not the ones encoding.json lists.*mixes runs"):
        read_encodings(tmp_path)
    info = json.loads((tmp_path / "encoding.json").read_text())
    (tmp_path / "encoding.json").write_text(json.dumps({**info, "format_version": 0}))
    with pytest.raises(EncodingFormatError, match="format_version 0, expected 2"):
        read_encodings(tmp_path)


def test_a_changed_byte_in_a_parquet_file_is_refused(tmp_path) -> None:
    """The reader (and so the index build and the search) verifies every file against encoding.json's sha256."""
    write_encodings(tmp_path, sparse_batch(), encoder_path="m", encoder_sha256="s")
    part = tmp_path / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"part-00000.parquet: sha256 .* does not match encoding.json's"):
        read_encodings(tmp_path)
    info = json.loads((tmp_path / "encoding.json").read_text())
    (tmp_path / "encoding.json").write_text(json.dumps({**info, "sha256": {}}))
    with pytest.raises(EncodingFormatError, match="'sha256' must map every file"):
        read_encodings(tmp_path)


def test_take_selects_rows_in_order() -> None:
    batch = sparse_batch().take(np.array([2, 0]))
    assert batch.ids == ["c", "a"]
    assert batch.indptr.tolist() == [0, 2, 5]
    assert batch.indices.tolist() == [3, 4, 0, 5, 9]
