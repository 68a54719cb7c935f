"""Per-sandbox cgroups for the local backend: limits, usage and a kill switch.

Works on cgroup v2 (one hierarchy) and on hybrid hosts (v1 memory, pids and cpu
controllers, plus the v2 hierarchy for ``cgroup.kill``). Without a writable
hierarchy, ``CgroupLayout.detect()`` returns None and the backend says so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import attrs

from .. import cgroupfs

ROOT = Path("/sys/fs/cgroup")
_GROUP = "corral"


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@attrs.frozen
class CgroupLayout:
    """Where corral's cgroups live on this host."""

    unified: Path | None  # v2 folder for corral (kill, and limits when v2-only)
    memory: Path | None  # v1 controller folders (hybrid hosts)
    pids: Path | None
    cpu: Path | None
    v2_controllers: frozenset[str] = frozenset()

    @classmethod
    def detect(cls) -> CgroupLayout | None:
        """The writable layout, or None when cgroups cannot be made here."""
        if (ROOT / "cgroup.controllers").is_file():  # pure v2
            base = ROOT / _GROUP
            try:
                base.mkdir(exist_ok=True)
                wanted = {"memory", "pids", "cpu"} & set(
                    (ROOT / "cgroup.controllers").read_text().split()
                )
                with contextlib.suppress(OSError):
                    _write(ROOT / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
                _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
                enabled = frozenset((base / "cgroup.subtree_control").read_text().split())
            except OSError:
                return None
            return cls(base, None, None, None, enabled)
        folders: dict[str, Path | None] = {}
        for name, folder in (
            ("memory", "memory"),
            ("pids", "pids"),
            ("cpu", "cpu"),
            ("unified", "unified"),
        ):
            path = ROOT / folder / _GROUP
            try:
                path.mkdir(exist_ok=True)
                folders[name] = path
            except OSError:
                folders[name] = None
        if not any(folders.values()):
            return None
        return cls(folders["unified"], folders["memory"], folders["pids"], folders["cpu"])

    def has(self, controller: str) -> bool:
        if self.memory is None and self.pids is None and self.cpu is None:
            return controller in self.v2_controllers
        return getattr(self, controller) is not None

    @property
    def can_kill(self) -> bool:
        return self.unified is not None

    @property
    def can_freeze(self) -> bool:
        """Whether sandboxes can be paused: cgroup v2's freezer (Linux 5.2), in the
        unified hierarchy every sandbox process joins (a v1 freezer hierarchy would
        cost each exec one more migration, so corral does not use it)."""
        return self.unified is not None and (self.unified / "cgroup.freeze").is_file()


@attrs.define
class Cgroup:
    """One sandbox's cgroups (a folder per hierarchy)."""

    layout: CgroupLayout
    name: str
    folders: dict[str, Path] = attrs.field(factory=dict)

    @classmethod
    def create(
        cls, layout: CgroupLayout, name: str, memory: int, pids: int, cpus: float | None
    ) -> Cgroup:
        group = cls(layout, name)
        try:
            group._make(memory, pids, cpus)
        except BaseException:
            group.remove()
            raise
        return group

    def _make(self, memory: int, pids: int, cpus: float | None) -> None:
        L = self.layout
        v2_only = L.memory is None and L.pids is None and L.cpu is None
        if L.unified is not None:
            self.folders["unified"] = L.unified / self.name
            self.folders["unified"].mkdir(exist_ok=True)
        period = 100_000
        if v2_only:
            f = self.folders["unified"]
            if "memory" in L.v2_controllers:
                _write(f / "memory.max", str(memory))
                _write(f / "memory.swap.max", "0")
            if "pids" in L.v2_controllers:
                _write(f / "pids.max", str(pids))
            if cpus is not None and "cpu" in L.v2_controllers:
                _write(f / "cpu.max", f"{int(cpus * period)} {period}")
            return
        if L.memory is not None:
            f = self.folders["memory"] = L.memory / self.name
            f.mkdir(exist_ok=True)
            _write(f / "memory.limit_in_bytes", str(memory))
            with contextlib.suppress(OSError):  # absent without swap accounting
                _write(f / "memory.memsw.limit_in_bytes", str(memory))
            with contextlib.suppress(OSError):
                _write(f / "memory.swappiness", "0")
        if L.pids is not None:
            f = self.folders["pids"] = L.pids / self.name
            f.mkdir(exist_ok=True)
            _write(f / "pids.max", str(pids))
        # Only with a quota to enforce (CPU time is read from the unified hierarchy):
        # every hierarchy joined costs each exec a migration, about a millisecond on v1.
        if L.cpu is not None and cpus is not None:
            f = self.folders["cpu"] = L.cpu / self.name
            f.mkdir(exist_ok=True)
            _write(f / "cpu.cfs_period_us", str(period))
            _write(f / "cpu.cfs_quota_us", str(int(cpus * period)))

    def procs_files(self) -> list[str]:
        """The files a process writes its own pid to, to join every hierarchy."""
        return [str(folder / "cgroup.procs") for folder in self.folders.values()]

    def pids(self) -> list[int]:
        for folder in self.folders.values():
            try:
                return [int(p) for p in (folder / "cgroup.procs").read_text().split()]
            except OSError:
                continue
        return []

    def kill(self) -> None:
        """SIGKILL every process in the sandbox, forks racing included."""
        unified = self.folders.get("unified")
        if unified is not None and (unified / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(unified / "cgroup.kill", "1")
        for _ in range(50):  # v1 fallback, and waiting for the kernel to finish
            left = self.pids()
            if not left:
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def freeze(self, frozen: bool, within: float = 10.0) -> bool:
        """Freeze (or thaw) every process of the sandbox, and wait until the kernel
        says it is done; False when it was not within ``within`` seconds (a process in
        an uninterruptible sleep holds a freeze back), the freeze staying asked."""
        unified = self.folders.get("unified")
        if unified is None:
            raise OSError(f"the sandbox {self.name} has no cgroup v2 folder to freeze")
        _write(unified / "cgroup.freeze", "1" if frozen else "0")
        deadline = time.monotonic() + within
        while cgroupfs.read_keyed(unified / "cgroup.events").get("frozen") != int(frozen):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def frozen(self) -> bool:
        """Whether the sandbox is paused (its freeze asked), from any program."""
        unified = self.folders.get("unified")
        return unified is not None and cgroupfs.read_int(unified / "cgroup.freeze") == 1

    def oom_kills(self) -> int:
        return cgroupfs.oom_kills(self.folders)

    def usage(self) -> cgroupfs.CgroupUsage:
        """CPU seconds, memory now and peak, process count and block I/O, where known.
        (The v1 ``cpu`` folder, made only for a quota, has no usage counter: CPU time
        comes from the unified hierarchy.)"""
        return cgroupfs.usage(self.folders)

    def remove(self) -> None:
        """Kill what is left and remove the folders. Idempotent; a frozen cgroup too
        (a fatal signal ends a v2-frozen process; thawed after, for the v1 fallback)."""
        self.kill()
        if self.frozen():
            with contextlib.suppress(OSError):
                self.freeze(False, within=1.0)
            self.kill()
        for folder in self.folders.values():
            with contextlib.suppress(FileNotFoundError):
                for _ in range(20):
                    try:
                        folder.rmdir()
                        break
                    except OSError:
                        time.sleep(0.01)

    @classmethod
    def existing(cls, layout: CgroupLayout, name: str) -> Cgroup:
        """A handle on a sandbox's cgroups made earlier (by this or another process)."""
        group = cls(layout, name)
        for key in ("unified", "memory", "pids", "cpu"):
            base = getattr(layout, key)
            if base is not None and (base / name).is_dir():
                group.folders[key] = base / name
        return group
