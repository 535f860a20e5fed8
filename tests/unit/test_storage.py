"""`train.storage`: resolved to the pyarrow filesystem and path Ray Train is given, shown as the user wrote it, and
a run over several nodes without it refused before anything starts."""

from __future__ import annotations

import pyarrow.fs
import pytest

from retriever.errors import SettingError
from retriever.train.storage import check_shared_storage, location_uri, storage_location


def test_unset_storage_is_the_output_dirs_ray_folder_on_the_local_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    location = storage_location(None, "runs")
    assert isinstance(location.filesystem, pyarrow.fs.LocalFileSystem)
    assert location.path == location.shown == str(tmp_path / "runs" / "ray")  # absolute: workers run elsewhere


def test_a_file_uri_is_a_local_filesystem_path(tmp_path):
    location = storage_location(f"file://{tmp_path}/shared", "runs")
    assert isinstance(location.filesystem, pyarrow.fs.LocalFileSystem)
    assert location.path == f"{tmp_path}/shared" and location.shown == f"file://{tmp_path}/shared"
    # What Ray Train will write through it lands at that path.
    location.filesystem.create_dir(location.path)
    with location.filesystem.open_output_stream(f"{location.path}/probe") as out:
        out.write(b"x")
    assert (tmp_path / "shared" / "probe").read_bytes() == b"x"


def test_an_s3_uri_is_an_s3_filesystem_and_the_bucket_path():
    # With the region in the URI pyarrow contacts nothing (without it, it asks S3 for the bucket's region).
    location = storage_location("s3://bucket/runs/ray?region=eu-west-1", "runs")
    assert isinstance(location.filesystem, pyarrow.fs.S3FileSystem)
    assert location.filesystem.region == "eu-west-1"
    assert location.path == "bucket/runs/ray" and location.shown == "s3://bucket/runs/ray?region=eu-west-1"
    # Checkpoint paths come back without the scheme; messages put it back.
    assert location_uri(location.filesystem, f"{location.path}/run") == "s3://bucket/runs/ray/run"
    assert location_uri(pyarrow.fs.LocalFileSystem(), "/mnt/shared/ray/run") == "/mnt/shared/ray/run"


def test_one_node_needs_no_shared_storage():
    check_shared_storage(None, "runs", nodes=1)


@pytest.mark.parametrize("storage", ["file:///mnt/shared/ray", "s3://bucket/ray", "gs://bucket/ray"])
def test_a_storage_uri_is_taken_as_shared_by_every_node(storage):
    check_shared_storage(storage, "runs", nodes=3)


def test_several_nodes_without_storage_are_refused_with_what_to_set(tmp_path):
    with pytest.raises(SettingError) as refused:
        check_shared_storage(None, str(tmp_path / "runs"), nodes=3)
    message = str(refused.value)
    assert message.startswith(
        f"train.storage is not set: checkpoints would go to {tmp_path / 'runs' / 'ray'} on each node's own disk, "
        "which a run over 3 nodes cannot share"
    )
    assert message.endswith(
        "set train.storage to s3://bucket/path, gs://bucket/path, or file:///path on a mount every node shares"
    )
