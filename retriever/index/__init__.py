"""Index shards (dense FAISS, exact sparse inverted index, seismic) with verified manifests, and sharded search."""

from retriever.index.base import SHARD_KINDS, IndexShard, build_shard, default_kind, open_shard
from retriever.index.encodings import (
    DenseBatch,
    EncodingFormatError,
    EncodingInfo,
    SparseBatch,
    read_encodings,
    write_encodings,
)
from retriever.index.manifest import FORMAT_VERSION, IndexFormatError, IndexMismatchError, Manifest
from retriever.index.memory import IndexMemoryError, available_memory_bytes
from retriever.index.shards import (
    build_shards,
    index_summary,
    merge_topk,
    open_shards,
    search_shards,
    search_to_run,
    shard_assignment,
)

__all__ = [
    "FORMAT_VERSION",
    "SHARD_KINDS",
    "DenseBatch",
    "EncodingFormatError",
    "EncodingInfo",
    "IndexFormatError",
    "IndexMemoryError",
    "IndexMismatchError",
    "IndexShard",
    "Manifest",
    "SparseBatch",
    "available_memory_bytes",
    "build_shard",
    "build_shards",
    "default_kind",
    "index_summary",
    "merge_topk",
    "open_shard",
    "open_shards",
    "read_encodings",
    "search_shards",
    "search_to_run",
    "shard_assignment",
    "write_encodings",
]
