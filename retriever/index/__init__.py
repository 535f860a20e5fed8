"""Index shards with verified manifests and sharded search. `base` defines the shard contract and the kind
registry; each backend module registers its kinds when this package is imported: `dense` (FAISS flat, hnsw),
`sparse` (exact inverted index), `seismic` (approximate sparse)."""

from retriever.index import dense, seismic, sparse  # noqa: F401  (register the index kinds)
from retriever.index.base import SHARD_KINDS, IndexShard, build_shard, default_kind, open_shard
from retriever.index.manifest import FORMAT_VERSION, IndexFormatError, IndexMismatchError, Manifest
from retriever.index.memory import IndexMemoryError, available_memory_bytes
from retriever.index.shards import (
    build_shards,
    index_complete,
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
    "IndexFormatError",
    "IndexMemoryError",
    "IndexMismatchError",
    "IndexShard",
    "Manifest",
    "available_memory_bytes",
    "build_shard",
    "build_shards",
    "default_kind",
    "index_complete",
    "index_summary",
    "merge_topk",
    "open_shard",
    "open_shards",
    "search_shards",
    "search_to_run",
    "shard_assignment",
]
