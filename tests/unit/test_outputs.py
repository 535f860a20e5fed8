"""Atomic outputs and the writer's lock (retriever.outputs)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from retriever import outputs
from retriever.errors import OutputBusyError
from retriever.outputs import atomic_directory, atomic_file, lock_path, output_lock, write_text_atomic


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_directory_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not out.exists()
        assert tmp.parent == tmp_path and tmp.name.startswith(".partial-") and tmp.name.endswith("-out")
    assert _tree(out) == {"a.txt": b"a"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock, no temporary left


def test_a_failed_writer_leaves_the_old_output_and_no_temporary(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert _tree(out) == {"old.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"), atomic_directory(out):
        pass
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _tree(out) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_output_is_replaced_in_one_step(tmp_path):
    out = tmp_path / "run.trec"
    with atomic_file(out) as tmp:
        tmp.write_text("one\n")
    with pytest.raises(FileExistsError), atomic_file(out) as tmp:
        tmp.write_text("two\n")
    assert out.read_text() == "one\n"
    with atomic_file(out, overwrite=True) as tmp:
        tmp.write_text("two\n")
    assert out.read_text() == "two\n"
    with pytest.raises(IsADirectoryError):
        with atomic_file(tmp_path) as tmp:
            pass
    write_text_atomic(out, "three\n")
    assert out.read_text() == "three\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.trec"]


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(OutputBusyError, match=rf"pid {os.getpid()} on .*wait for it to finish"):
            with atomic_directory(out):
                pass
    with atomic_directory(out) as tmp:  # released: the next writer goes ahead
        (tmp / "x").write_text("x")
    assert not lock_path(out).exists()


@contextlib.contextmanager
def stalled_writer(script: str, ready: Path) -> Iterator[subprocess.Popen]:
    """A Python process running ``script``, yielded once it has written ``ready``; killed (SIGKILL) at the end."""
    writer = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline and writer.poll() is None, "the writer did not start"
            time.sleep(0.05)
        yield writer
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()


def test_a_killed_writer_leaves_nothing_in_place_and_the_next_one_succeeds(tmp_path):
    out = tmp_path / "out"
    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from retriever.outputs import atomic_directory
        with atomic_directory(Path({str(out)!r})) as tmp:
            (tmp / "half.txt").write_text("half")
            Path({str(ready)!r}).write_text("1")
            time.sleep(60)
        """
    )
    with stalled_writer(script, ready) as writer:
        with pytest.raises(OutputBusyError, match=f"pid {writer.pid}"):
            with atomic_directory(out):
                pass
    assert not out.exists()
    with atomic_directory(out) as tmp:
        (tmp / "whole.txt").write_text("whole")
    assert _tree(out) == {"whole.txt": b"whole"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ready"]  # the killed writer's partial is gone


def needs_unnamed_files(folder: Path) -> None:
    try:
        os.close(os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600))
    except (AttributeError, OSError) as exc:
        pytest.skip(f"no O_TMPFILE files in {folder} ({exc}): write_text_atomic writes a named sibling there")


def test_a_small_file_whose_writer_fails_or_is_killed_mid_write_leaves_the_old_text_and_nothing_else(
    tmp_path, monkeypatch
):
    needs_unnamed_files(tmp_path)
    folder, ready = tmp_path / "run", tmp_path / "ready"
    folder.mkdir()
    out = folder / "state.json"
    write_text_atomic(out, "old\n")

    def half_then_full_disk(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(outputs, "_write_all", half_then_full_disk)
        with pytest.raises(OSError, match="No space left"):
            write_text_atomic(out, "new text\n")
    assert [p.name for p in folder.iterdir()] == ["state.json"] and out.read_text() == "old\n"

    script = textwrap.dedent(
        f"""
        import os, time
        from pathlib import Path
        from retriever import outputs

        def stall(fd, data):
            os.write(fd, data[:10])
            Path({str(ready)!r}).write_text("1")
            time.sleep(60)

        outputs._write_all = stall
        outputs.write_text_atomic(Path({str(out)!r}), "x" * 100)
        """
    )
    with stalled_writer(script, ready):
        pass
    assert [p.name for p in folder.iterdir()] == ["state.json"] and out.read_text() == "old\n"
    write_text_atomic(out, "new\n")
    assert [p.name for p in folder.iterdir()] == ["state.json"] and out.read_text() == "new\n"


def test_a_small_file_is_written_through_a_named_sibling_where_unnamed_files_are_unsupported(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_TMPFILE")
    out = tmp_path / "state.json"
    write_text_atomic(out, "one\n")
    write_text_atomic(out, "two\n")
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"] and out.read_text() == "two\n"
    with monkeypatch.context() as patched:  # the named sibling is removed when writing it fails
        patched.setattr(Path, "write_bytes", lambda self, data: (self.open("wb").write(data[:3]), 1 / 0))
        with pytest.raises(ZeroDivisionError):
            write_text_atomic(out, "three\n")
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"] and out.read_text() == "two\n"


def test_a_small_files_sibling_left_by_a_killed_writer_is_removed_once_stale(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_TMPFILE")  # named siblings, as on a filesystem without unnamed files
    out = tmp_path / "state.json"
    write_text_atomic(out, "one\n")
    stale, young = tmp_path / ".partial-0badc0de-state.json", tmp_path / ".partial-0000beef-state.json"
    other = tmp_path / ".partial-0badc0de-state.json.bak"  # another file's sibling: never ours to remove
    for path in (stale, young, other):
        path.write_text("half a manifest")
    hour_ago = time.time() - outputs.STALE_SIBLING_S - 60
    for path in (stale, other):
        os.utime(path, (hour_ago, hour_ago))
    write_text_atomic(out, "two\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, young.name, other.name])
    assert out.read_text() == "two\n"


def test_siblings_are_matched_by_the_exact_name(tmp_path):
    (tmp_path / ".partial-0badc0de-run1.json").write_text("another output's")
    outputs.remove_partials(tmp_path / "run[1].json")  # a glob pattern of a name would match run1.json
    assert [p.name for p in tmp_path.iterdir()] == [".partial-0badc0de-run1.json"]
    (tmp_path / ".partial-0badc0de-run[1].json").write_text("its own")
    outputs.remove_partials(tmp_path / "run[1].json")
    assert [p.name for p in tmp_path.iterdir()] == [".partial-0badc0de-run1.json"]


def test_a_small_file_that_cannot_replace_its_target_leaves_no_sibling(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError):
        write_text_atomic(tmp_path / "taken", "text\n")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_an_unwritable_location_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        with atomic_directory(blocker / "out"):
            pass
