"""Outputs that are whole or absent: written into a temporary sibling under a lock, renamed into place when complete.

    with atomic_directory(out, overwrite=args.overwrite) as tmp:   # refuses a second writer, checks `out`
        write_everything_into(tmp)                                # an exception or kill -9 leaves `out` as it was
    # here `out` holds the new output (an old one was swapped out atomically, then removed)

The lock is `.<name>.lock` next to the output, held with `flock` (released by the kernel when the process dies, so
a killed writer never blocks the next one) and naming its holder (pid, host, command) for the refusal message.
Temporary siblings are `.partial-<id>-<name>` (ending in the output's own name, so a `.gz` output is still
compressed); one left by a killed writer is removed by the next writer of the same output (for the small files
written without a lock, once it is an hour old). On object stores, where rename is not atomic, an output is complete
only once the manifest it writes last exists (encodings: `encoding.json`, index: `shards.json`, checkpoints: their
checksum manifest).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from retriever.errors import OutputBusyError

PARTIAL = ".partial-"
_ID_CHARS = 8
# A named sibling of a small file this old has no live writer: its writer names it after the last byte and renames
# it a system call later, so only a writer killed in between (or on a filesystem without O_TMPFILE, killed while
# writing a few KB) leaves one. An hour leaves room for clocks of a network filesystem that disagree.
STALE_SIBLING_S = 3600.0
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths atomically
_AT_FDCWD = -100


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _program() -> str:
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    return script.parent.name if script.name == "__main__.py" else script.name  # `python -m retriever`: retriever


def _holder() -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([_program(), *sys.argv[1:]]),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}: `{holder['command']}`"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def output_lock(target: str | Path) -> Iterator[None]:
    """Hold the writer's lock of `target`; a second writer gets `OutputBusyError` naming the holder."""
    target = Path(target)
    path = lock_path(target)
    ensure_directory(target.parent, f"the folder of {target}")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusyError(
                f"{target}: another process is writing it ({_describe_holder(path)}); wait for it to finish or "
                f"stop it (its lock: {path})"
            ) from None
        # The previous holder may have removed the lock file between our open and flock: lock the current file.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(_holder()) + "\n").encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def ensure_directory(directory: Path, what: str) -> None:
    """Create `directory` (and parents), or fail with a message naming it when that is impossible."""
    if directory.is_dir():
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(f"{directory}: {what} is not writable; choose another location or fix permissions")
        return
    if directory.exists():
        raise NotADirectoryError(f"{directory}: {what} is a file, not a folder; choose another location")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(
            f"{directory}: cannot create {what} ({exc.strerror}); choose a writable location"
        ) from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def partial_path(target: Path) -> Path:
    """A new temporary sibling of `target`."""
    return target.parent / f"{PARTIAL}{uuid.uuid4().hex[:_ID_CHARS]}-{target.name}"


def _partials(target: Path) -> Iterator[Path]:
    # Escaped: a name like `run[1].json` must not match the siblings of `run1.json`.
    return target.parent.glob(f"{PARTIAL}{'?' * _ID_CHARS}-{glob.escape(target.name)}")


def remove_partials(target: Path) -> None:
    """Temporary siblings left by a writer of `target` that was killed (call while holding its lock)."""
    for stale in _partials(target):
        _remove(stale)


def remove_stale_siblings(target: Path, older_than_s: float = STALE_SIBLING_S) -> None:
    """Named siblings of the small file `target` (see `write_text_atomic`) untouched for `older_than_s`: left by a
    killed writer, as no live one keeps its sibling that long. Younger ones may belong to a writer at work."""
    cutoff = time.time() - older_than_s
    for sibling in _partials(target):
        with contextlib.suppress(FileNotFoundError):  # another writer removed it first
            if sibling.is_file() and not sibling.is_symlink() and sibling.stat().st_mtime < cutoff:
                sibling.unlink()


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(second))


