"""Where Ray Train keeps a run's checkpoints and run state (`train.storage`), and whether a cluster can share it.

Unset, it is `<train.output_dir>/ray` on the disk of whichever node a process runs on: right for one machine, wrong
for a cluster, where a worker restarted on another node would not find the checkpoints its predecessor wrote. A URI
(`s3://bucket/path`, `gs://bucket/path`, `file:///abs/path` on a mount every node shares) names one place that every
node reaches through a pyarrow filesystem. The URI's form is checked when the config loads
(`retriever.config.check_storage_uri`); here it is resolved, and a run over several nodes without it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from retriever.errors import SettingError

if TYPE_CHECKING:
    import pyarrow.fs


@dataclass(frozen=True)
class StorageLocation:
    """`RunConfig(storage_path=path, storage_filesystem=filesystem)`, and how to show it in messages (`shown`: the
    local path, or the URI)."""

    filesystem: pyarrow.fs.FileSystem
    path: str
    shown: str


def default_storage_path(output_dir: str) -> Path:
    """`<output_dir>/ray`, absolute: where checkpoints go when `train.storage` is not set."""
    return (Path(output_dir) / "ray").resolve()


def storage_location(storage: str | None, output_dir: str) -> StorageLocation:
    """The filesystem and path of `train.storage` (a URI, already checked by the config), or of
    `<output_dir>/ray` when it is None. Resolving an `s3://` URI without `?region=` asks S3 for the bucket's region."""
    import pyarrow.fs

    if storage is None:
        path = str(default_storage_path(output_dir))
        return StorageLocation(pyarrow.fs.LocalFileSystem(), path, path)
    filesystem, path = pyarrow.fs.FileSystem.from_uri(storage)
    return StorageLocation(filesystem, path, storage)


def location_uri(filesystem: pyarrow.fs.FileSystem, path: str) -> str:
    """`path` on `filesystem` as a user finds it: a local path as it is, a remote one with its filesystem's scheme
    (`s3://bucket/run`), since pyarrow paths drop the scheme."""
    kind = filesystem.type_name
    return path if kind == "local" else f"{kind}://{path}"


def check_shared_storage(storage: str | None, output_dir: str, nodes: int) -> None:
    """Refuse a Ray Train run over `nodes` alive nodes whose checkpoints would go to each node's own disk.

    A `train.storage` URI is the user's statement that every node reaches it (`file://` included: the path is on a
    shared mount); unset, checkpoints go to `<output_dir>/ray` on the local disk of each process's node, which one
    node can share with itself only.
    """
    if storage is not None or nodes <= 1:
        return
    raise SettingError(
        f"train.storage is not set: checkpoints would go to {default_storage_path(output_dir)} on each node's own "
        f"disk, which a run over {nodes} nodes cannot share (a worker restarted on another node would not find "
        "them); set train.storage to s3://bucket/path, gs://bucket/path, or file:///path on a mount every node "
        "shares"
    )


__all__ = ["StorageLocation", "check_shared_storage", "default_storage_path", "location_uri", "storage_location"]
