"""The Backend base class, the capability flags and the registration record."""

from __future__ import annotations

import abc
import builtins
import enum
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any, ClassVar

import attrs

from .errors import CapabilityError, SandboxError

if TYPE_CHECKING:
    from .output import OutputSink
    from .results import (
        Change,
        Health,
        NodeInfo,
        ProcessInfo,
        ProcessRead,
        ResourceUsage,
        SandboxInfo,
        SnapshotInfo,
    )
    from .spec import ExecRequest, SandboxSpec

__all__ = [
    "Availability",
    "Backend",
    "BackendInfo",
    "Capability",
    "ExecStatus",
    "NoSettings",
    "required_capabilities",
]


class Capability(enum.Flag):
    """What a backend really enforces. A spec that needs more is refused before create."""

    ISOLATION = enum.auto()  # own filesystem view, pid, ipc and uts namespaces
    NETWORK_NONE = enum.auto()  # loopback only
    NETWORK_BRIDGE = enum.auto()  # outbound network through the engine
    DNS = enum.auto()
    MEMORY_LIMIT = enum.auto()
    CPU_LIMIT = enum.auto()
    PIDS_LIMIT = enum.auto()
    NOFILE_LIMIT = enum.auto()
    NPROC_LIMIT = enum.auto()
    CPU_TIME_LIMIT = enum.auto()
    FILE_SIZE_LIMIT = enum.auto()
    DISK_LIMIT = enum.auto()
    LIFETIME = enum.auto()
    READ_ONLY_ROOT = enum.auto()
    BIND_MOUNTS = enum.auto()
    TMPFS = enum.auto()
    VOLUMES = enum.auto()
    CAP_ADD = enum.auto()
    NO_NEW_PRIVILEGES = enum.auto()
    SECCOMP = enum.auto()
    APPARMOR = enum.auto()
    SELINUX = enum.auto()
    MASKED_PATHS = enum.auto()
    IMAGES = enum.auto()
    INIT_COMMAND = enum.auto()  # a spec.command run as the sandbox's PID 1
    USER = enum.auto()
    HEALTHCHECK = enum.auto()
    PAUSE = enum.auto()  # pause and resume: every process frozen, none lost
    # Long-lived sandboxes (docs/long-lived.md):
    PROCESSES = enum.auto()  # exec takes ExecRequest.input and name, and exec_signal
    TTY = enum.auto()  # exec takes ExecRequest.tty, and exec_resize
    EXTEND = enum.auto()  # a running sandbox's lifetime can be moved (extend)
    SNAPSHOTS = enum.auto()  # the filesystem captured, and started from (image=snapshot)
    MEMORY_SNAPSHOTS = enum.auto()  # running processes captured too (CRIU)
    PORTS = enum.auto()  # a bridged sandbox's ports published on the host's loopback
    CHANGES = enum.auto()  # what was added, changed and deleted since the sandbox was made


def required_capabilities(spec: SandboxSpec) -> dict[Capability, str]:
    """Each capability the spec needs, with the field (and value) that needs it."""
    C = Capability
    need: dict[Capability, str] = {}
    sec, lim = spec.security, spec.limits
    if sec.isolate:
        need[C.ISOLATION] = "sandbox.security.isolate = true"
        need[C.NETWORK_NONE if spec.network.mode == "none" else C.NETWORK_BRIDGE] = (
            f"sandbox.network.mode = {spec.network.mode!r}"
        )
        if sec.read_only_root:
            need[C.READ_ONLY_ROOT] = "sandbox.security.read_only_root = true"
        if sec.no_new_privileges:
            need[C.NO_NEW_PRIVILEGES] = "sandbox.security.no_new_privileges = true"
    if spec.network.dns:
        need[C.DNS] = "sandbox.network.dns"
    need[C.MEMORY_LIMIT] = "sandbox.limits.memory"
    if lim.cpus is not None:
        need[C.CPU_LIMIT] = "sandbox.limits.cpus"
    need[C.PIDS_LIMIT] = "sandbox.limits.pids"
    need[C.NOFILE_LIMIT] = "sandbox.limits.nofile"
    need[C.NPROC_LIMIT] = "sandbox.limits.nproc"
    need[C.LIFETIME] = "sandbox.limits.lifetime"
    for field, cap in (
        ("cputime", C.CPU_TIME_LIMIT),
        ("file_size", C.FILE_SIZE_LIMIT),
        ("disk", C.DISK_LIMIT),
    ):
        if getattr(lim, field) is not None:
            need[cap] = f"sandbox.limits.{field}"
    kinds = {m.kind for m in spec.mounts}
    for kind, cap in (("bind", C.BIND_MOUNTS), ("tmpfs", C.TMPFS), ("volume", C.VOLUMES)):
        if kind in kinds:
            need[cap] = f"sandbox.mounts ({kind})"
    optional = (
        (sec.cap_add, C.CAP_ADD, "sandbox.security.cap_add"),
        (sec.seccomp, C.SECCOMP, "sandbox.security.seccomp"),
        (sec.apparmor, C.APPARMOR, "sandbox.security.apparmor"),
        (sec.selinux_label, C.SELINUX, "sandbox.security.selinux_label"),
        (sec.masked_paths, C.MASKED_PATHS, "sandbox.security.masked_paths"),
        (spec.image, C.IMAGES, "sandbox.image"),
        (spec.command, C.INIT_COMMAND, "sandbox.command"),
        (spec.healthcheck, C.HEALTHCHECK, "sandbox.healthcheck"),
    )
    for value, cap, field in optional:
        if value:
            need[cap] = field
    if spec.image and is_snapshot_image(spec.image):
        # A snapshot is the backend's own (a committed image, a copied folder).
        del need[C.IMAGES]
        need[C.SNAPSHOTS] = "sandbox.image (a snapshot)"
    if spec.ports:
        need[C.PORTS] = "sandbox.ports"
    return need


