"""Reading cgroup files: the numbers behind fast usage figures and OOM evidence."""

from __future__ import annotations

from pathlib import Path


def read_int(path: Path) -> int | None:
    """The first number in a cgroup file, or None when it is absent or unreadable."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_keyed(path: Path) -> dict[str, int]:
    """A ``key value`` per line file (memory.events, cpu.stat), or {} when unreadable."""
    try:
        return {k: int(v) for k, v in (line.split()[:2] for line in path.read_text().splitlines())}
    except (OSError, ValueError):
        return {}
