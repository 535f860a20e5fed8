"""Index memory estimates are checked before a build starts."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_encodings

from retriever.encoding import SparseBatch
from retriever.index import IndexMemoryError, available_memory_bytes, build_shard, build_shards
from retriever.index.base import kind_class
from retriever.index.memory import format_bytes


def batch(n: int = 200, vocab: int = 1000, nnz: int = 50) -> SparseBatch:
    rng = np.random.default_rng(0)
    terms = [(np.sort(rng.choice(vocab, nnz, replace=False)), rng.uniform(0.1, 1, nnz)) for _ in range(n)]
    return SparseBatch.from_terms([f"d{i}" for i in range(n)], terms, vocab_size=vocab)


def test_available_memory_is_plausible() -> None:
    available = available_memory_bytes()
    assert 1 << 20 < available < 1 << 50


def test_build_shards_refuses_before_building(tmp_path) -> None:
    write_encodings(tmp_path / "enc", batch(), encoder_path="e", encoder_sha256="0")
    with pytest.raises(IndexMemoryError) as info:
        build_shards(tmp_path / "enc", tmp_path / "index", 1, "exact", memory_budget_bytes=100_000)
    message = str(info.value)
    assert "needs about" in message and "only 97.7 KiB is available" in message
    assert "use more shards" in message and "prune terms per document (prune_doc_top_k)" in message
    assert not (tmp_path / "index").exists()  # refused before anything was written
    # Pruned to 5 terms per document (while reading) the same build fits the same budget; unpruned, a larger one.
    build_shards(tmp_path / "enc", tmp_path / "pruned", 1, "exact", prune_doc_top_k=5, memory_budget_bytes=100_000)
    build_shards(tmp_path / "enc", tmp_path / "index", 1, "exact", memory_budget_bytes=10_000_000)


def test_estimates_grow_with_size_and_kind(tmp_path) -> None:
    exact, seismic = kind_class("exact"), kind_class("seismic")
    small = exact.estimate_build_bytes(1000, 128_256, 50_000, {})
    assert exact.estimate_build_bytes(1000, 128_256, 500_000, {}) > small
    assert seismic.estimate_build_bytes(1000, 128_256, 50_000, seismic.resolve_params(None)) > small
    flat = kind_class("flat").estimate_build_bytes(14_581, 768, 0, {})
    assert flat == 14_581 * 768 * 4
    with pytest.raises(IndexMemoryError, match=r"needs about .* MiB of memory, but only 1.0 KiB"):
        build_shard(batch(), tmp_path / "x", "seismic", encoder_path="e", encoder_sha256="0", memory_budget_bytes=1024)
    assert not (tmp_path / "x").exists()


def test_format_bytes() -> None:
    assert [format_bytes(v) for v in (12, 2048, 3 * 2**30)] == ["12 B", "2.0 KiB", "3.0 GiB"]
