"""Index memory: how much RAM this process may still use, and the check that runs before a build starts."""

from __future__ import annotations

from pathlib import Path

from retriever.errors import UserError


class IndexMemoryError(UserError, MemoryError):
    """A build whose estimated memory exceeds what is available; the message gives the estimate and the fixes."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory_bytes() -> int:
    """The smaller of the host's MemAvailable and the cgroup's remaining limit (containers), in bytes."""
    candidates: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
                break
    except OSError:
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        limit, usage = _read_int(Path(limit_file)), _read_int(Path(usage_file))
        if limit is not None and usage is not None and limit < 1 << 60:
            candidates.append(max(limit - usage, 0))
    if not candidates:  # other platforms: psutil ships with ray
        import psutil

        candidates.append(int(psutil.virtual_memory().available))
    return min(candidates)


def check_memory(estimate_bytes: int, what: str, fix: str, available_bytes: int | None = None) -> None:
    """Refuse to start when ``estimate_bytes`` exceeds ``available_bytes`` (default: what is available now)."""
    available = available_memory_bytes() if available_bytes is None else int(available_bytes)
    if estimate_bytes > available:
        raise IndexMemoryError(
            f"{what} needs about {format_bytes(estimate_bytes)} of memory, but only {format_bytes(available)} is "
            f"available; {fix}"
        )
