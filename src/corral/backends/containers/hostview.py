"""The container seen from the host: its cgroups and processes, for a local engine."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import attrs

from ...core.results import ResourceUsage
from .. import cgroupfs, sweep

_CGROUP_ROOT = Path("/sys/fs/cgroup")


@attrs.define
class HostView:
    """A local engine's container as the host sees it: its cgroups and processes.

    Reading cgroup files takes microseconds where the engines' stats calls take up to
    seconds; killing exec processes from the host works on images with no tools at
    all. ``HostView.find`` returns None for a remote engine (no such process here).
    """

    init_pid: int
    folders: dict[str, Path]

    @classmethod
    def find(cls, container_id: str, init_pid: int) -> HostView | None:
        if not init_pid:
            return None
        try:
            lines = Path(f"/proc/{init_pid}/cgroup").read_text().splitlines()
        except OSError:
            return None
        folders: dict[str, Path] = {}
        for line in lines:
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else ["unified"]:
                folder = _locate(controller, path, container_id)
                if folder is not None:
                    folders[controller] = folder
        return cls(init_pid, folders)

    def _file(self, controller: str, name: str) -> Path | None:
        folder = self.folders.get(controller)
        return None if folder is None else folder / name

    def pids(self) -> list[int]:
        for controller in ("pids", "memory", "unified", "cpuacct"):
            path = self._file(controller, "cgroup.procs")
            if path is not None:
                with contextlib.suppress(OSError, ValueError):
                    return [int(p) for p in path.read_text().split()]
        return []

    def running(self) -> bool:
        """Whether the container still runs, unpaused: its init is in its cgroup (a removed
        container's cgroup is gone, and a reused pid would be elsewhere) and not frozen."""
        if self.init_pid not in self.pids():
            return False
        return not self.paused()

    def paused(self) -> bool:
        """Whether the container's cgroup is frozen (or freezing): the engine's pause."""
        freezer = self._file("freezer", "freezer.state")
        if freezer is not None:
            with contextlib.suppress(OSError):
                return freezer.read_text().strip() != "THAWED"
        frozen = self._file("unified", "cgroup.freeze")
        if frozen is not None:
            with contextlib.suppress(OSError):
                return frozen.read_text().strip() != "0"
        return False

    def signal_marked(self, pid: int, marker: str, signum: int) -> bool:
        """Send ``signum`` to ``pid`` if it is still a process of this container carrying
        ``marker`` (an exec's command, not a pid reused since); whether it was. Checked
        through a pidfd, so the process signalled is the one checked (on a kernel
        without pidfds, before 5.3, by pid right after the check)."""
        try:
            handle: int | None = os.pidfd_open(pid)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                return False  # gone
            handle = None
        try:
            wanted = f"{sweep.MARKER}={marker}".encode()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if pid not in self.pids() or wanted not in environ:
                return False
            if handle is None:
                os.kill(pid, signum)
            else:
                signal.pidfd_send_signal(handle, signum)
            return True
        except OSError:
            return False  # it ended meanwhile
        finally:
            if handle is not None:
                os.close(handle)

    def spare_keepalive(self) -> None:
        """Take the container's init and its children (``sleep``, or the spec's
        ``timeout``) back to OOM score adjustment 0, below the execs' (the engine gives
        every process of the container sweep.EXEC_OOM_SCORE_ADJ). The init goes first,
        so that a child it forks meanwhile inherits 0, and then each generation below
        (a movable lifetime's shell, its sleep; Podman's own PID 1 adds one more).
        Exec processes are never its children (the engine's shim or conmon starts
        them). Without the right to (another user's processes), the keep-alive stays
        level with the execs."""
        generation = [self.init_pid]
        for _ in range(4):
            for pid in generation:
                with contextlib.suppress(OSError):
                    Path(f"/proc/{pid}/oom_score_adj").write_text("0")
            generation = [child for pid in generation for child in sweep.children(pid)]

    def kill_marked(self, marker: str, also: Iterable[int] = ()) -> int:
        """SIGKILL the container's processes carrying ``marker`` (an exec's), and ``also``;
        its init is spared."""
        return sweep.kill_marked(self.pids, marker, spare={self.init_pid}, also=also)

    def oom_kills(self) -> int:
        return cgroupfs.oom_kills(self.folders)

    def usage(self, memory_limit: int) -> ResourceUsage:
        cgroup = cgroupfs.usage(self.folders)
        rx, tx = _net_bytes(self.init_pid)
        return ResourceUsage(
            cpu_seconds=cgroup.cpu_seconds,
            memory_bytes=cgroup.memory_bytes,
            memory_peak_bytes=cgroup.memory_peak_bytes,
            memory_limit_bytes=memory_limit,
            pids=cgroup.pids if cgroup.pids is not None else len(self.pids()),
            net_rx_bytes=rx,
            net_tx_bytes=tx,
            block_read_bytes=cgroup.block_read_bytes,
            block_write_bytes=cgroup.block_write_bytes,
            timestamp=time.time(),
        )


def _locate(controller: str, path: str, container_id: str) -> Path | None:
    """The host folder of a cgroup named in /proc/PID/cgroup, even from a nested host."""
    base = (
        _CGROUP_ROOT
        if controller == "unified" and (_CGROUP_ROOT / "cgroup.controllers").exists()
        else None
    )
    if base is None:
        name = controller.removeprefix("name=")
        base = _CGROUP_ROOT / ("unified" if controller == "unified" else name)
    direct = base / path.lstrip("/")
    if ".." not in path and direct.is_dir():
        return direct
    # Seen from inside another container, paths can read "/../../docker/ID": look
    # for the container's own folder by its id instead.
    tail = path.rstrip("/").rsplit("/", 1)[-1]
    if container_id[:12] not in tail:
        return None
    for candidate in (
        base / "docker" / tail,
        base / "system.slice" / tail,
        base / "machine.slice" / tail,
        base / "libpod_parent" / tail,
    ):
        if candidate.is_dir():
            return candidate
    return None


def _net_bytes(pid: int) -> tuple[int | None, int | None]:
    try:
        lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    except OSError:
        return None, None
    rx = tx = 0
    for line in lines:
        _, data = line.split(":", 1)
        fields = data.split()
        rx += int(fields[0])
        tx += int(fields[8])
    return rx, tx


def chmod_inside(pid: int, path: str, mode: int) -> None:
    """Set the mode of ``path`` in the container whose init is ``pid``, from the host.

    Walked one folder at a time below the container's root, never following a link:
    the image's own links must not lead the host's root to a file of the host's.
    """
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    folder = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [p for p in path.split("/") if p]:
            inner = os.open(part, flags, dir_fd=folder)
            os.close(folder)
            folder = inner
        os.chmod(f"/proc/self/fd/{folder}", mode)
    finally:
        os.close(folder)