#: How a snapshot is named where an image name goes: ``corral.create(image=snapshot)``.
SNAPSHOT_IMAGE = "corral-snapshot"


def is_snapshot_image(image: str) -> bool:
    """Whether ``image`` names one of corral's snapshots (``corral-snapshot:ID``)."""
    name = image.rsplit("/", 1)[-1]
    return name.startswith(SNAPSHOT_IMAGE + ":")


def snapshot_id_of(image: str) -> str:
    """The snapshot id in ``corral-snapshot:ID`` (or ``localhost/corral-snapshot:ID``)."""
    return image.rsplit(":", 1)[-1]


def _string_tuple(items: Iterable[str]) -> tuple[str, ...]:
    # Named, not `converter=tuple`: mypy cannot solve tuple's type variable there.
    return tuple(items)


@attrs.frozen
class Availability:
    """Whether a backend can run here; when not, why and how to fix it.

    ``warnings`` are things the user should know that do not stop the backend (an
    engine release older than a security fix the distribution may have backported):
    ``corral doctor`` and ``corral backends`` show them, and nothing else prints them.
    """

    ok: bool
    reason: str = ""
    fix: str = ""
    warnings: tuple[str, ...] = attrs.field(default=(), converter=_string_tuple)

    def __str__(self) -> str:
        if self.ok:
            return "available" + (f" ({self.reason})" if self.reason else "")
        return self.reason + (f"; fix: {self.fix}" if self.fix else "")


@attrs.frozen
class ExecStatus:
    """How a command ended, as a backend reports it; the output is in the sink.

    ``oom_events`` is how many OOM kills the sandbox's memory cgroup counted while the
    command ran (a delta, never the sandbox's running total); ``oom_killed`` means the
    command itself died of one (exit 137 and at least one such kill).
    """

    exit_code: int
    timed_out: bool = False
    oom_killed: bool = False
    signal: int | None = None
    oom_events: int = 0


@attrs.frozen
class NoSettings:
    """Settings of a backend that has none."""


