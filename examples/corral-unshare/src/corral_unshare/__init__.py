"""The ``unshare`` backend for corral: each sandbox is a private folder, and each command
runs in fresh pid, net, ipc, uts and mount namespaces made by util-linux ``unshare``.

It does NOT give a private view of the filesystem: the command sees the host's files
(as the sandbox user), with the sandbox folder mounted at the workdir and a private
``/tmp``. So it refuses isolating specs; use it with ``security.isolate = false`` and
``"isolate"`` in ``security.allow_unsafe``, for commands you trust with your files.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any

import attrs

import corral
from corral import (
    Availability,
    Backend,
    BackendInfo,
    Capability,
    ConfigError,
    ExecRequest,
    ExecStatus,
    InternalError,
    NotFoundError,
    OutputSink,
    PathSecurityError,
    ResourceLimitError,
    ResourceUsage,
    SandboxInfo,
    SandboxSpec,
)
from corral.core.convert import structure, unstructure

from . import files, process

__all__ = ["UnshareBackend", "UnshareSettings"]
__version__ = "0.1.0"

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CGROUP_V1 = "/sys/fs/cgroup"
_CONTROLLERS = ("pids", "memory")
# Fixed script texts; every value reaches them as a positional argument, never as text.
# Outside the namespaces: join the sandbox's cgroups, then become unshare.
_JOIN_CGROUPS = (
    'for procs in "$1" "$2"; do echo $$ > "$procs" || exit 125; done; shift 2; exec "$@"'
)
# Inside them: the sandbox folder at the workdir, then its own /tmp (in that order: the
# sandbox folder may be below the host's /tmp), then the command as a child. This shell
# stays the namespace's pid 1 on purpose: ``--kill-child`` sends it SIGKILL when unshare
# dies, but the kernel forgets that signal in a process that changes user (setpriv).
_SETUP = (
    'mount --bind "$1" "$2" && mount --bind "$3" /tmp && cd "$4" || exit 125; '
    'shift 4; "$@"; exit "$?"'
)
_NAMESPACES = ["--pid", "--fork", "--kill-child", "--net", "--ipc", "--uts", "--mount",
               "--mount-proc"]  # fmt: skip


@attrs.frozen
class UnshareSettings:
    """``[backends.unshare]``: ``root`` is where sandbox folders live (default: a folder
    in the system's temporary folder)."""

    root: str | None = None


_C = Capability
ALWAYS = (_C.NETWORK_NONE | _C.NOFILE_LIMIT | _C.NPROC_LIMIT | _C.CPU_TIME_LIMIT
          | _C.FILE_SIZE_LIMIT | _C.LIFETIME)  # fmt: skip
AS_ROOT = _C.MEMORY_LIMIT | _C.PIDS_LIMIT | _C.USER


def _translated(method: Any) -> Any:
    """The host's OSErrors become corral's errors, with the original chained."""

    @functools.wraps(method)
    def wrapper(self: UnshareBackend, sandbox_id: str, *args: Any) -> Any:
        try:
            return method(self, sandbox_id, *args)
        except OSError as e:
            where = {"backend": "unshare", "sandbox_id": sandbox_id}
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENOMEM):
                raise ResourceLimitError(f"the host is out of resources: {e}", **where) from e
            raise InternalError(f"the unshare backend failed: {e}", **where) from e

    return wrapper


@attrs.frozen
class _Sandbox:
    """One sandbox, as read from its folder."""

    id: str
    folder: str
    spec: SandboxSpec
    labels: dict[str, str]

    @property
    def work(self) -> str:
        return os.path.join(self.folder, "work")

    @property
    def tmp(self) -> str:
        return os.path.join(self.folder, "tmp")

    def info(self) -> SandboxInfo:
        created, expires = (
            float(self.labels["corral.created"]),
            float(self.labels["corral.expires"]),
        )
        return SandboxInfo(self.id, "unshare", "running", created, expires, None, dict(self.labels))