def replace(new: Path, target: Path) -> None:
    """Put `new` at `target`; an existing `target` (file or folder) is replaced atomically, then removed."""
    if not target.exists() and not target.is_symlink():
        os.rename(new, target)
        return
    if new.is_dir() == target.is_dir() and _exchange(new, target):
        _remove(new)  # holds the old output now
        return
    if not new.is_dir() and not target.is_dir():
        os.replace(new, target)
        return
    old = partial_path(target)
    os.rename(target, old)
    os.rename(new, target)
    _remove(old)


def check_replaceable(target: Path, overwrite: bool, what: str, ours: Callable[[Path], bool] | None = None) -> None:
    """An existing `target` may be replaced only with `overwrite`, and a folder only when `ours` recognises it as
    an earlier output of the same kind (never a folder of the user's other files); an empty folder is free."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{target}: {what} already exists; pass --overwrite to replace it, or choose another path"
        )
    if ours is not None and not ours(target):
        raise FileExistsError(
            f"{target}: holds files that are not {what}; refusing to replace it (choose another path)"
        )


@contextlib.contextmanager
def atomic_directory(
    target: str | Path,
    *,
    overwrite: bool = False,
    what: str = "the output folder",
    ours: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """A fresh temporary folder that becomes `target` when the block ends without an exception.

    An existing `target` is refused unless `overwrite` (and, for a folder, `ours(target)`: see `check_replaceable`),
    and is replaced only once the new output is complete.
    """
    target = Path(target)
    with output_lock(target):
        check_replaceable(target, overwrite, what, ours)
        remove_partials(target)
        tmp = partial_path(target)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            _remove(tmp)
            raise
        replace(tmp, target)


@contextlib.contextmanager
def atomic_file(target: str | Path, *, overwrite: bool = False, what: str = "the output file") -> Iterator[Path]:
    """A temporary path next to `target` to write one file to; renamed onto `target` when the block succeeds."""
    target = Path(target)
    if target.is_dir():
        raise IsADirectoryError(f"{target}: is a folder; {what} must be a file path")
    with output_lock(target):
        check_replaceable(target, overwrite, what)
        remove_partials(target)
        tmp = partial_path(target)
        try:
            yield tmp
            if not tmp.exists():
                raise RuntimeError(f"{target}: nothing was written to {tmp}")
        except BaseException:
            _remove(tmp)
            raise
        os.replace(tmp, target)


def write_text_atomic(target: str | Path, text: str) -> None:
    """Replace the small file `target` with `text` in one step (a reader sees the old or the new text).

    These files (manifests, sweep state) are written without a lock, so a later writer may not remove a sibling
    that another writer may still rename: the text goes into an unnamed file in the target's folder (Linux
    `O_TMPFILE`) that gets a name only once complete, so a writer killed while writing leaves nothing. Where the
    system or the filesystem cannot, a named sibling is written instead. A named sibling a killed writer left (also
    one killed between naming its file and renaming it) is removed by a later write once it is an hour old
    (`remove_stale_siblings`)."""
    target = Path(target)
    remove_stale_siblings(target)
    data = text.encode()
    tmp = partial_path(target)
    try:
        fd = os.open(target.parent, os.O_TMPFILE | os.O_WRONLY, 0o666)
    except (AttributeError, OSError):
        fd = None
    named = False
    if fd is not None:
        try:
            _write_all(fd, data)
            named = _name_unnamed(fd, tmp)
        finally:
            os.close(fd)
    if not named:
        _write_named(tmp, data)
    try:
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _write_named(tmp: Path, data: bytes) -> None:
    try:
        tmp.write_bytes(data)
    except BaseException:
        _remove(tmp)
        raise


def _name_unnamed(fd: int, path: Path) -> bool:
    """Give the `O_TMPFILE` file `fd` the name `path` (linkat through /proc, following the link); False where that
    is impossible (no /proc mounted)."""
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)  # O_PATH: a folder we may write but not list
    try:
        # A destination folder fd makes os.link call linkat, which follows /proc's link to the file (link() won't).
        os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=folder, follow_symlinks=True)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(folder)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
