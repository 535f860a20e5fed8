"""Dense shards on FAISS: exact inner product (``IndexFlatIP``, the default) and HNSW (``IndexHNSWFlat``, inner
product). The FAISS id of a vector is its index id (position in doc-id order); doc ids live in the shard's doc-id
file. The index is written with ``faiss.write_index`` (FAISS's own binary format, no pickle).

With faiss-gpu installed and a CUDA device visible (``faiss.get_num_gpus() > 0``), flat shards are searched on the
GPU (``device="auto"`` or ``"gpu"``); HNSW has no FAISS GPU implementation and always runs on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from retriever.encoding.batches import Batch, DenseBatch
from retriever.index.base import SHARD_KINDS, Device, IndexShard
from retriever.index.manifest import IndexFormatError, Manifest

INDEX_FILE = "index.faiss"
GPU_MAX_K = 2048  # FAISS GPU k-selection limit; larger k runs on the CPU copy


def import_faiss():  # -> module
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "dense indexes need FAISS: pip install 'retriever[cpu]' (faiss-cpu) or 'retriever[gpu]' (faiss-gpu, "
            f"CUDA); never both ({exc})"
        ) from None
    return faiss


def gpu_available() -> bool:
    faiss = import_faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _use_gpu(device: Device) -> bool:
    if device == "cpu":
        return False
    available = gpu_available()
    if device == "gpu" and not available:
        raise RuntimeError(
            "device='gpu' but FAISS sees no GPU (faiss-gpu not installed or no CUDA device); use device='auto' or "
            "'cpu', or install 'retriever[gpu]' on a CUDA machine"
        )
    return available


def sort_hits(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ordered by (score descending, id ascending), missing hits (-1) last: FAISS keeps the smaller ids among
    tied scores but does not promise their order."""
    key_ids = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    key_scores = np.where(ids < 0, np.inf, -scores.astype(np.float64))
    order = np.lexsort((key_ids, key_scores), axis=-1)
    scores = np.take_along_axis(scores, order, axis=-1)
    ids = np.take_along_axis(ids, order, axis=-1)
    return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids


class FaissShard(IndexShard):
    """Common FAISS shard code; ``gpu_capable`` kinds are cloned to the GPU when one is available."""

    paradigm = "dense"
    gpu_capable: ClassVar[bool] = False

    def __init__(self, directory: Path, manifest: Manifest, doc_ids: list[str], index: Any, device: Device) -> None:
        super().__init__(directory, manifest, doc_ids)
        self.cpu_index = index
        self.gpu_index = None
        self._gpu_resources = None
        if self.gpu_capable and _use_gpu(device):
            faiss = import_faiss()
            self._gpu_resources = faiss.StandardGpuResources()
            self.gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)

    @classmethod
    def make_index(cls, dimension: int, params: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    @classmethod
    def write(cls, batch: Batch, directory: Path, params: Mapping[str, Any], device: Device) -> None:
        assert isinstance(batch, DenseBatch)
        faiss = import_faiss()
        index = cls.make_index(batch.dimension, params)
        if cls.gpu_capable and _use_gpu(device):
            # Flat indexes hold the raw vectors: adding on the GPU and copying back gives the same file.
            resources = faiss.StandardGpuResources()
            gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
            gpu_index.add(batch.vectors)
            index = faiss.index_gpu_to_cpu(gpu_index)
        else:
            index.add(batch.vectors)
        faiss.write_index(index, str(directory / INDEX_FILE))

    @classmethod
    def load(cls, directory: Path, manifest: Manifest, doc_ids: list[str], device: Device) -> FaissShard:
        faiss = import_faiss()
        try:
            index = faiss.read_index(str(directory / INDEX_FILE))
        except RuntimeError as exc:
            raise IndexFormatError(f"{directory / INDEX_FILE}: FAISS cannot read it ({exc}); rebuild") from None
        if index.ntotal != manifest.doc_count or index.d != manifest.dimension:
            raise IndexFormatError(
                f"{directory / INDEX_FILE}: {index.ntotal} vectors of dimension {index.d}, but the manifest says "
                f"{manifest.doc_count} of dimension {manifest.dimension}; rebuild the index"
            )
        return cls(directory, manifest, doc_ids, index, device)

    def prepare_search(self, k: int) -> None:
        """Apply search-time parameters before a search."""

    def search_positions(self, queries: Batch, k: int) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(queries, DenseBatch)
        self.prepare_search(k)
        index = self.gpu_index if self.gpu_index is not None and k <= GPU_MAX_K else self.cpu_index
        scores, ids = index.search(queries.vectors, k)
        return sort_hits(scores, ids.astype(np.int64, copy=False))

    @property
    def device(self) -> str:
        return "gpu" if self.gpu_index is not None else "cpu"


@SHARD_KINDS.register("flat")
class FlatShard(FaissShard):
    """Exact maximum inner product search (``IndexFlatIP``)."""

    kind = "flat"
    gpu_capable = True

    @classmethod
    def make_index(cls, dimension: int, params: Mapping[str, Any]) -> Any:
        return import_faiss().IndexFlatIP(dimension)

    @classmethod
    def estimate_build_bytes(cls, n_docs: int, size: int, nnz: int, params: Mapping[str, Any]) -> int:
        return n_docs * size * 4  # the index's copy of the vectors


@SHARD_KINDS.register("hnsw")
class HnswShard(FaissShard):
    """Approximate search on an HNSW graph (``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT``)."""

    kind = "hnsw"
    build_defaults = {"m": 32, "ef_construction": 200}
    search_defaults = {"ef_search": 128}

    @classmethod
    def make_index(cls, dimension: int, params: Mapping[str, Any]) -> Any:
        faiss = import_faiss()
        m, ef_construction = int(params["m"]), int(params["ef_construction"])
        if m < 2 or ef_construction < 1:
            raise ValueError(
                f"HNSW needs m >= 2 and ef_construction >= 1, got m={m}, ef_construction={ef_construction}"
            )
        index = faiss.IndexHNSWFlat(dimension, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        return index

    @classmethod
    def estimate_build_bytes(cls, n_docs: int, size: int, nnz: int, params: Mapping[str, Any]) -> int:
        # Vectors, then the graph: 2*m int32 neighbours per node on level 0, about 10 % more for the upper levels,
        # plus per-node level bookkeeping.
        m = int(params["m"])
        return n_docs * (size * 4 + int(2 * m * 4 * 1.1) + 16)

    def prepare_search(self, k: int) -> None:
        ef = int(self.params["ef_search"])
        if ef < 1:
            raise ValueError(f"ef_search must be positive, got {ef}")
        self.cpu_index.hnsw.efSearch = max(ef, k)  # HNSW cannot return more hits than its search queue holds
