"""Reading cgroup files: the numbers behind fast usage figures and OOM evidence.

The one reader of cgroup files for every backend: the local backend's own cgroups
and a local engine's containers (seen from the host) alike, on cgroup v1 and v2.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import attrs


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


# -- usage figures of one cgroup -------------------------------------------------------
# ``folders`` maps a controller to the cgroup's folder in its hierarchy: on cgroup v1
# "memory", "pids", "cpuacct", "blkio" (as /proc/PID/cgroup names them), and "unified"
# for the v2 hierarchy (the only one on a v2 host; beside v1 on a hybrid one). Each
# figure comes from v1 where its controller is mounted there, else from v2.

Folders = Mapping[str, Path]


def _first(folders: Folders, *places: tuple[str, str]) -> Path | None:
    """The first ``(controller, file)`` of ``places`` whose controller has a folder."""
    for controller, name in places:
        folder = folders.get(controller)
        if folder is not None:
            return folder / name
    return None


def _int_of(path: Path | None) -> int | None:
    return None if path is None else read_int(path)


def memory_bytes(folders: Folders) -> int | None:
    """Memory charged to the cgroup now (page cache included, as the limit counts it)."""
    return _int_of(
        _first(folders, ("memory", "memory.usage_in_bytes"), ("unified", "memory.current"))
    )


def memory_peak_bytes(folders: Folders) -> int | None:
    """The most memory the cgroup held at once (v2: Linux 5.19 and later)."""
    return _int_of(
        _first(folders, ("memory", "memory.max_usage_in_bytes"), ("unified", "memory.peak"))
    )


def cpu_seconds(folders: Folders) -> float | None:
    """CPU time the cgroup's processes used, user and system."""
    nanoseconds = _int_of(_first(folders, ("cpuacct", "cpuacct.usage")))
    if nanoseconds is not None:
        return nanoseconds / 1e9
    stat = _first(folders, ("unified", "cpu.stat"))
    usec = None if stat is None else read_keyed(stat).get("usage_usec")
    return None if usec is None else usec / 1e6


def pids_current(folders: Folders) -> int | None:
    """Tasks in the cgroup, as its pids limit counts them."""
    return _int_of(_first(folders, ("pids", "pids.current"), ("unified", "pids.current")))


def oom_kills(folders: Folders) -> int:
    """Processes the kernel's OOM killer took in the cgroup since it was made."""
    path = _first(folders, ("memory", "memory.oom_control"), ("unified", "memory.events"))
    return 0 if path is None else read_keyed(path).get("oom_kill", 0)


def block_io(folders: Folders) -> tuple[int | None, int | None]:
    """Bytes read from and written to block devices, or (None, None) where unknown."""
    v1 = _first(folders, ("blkio", "blkio.throttle.io_service_bytes"))
    v2 = _first(folders, ("unified", "io.stat"))
    try:
        if v1 is not None:
            text = v1.read_text()  # "8:0 Read 4096" per device and kind
            pairs = [line.split() for line in text.splitlines()]
            read = sum(int(p[2]) for p in pairs if len(p) == 3 and p[1] == "Read")
            write = sum(int(p[2]) for p in pairs if len(p) == 3 and p[1] == "Write")
            return read, write
        if v2 is not None:
            text = v2.read_text()  # "8:0 rbytes=4096 wbytes=0 rios=1 ..." per device
            fields = [f.split("=", 1) for line in text.splitlines() for f in line.split()[1:]]
            read = sum(int(v) for k, v in fields if k == "rbytes")
            write = sum(int(v) for k, v in fields if k == "wbytes")
            return read, write
    except (OSError, ValueError, IndexError):
        pass
    return None, None


@attrs.frozen
class CgroupUsage:
    """One reading of a cgroup's figures; None where the host does not keep one."""

    memory_bytes: int | None
    memory_peak_bytes: int | None
    cpu_seconds: float | None
    pids: int | None
    oom_kills: int
    block_read_bytes: int | None
    block_write_bytes: int | None


def usage(folders: Folders) -> CgroupUsage:
    """Every usage figure of the cgroup at ``folders``."""
    read, write = block_io(folders)
    return CgroupUsage(
        memory_bytes=memory_bytes(folders),
        memory_peak_bytes=memory_peak_bytes(folders),
        cpu_seconds=cpu_seconds(folders),
        pids=pids_current(folders),
        oom_kills=oom_kills(folders),
        block_read_bytes=read,
        block_write_bytes=write,
    )