class Backend(abc.ABC):
    """A place where sandboxes run. Subclass it, then register it with ``corral_backends``.

    The methods are a stateless operation layer keyed by sandbox id, so a sandbox made
    by one process can be used from another (``corral.attach``). Every method raises
    only SandboxError subclasses: translate the engine's exceptions (``raise ... from``).
    """

    #: The name users select the backend by.
    name: ClassVar[str]
    #: An attrs class for the backend's options, filled from ``[backends.NAME]``.
    Settings: ClassVar[type] = NoSettings
    #: What the backend can enforce and under which condition, for documentation and
    #: ``corral doctor``: pairs of (capabilities, condition such as "always").
    #: ``capabilities()`` says what holds on this host now.
    capability_conditions: ClassVar[tuple[tuple[Capability, str], ...]] = ()

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    @abc.abstractmethod
    def check(self) -> Availability:
        """Whether the backend can run here, cheaply; never raises."""

    @abc.abstractmethod
    def capabilities(self) -> Capability:
        """What this backend enforces on this host (may depend on the host)."""

    @abc.abstractmethod
    def create(self, sandbox_id: str, spec: SandboxSpec, labels: dict[str, str]) -> None:
        """Make and start the sandbox. On failure, leave nothing behind."""

    @abc.abstractmethod
    def exec(self, sandbox_id: str, request: ExecRequest, sink: OutputSink) -> ExecStatus:
        """Run ``request.argv``, feeding output to ``sink`` as it comes.

        On timeout (``request.timeout``) or when ``sink.cancelled`` becomes true, stop
        every process the command started and return with ``timed_out`` set.
        """

    @abc.abstractmethod
    def put_archive(self, sandbox_id: str, path: str, archive: IO[bytes]) -> None:
        """Unpack an uncompressed tar (built by ``corral.core.archive``) into folder ``path``."""

    @abc.abstractmethod
    def get_archive(self, sandbox_id: str, path: str) -> Iterator[bytes]:
        """A tar stream of ``path`` (a file or a folder), as chunks."""

    @abc.abstractmethod
    def usage(self, sandbox_id: str) -> ResourceUsage:
        """What the sandbox uses now."""

    @abc.abstractmethod
    def destroy(self, sandbox_id: str) -> None:
        """Remove the sandbox and everything it holds. Idempotent; gone is fine."""

    @abc.abstractmethod
    def list(self) -> list[SandboxInfo]:
        """Every sandbox of this backend's that carries corral's labels."""

    @abc.abstractmethod
    def inspect(self, sandbox_id: str) -> tuple[SandboxInfo, SandboxSpec]:
        """One sandbox and its spec, for ``corral.attach``; NotFoundError when gone."""

    def run_once(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        labels: dict[str, str],
        request: ExecRequest,
        sink: OutputSink,
    ) -> ExecStatus:
        """Make the sandbox, run ``request`` in it and remove it: ``corral.run``'s path.

        The result must be what ``create``, ``exec`` and ``destroy`` would give, and
        nothing of the sandbox may be left on return, also when this raises. This default
        does exactly those three; a backend that can start the command as the sandbox's
        own process, saving the exec, overrides it (the container engines do).
        """
        try:
            self.create(sandbox_id, spec, labels)
            return self.exec(sandbox_id, request, sink)
        finally:
            self.destroy(sandbox_id)

    def alive(self, sandbox_id: str) -> bool:
        """Whether the sandbox still runs and can take commands (a warm pool asks this
        before every hand-out, so a backend with a cheaper way than ``inspect`` should
        override it). Errors mean no."""
        try:
            return self.inspect(sandbox_id)[0].status == "running"
        except SandboxError:
            return False

    def node_of(self, sandbox_id: str) -> NodeInfo | None:
        """The cluster node the sandbox runs on, for ``SandboxInfo.node``; None on a
        single host (this default). Cheap: asked once after each create."""
        return None

    def capability_hint(self, missing: Capability) -> str:
        """Why this host lacks ``missing`` and how to fix it, for the refusal message."""
        return ""

    def diagnose(self) -> builtins.list[str]:  # `list` in this class is the method
        """Facts ``corral doctor`` shows under an available backend (``"init: ..."``),
        beyond ``check``; may probe, so it is never called on the way to a create."""
        return []

    def health(self, sandbox_id: str) -> Health:
        """The healthcheck's state; backends that run healthchecks override this."""
        from .results import Health

        return Health(status="none")

    # -- long-lived sandboxes: each needs its Capability, and refuses without it --------

    def _lacks(self, what: str, capability: Capability) -> CapabilityError:
        return CapabilityError(
            f"the {self.name} backend cannot {what} ({capability.name})", backend=self.name
        )

    def pause(self, sandbox_id: str) -> None:
        """Freeze every process of the sandbox (PAUSE); ``inspect`` says ``paused``."""
        raise self._lacks("pause sandboxes", Capability.PAUSE)

    def resume(self, sandbox_id: str) -> None:
        """Thaw what ``pause`` froze (PAUSE). Resuming a running sandbox does nothing."""
        raise self._lacks("pause sandboxes", Capability.PAUSE)

    def extend(self, sandbox_id: str, expires: float) -> None:
        """Move the sandbox's end to ``expires`` (a time.time(), EXTEND): ``list`` and
        ``inspect`` report it, and nothing removes the sandbox before it."""
        raise self._lacks("extend a sandbox's lifetime", Capability.EXTEND)

    def exec_signal(self, sandbox_id: str, name: str, signum: int) -> None:
        """Send ``signum`` to the command of the running exec whose request had ``name``
        (PROCESSES): the command itself, not a shell around it nor its children."""
        raise self._lacks("signal a running command", Capability.PROCESSES)

    def exec_resize(self, sandbox_id: str, name: str, rows: int, cols: int) -> None:
        """Set the terminal size of the running ``tty`` exec named ``name`` (TTY)."""
        raise self._lacks("give commands a terminal", Capability.TTY)

    def port(self, sandbox_id: str, port: int) -> tuple[str, int]:
        """The host address (on loopback) where the sandbox's published ``port`` is
        reached (PORTS); NotFoundError for a port the spec did not publish."""
        raise self._lacks("publish ports", Capability.PORTS)

    def changes(self, sandbox_id: str) -> builtins.list[Change]:
        """What was added, changed and deleted under the sandbox's writable paths since it
        was made from its image or snapshot (CHANGES), sorted by path; file contents
        are never read."""
        raise self._lacks("list a sandbox's changes", Capability.CHANGES)

    def snapshot(
        self, sandbox_id: str, snapshot_id: str, labels: dict[str, str], memory: bool
    ) -> SnapshotInfo:
        """Capture the sandbox's filesystem (and, with ``memory``, its processes) as the
        snapshot ``snapshot_id`` (SNAPSHOTS, MEMORY_SNAPSHOTS), carrying ``labels``
        (corral.expires among them). ``create`` with ``spec.image`` set to its
        ``image`` starts a sandbox from it. On failure, leave nothing behind."""
        raise self._lacks("take snapshots", Capability.SNAPSHOTS)

    def snapshots(self) -> builtins.list[SnapshotInfo]:
        """Every snapshot of this backend's that carries corral's labels."""
        return []

    def remove_snapshot(self, snapshot_id: str) -> None:
        """Remove a snapshot. Idempotent; ConflictError while a sandbox still uses it."""
        raise self._lacks("take snapshots", Capability.SNAPSHOTS)

    # -- processes: by default corral's keeper runs them through ``exec`` --------------

    def spawn(
        self, sandbox_id: str, request: ExecRequest, idle_timeout: float | None
    ) -> ProcessInfo:
        """Start ``request`` in the background and return at once (PROCESSES).

        This default hands it to corral's keeper (``corral.core.keeper``), a process of
        the sandbox's own on this host that runs it through this backend's ``exec`` with
        ``request.input``, keeps its output and result, and outlives the caller. A
        backend that keeps processes elsewhere (a cluster node's) overrides the five
        process methods together.
        """
        from . import processes

        self._need_processes()
        return processes.spawn(self, sandbox_id, request, idle_timeout)

    def processes(self, sandbox_id: str) -> builtins.list[ProcessInfo]:
        """The sandbox's spawned processes, running or ended (until the sandbox goes)."""
        from . import processes

        return processes.listing(self, sandbox_id)

    def process_read(
        self, sandbox_id: str, process_id: str, offset: int, wait: float
    ) -> ProcessRead:
        """The process's output from ``offset`` (0: its start), waiting up to ``wait``
        seconds for some, and its end once it ended."""
        from . import processes

        return processes.read(self, sandbox_id, process_id, offset, wait)

    def process_control(self, sandbox_id: str, process_id: str, op: str, **args: Any) -> None:
        """``write`` (data), ``close_stdin``, ``signal`` (signum), ``kill`` or ``resize``
        (rows, cols) a spawned process."""
        from . import processes

        processes.control(self, sandbox_id, process_id, op, **args)

    def forget_processes(self, sandbox_id: str) -> None:
        """Drop what this host keeps of the sandbox's processes (after its destroy)."""
        from . import processes

        processes.forget(self, sandbox_id)

    def _need_processes(self) -> None:
        if not self.capabilities() & Capability.PROCESSES:
            raise self._lacks("run background processes", Capability.PROCESSES)

    def close(self) -> None:  # noqa: B027 - optional, most backends hold nothing
        """Release clients and connections; called once when the process is done with it."""


@attrs.frozen
class BackendInfo:
    """What a plugin's ``corral_backends`` hook returns for each backend it provides."""

    name: str
    backend: type[Backend]
    description: str = ""