class UnshareBackend(Backend):
    """Commands in fresh namespaces (util-linux unshare), limits by prlimit and cgroups."""

    name = "unshare"
    Settings = UnshareSettings
    capability_conditions = (
        (ALWAYS, "always (namespaces by unshare, rlimits by prlimit)"),
        (AS_ROOT, "when corral runs as root, with cgroup v1 pids and memory controllers"),
    )

    def __init__(self, settings: UnshareSettings) -> None:
        super().__init__(settings)
        self._root_user = os.geteuid() == 0
        base = settings.root or os.path.join(
            tempfile.gettempdir(), f"corral-unshare-{os.geteuid()}"
        )
        self.root = os.path.abspath(base)
        self._running: dict[str, set[int]] = {}

    # -- what this host allows ----------------------------------------------------------

    def _cgroups(self) -> bool:
        return self._root_user and all(
            os.access(os.path.join(_CGROUP_V1, c, "cgroup.procs"), os.W_OK)
            and not os.path.exists(os.path.join(_CGROUP_V1, c, "cgroup.controllers"))  # v2
            for c in _CONTROLLERS
        )

    @functools.cached_property
    def _problem(self) -> str | None:
        """Why unshare cannot run here, found once by trying it."""
        tools = ["unshare", "prlimit"] + (["setpriv", "mount"] if self._root_user else [])
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            return f"{', '.join(missing)} not found on PATH"
        probe = ["unshare", *self._user_flags(), *_NAMESPACES, "true"]
        try:
            done = subprocess.run(probe, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{' '.join(probe)} failed: {e}"
        if done.returncode != 0:
            return f"{' '.join(probe)} failed: {done.stderr.decode(errors='replace').strip()}"
        return None

    def _user_flags(self) -> list[str]:
        # Root makes the namespaces itself; anyone else needs a user namespace for them.
        return [] if self._root_user else ["--user", "--map-root-user"]

    def check(self) -> Availability:
        if self._problem is not None:
            return Availability(
                False, self._problem, "install util-linux and allow unprivileged user namespaces"
            )
        if self._cgroups():
            return Availability(True, "as root, with cgroup v1 pids and memory limits")
        return Availability(True, "without cgroups: no memory or pids limit, so specs are refused")

    def capabilities(self) -> Capability:
        return ALWAYS | AS_ROOT if self._cgroups() else ALWAYS

    def capability_hint(self, missing: Capability) -> str:
        if missing & AS_ROOT:
            return (
                "memory and pids limits need cgroup v1 pids and memory controllers, "
                "writable only by root: run corral as root"
            )
        if missing & (Capability.ISOLATION | Capability.READ_ONLY_ROOT):
            return (
                "the unshare backend shares the host's filesystem; for trusted commands, "
                "set security.isolate = false and add 'isolate' to security.allow_unsafe"
            )
        return ""

    # -- lifecycle ----------------------------------------------------------------------

    @_translated
    def create(self, sandbox_id: str, spec: SandboxSpec, labels: dict[str, str]) -> None:
        self._remove_expired()
        owner = self._owner(spec.user, "sandbox.user")
        if spec.workdir == "/tmp" or spec.workdir.startswith("/tmp/"):
            raise ConfigError("sandbox.workdir", "the unshare backend gives /tmp its own folder")
        if self._root_user and not os.path.isdir(spec.workdir):
            # The folder is mounted there inside the namespace; the host needs a mount point.
            os.makedirs(spec.workdir, 0o755, exist_ok=True)
        os.makedirs(self.root, 0o711, exist_ok=True)
        folder = os.path.join(self.root, sandbox_id)
        os.mkdir(folder, 0o711)
        try:
            for sub in ("work", "tmp"):
                os.mkdir(os.path.join(folder, sub), 0o700)
                if owner is not None:
                    os.chown(os.path.join(folder, sub), *owner)
            if self._cgroups():
                self._make_cgroups(sandbox_id, spec)
            with open(os.path.join(folder, "meta.json"), "w") as f:
                json.dump({"spec": unstructure(spec), "labels": labels}, f)
        except BaseException:
            self.destroy(sandbox_id)
            raise

    def _owner(self, user: str, field: str) -> tuple[int, int] | None:
        """As root, the host uid and gid that commands run as (never root: root ignores
        RLIMIT_NPROC); otherwise None, as commands run as the caller."""
        if not self._root_user:
            return None
        uid, _, gid = user.partition(":")
        if not uid.isdigit() or not (gid or uid).isdigit():
            raise ConfigError(field, f"{user!r}: the unshare backend needs 'uid:gid' in numbers")
        if int(uid) == 0:
            raise ConfigError(field, "the unshare backend never runs commands as host root")
        return int(uid), int(gid or uid)

    def _cgroup(self, controller: str, sandbox_id: str) -> str:
        return os.path.join(_CGROUP_V1, controller, "corral-unshare", sandbox_id)

    def _make_cgroups(self, sandbox_id: str, spec: SandboxSpec) -> None:
        pids, memory = (self._cgroup(c, sandbox_id) for c in _CONTROLLERS)
        for folder in (pids, memory):
            os.makedirs(folder)
        limits = [
            (pids, "pids.max", spec.limits.pids),
            (memory, "memory.limit_in_bytes", spec.limits.memory),
            (memory, "memory.memsw.limit_in_bytes", spec.limits.memory),  # no swapping past it
        ]
        for folder, name, value in limits:
            path = os.path.join(folder, name)
            if name.startswith("memory.memsw") and not os.path.exists(path):
                continue  # swap accounting is off on this host
            with open(path, "w") as f:
                f.write(str(value))

    def _sandbox(self, sandbox_id: str) -> _Sandbox:
        if not sandbox_id.isalnum():
            raise NotFoundError(f"{sandbox_id!r} is not a sandbox id", backend=self.name)
        folder = os.path.join(self.root, sandbox_id)
        try:
            with open(os.path.join(folder, "meta.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            raise NotFoundError(
                "no such sandbox", backend=self.name, sandbox_id=sandbox_id
            ) from None
        return _Sandbox(sandbox_id, folder, structure(meta["spec"], SandboxSpec), meta["labels"])

    def inspect(self, sandbox_id: str) -> tuple[SandboxInfo, SandboxSpec]:
        box = self._sandbox(sandbox_id)
        return box.info(), box.spec

    def list(self) -> list[SandboxInfo]:
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            with contextlib.suppress(NotFoundError):
                found.append(self._sandbox(name).info())
        return found

    @_translated
    def destroy(self, sandbox_id: str) -> None:
        process.kill_all(list(self._running.pop(sandbox_id, ())))
        for controller in _CONTROLLERS:
            self._remove_cgroup(self._cgroup(controller, sandbox_id))
        # rmtree works from file descriptors: it never follows a link out of the folder
        shutil.rmtree(os.path.join(self.root, sandbox_id), ignore_errors=True)

    def _remove_cgroup(self, folder: str) -> None:
        """Kill what is still in it (commands started by other processes), then remove it."""
        for _ in range(100):
            try:
                with open(os.path.join(folder, "cgroup.procs")) as f:
                    pids = [int(line) for line in f if line.strip()]
            except FileNotFoundError:
                return
            process.kill_all(pids)
            try:
                os.rmdir(folder)
                return
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
            time.sleep(0.05)
        raise InternalError(f"cannot remove the cgroup {folder}: processes keep running")

    def _remove_expired(self) -> None:
        now = time.time()
        for info in self.list():
            if info.expires <= now:
                self.destroy(info.id)

    # -- exec ---------------------------------------------------------------------------

    def _command_line(self, box: _Sandbox, request: ExecRequest) -> list[str]:
        """The whole command line; the user's argv comes last, as arguments only."""
        spec, lim = box.spec, box.spec.limits
        rlimits = [f"--nofile={lim.nofile}:{lim.nofile}", f"--nproc={lim.nproc}:{lim.nproc}",
                   "--core=0:0"]  # fmt: skip
        if lim.cputime is not None:
            seconds = math.ceil(lim.cputime)
            rlimits.append(f"--cpu={seconds}:{seconds + 1}")
        if lim.file_size is not None:
            rlimits.append(f"--fsize={lim.file_size}:{lim.file_size}")
        cgroups = self._cgroups()
        if not cgroups:  # no memory cgroup: cap the address space instead
            rlimits.append(f"--as={lim.memory}:{lim.memory}")
        workdir = request.workdir or spec.workdir
        line = ["unshare", *self._user_flags(), *_NAMESPACES, "--",
                "sh", "-c", _SETUP, "corral-setup", box.work, spec.workdir, box.tmp, workdir,
                "prlimit", *rlimits, "--"]  # fmt: skip
        owner = self._owner(request.user or spec.user, "user")
        if owner is not None:
            line += ["setpriv", f"--reuid={owner[0]}", f"--regid={owner[1]}", "--clear-groups",
                     "--"]  # fmt: skip
        line += request.argv
        if cgroups:
            procs = [os.path.join(self._cgroup(c, box.id), "cgroup.procs") for c in _CONTROLLERS]
            line = ["sh", "-c", _JOIN_CGROUPS, "corral-join", *procs, *line]
        return line

    def _oom_kills(self, sandbox_id: str) -> int:
        path = os.path.join(self._cgroup("memory", sandbox_id), "memory.oom_control")
        with contextlib.suppress(OSError), open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    @_translated
    def exec(self, sandbox_id: str, request: ExecRequest, sink: OutputSink) -> ExecStatus:
        box = self._sandbox(sandbox_id)
        env = {"PATH": _PATH, "HOME": box.spec.workdir, **request.env}
        argv = self._command_line(box, request)
        ooms = self._oom_kills(sandbox_id)
        running = self._running.setdefault(sandbox_id, set())
        status = process.run(argv, env, request.stdin, sink, request.timeout, running)
        if status.exit_code == 137 and self._oom_kills(sandbox_id) > ooms:
            status = attrs.evolve(status, oom_killed=True)
        return status

    # -- files and usage ----------------------------------------------------------------

    def _host_path(self, box: _Sandbox, path: str) -> tuple[str, list[str]]:
        """The host folder behind the sandbox folder holding ``path``, and the rest of it."""
        for target, host in ((box.spec.workdir, box.work), ("/tmp", box.tmp)):
            if path == target or path.startswith(target.rstrip("/") + "/"):
                return host, [p for p in path[len(target) :].split("/") if p]
        raise PathSecurityError(
            f"{path!r} is outside the sandbox's folders ({box.spec.workdir} and /tmp)"
        )

    @_translated
    def put_archive(self, sandbox_id: str, path: str, archive: IO[bytes]) -> None:
        box = self._sandbox(sandbox_id)
        root, parts = self._host_path(box, path)
        files.put_archive(root, parts, path, archive, self._owner(box.spec.user, "sandbox.user"))

    def get_archive(self, sandbox_id: str, path: str) -> Iterator[bytes]:
        box = self._sandbox(sandbox_id)
        root, parts = self._host_path(box, path)
        try:
            yield from files.get_archive(root, parts, path)
        except OSError as e:
            raise InternalError(f"the unshare backend failed: {e}", backend=self.name) from e

    @_translated
    def usage(self, sandbox_id: str) -> ResourceUsage:
        box = self._sandbox(sandbox_id)
        found: dict[str, int] = {}
        for controller, name in (("memory", "memory.usage_in_bytes"),
                                 ("memory", "memory.max_usage_in_bytes"),
                                 ("pids", "pids.current")):  # fmt: skip
            path = os.path.join(self._cgroup(controller, sandbox_id), name)
            with contextlib.suppress(OSError, ValueError), open(path) as f:
                found[name] = int(f.read())
        return ResourceUsage(
            memory_bytes=found.get("memory.usage_in_bytes"),
            memory_peak_bytes=found.get("memory.max_usage_in_bytes"),
            memory_limit_bytes=box.spec.limits.memory,
            pids=found.get("pids.current"),
            timestamp=time.time(),
        )


@corral.hookimpl
def corral_backends() -> list[BackendInfo]:
    return [
        BackendInfo(
            name="unshare",
            backend=UnshareBackend,
            description="fresh namespaces by util-linux unshare; shares the host's files",
        )
    ]
