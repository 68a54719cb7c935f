"""What the Docker and Podman backends share: spec to engine arguments, labels,
verification, the exec stream protocol, host-side process control and cgroup usage.

Nothing here imports an engine client; the engines' own modules call into it.
"""

from __future__ import annotations

import contextlib
import json
import math
import posixpath
import re
import select
import socket
import struct
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs

from ..core.backend import Capability, ExecStatus
from ..core.convert import structure, unstructure
from ..core.errors import ConfigError, ConflictError, InternalError, PolicyError, SandboxError
from ..core.output import OutputSink
from ..core.results import LEFTOVER, Health, ResourceUsage, SandboxInfo
from ..core.spec import ExecRequest, Mount, SandboxSpec, Tmpfs, Volume
from ..core.units import parse_size
from . import sweep
from .cgroupfs import read_int, read_keyed

__all__ = [
    "DEFAULT_MASKED_PATHS",
    "ContainerPlan",
    "HostView",
    "container_name",
    "info_from_labels",
    "leftover_networks",
    "network_labels",
    "network_name",
    "plan",
    "read_frames",
    "verify",
]

NAME_PREFIX = "corral-"
SPEC_LABEL = "corral.spec"
# moby oci/defaults.go; corral keeps them and adds the spec's own.
DEFAULT_MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
SECCOMP_UNCONFINED = "unconfined"


PULL_POLICIES = ("never", "missing", "always")
# With fewer, runc's exec helpers (they count against the pids limit while they set an
# exec up) fail at random on both engines: measured 1 exec in 5 at 8, none at 16.
MIN_PIDS = 16
# Connections each engine client keeps open for reuse: a program driving a hundred
# sandboxes from a hundred threads reuses them instead of opening (and, past the
# clients' default of 10, throwing away with a warning) one per call.
CONNECTION_POOL_SIZE = 128
_C = Capability
# What both engines enforce for every sandbox; each adds its security modules.
CAPABILITIES = (
    _C.ISOLATION | _C.NETWORK_NONE | _C.NETWORK_BRIDGE | _C.DNS | _C.MEMORY_LIMIT
    | _C.CPU_LIMIT | _C.PIDS_LIMIT | _C.NOFILE_LIMIT | _C.NPROC_LIMIT | _C.CPU_TIME_LIMIT
    | _C.FILE_SIZE_LIMIT | _C.LIFETIME | _C.READ_ONLY_ROOT | _C.BIND_MOUNTS | _C.TMPFS
    | _C.VOLUMES | _C.CAP_ADD | _C.NO_NEW_PRIVILEGES | _C.MASKED_PATHS | _C.IMAGES
    | _C.INIT_COMMAND | _C.USER | _C.HEALTHCHECK | _C.PAUSE
)  # fmt: skip


def container_name(sandbox_id: str) -> str:
    return NAME_PREFIX + sandbox_id


def network_name(sandbox_id: str) -> str:
    """The network of a bridged sandbox's own: named as its container (the engines keep
    container and network names apart)."""
    return NAME_PREFIX + sandbox_id


# The labels a sandbox's network carries: corral's own, found by gc and the leak checks.
_NETWORK_LABELS = ("corral.managed", "corral.sandbox", "corral.backend", "corral.expires")


def network_labels(labels: dict[str, str]) -> dict[str, str]:
    """A sandbox's network's labels: corral's, and ``corral.created`` set to when the
    network is made (gc leaves a network without a container alone for a while, so
    that it never removes one whose sandbox is still being created, image pull aside)."""
    return {
        **{k: labels[k] for k in _NETWORK_LABELS if k in labels},
        "corral.created": str(int(time.time())),
    }


def remove_network(remove: Callable[[], None], busy: Callable[[Exception], bool]) -> None:
    """Call ``remove`` (a network's), again for a few seconds while the engine says
    ``busy``: the container's endpoint can outlive the container by a moment when the
    engine removed it by itself (its lifetime ended while it was being destroyed)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            remove()
            return
        except Exception as e:
            if not busy(e) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def expired(labels: dict[str, str] | None, now: float) -> bool:
    """Whether the lifetime in these labels (a network's) has ended."""
    try:
        return float((labels or {})["corral.expires"]) < now
    except (KeyError, ValueError):
        return False


def leftover_networks(
    backend: str, networks: Iterable[tuple[str, dict[str, str]]], listed: Iterable[SandboxInfo]
) -> list[SandboxInfo]:
    """Sandboxes of which only their network is left (``(name, labels)`` pairs, as the
    engine lists its corral networks), as ``leftover`` entries for ``list``.

    A bridged sandbox's container removes itself when its lifetime ends (or its program
    was killed while creating it); its network stays until ``destroy`` or ``gc``.
    """
    have = {info.id for info in listed}
    found = []
    for name, labels in networks:
        sandbox_id = (labels or {}).get("corral.sandbox")
        if not sandbox_id or sandbox_id in have or name != network_name(sandbox_id):
            continue
        if labels.get("corral.backend") != backend:
            continue
        have.add(sandbox_id)
        found.append(info_from_labels(backend, sandbox_id, labels, LEFTOVER, None))
    return found


@attrs.frozen
class TmpfsVolume:
    """A size-capped, memory-backed volume: reachable by the archive API, unlike --tmpfs."""

    target: str
    size: int
    mode: int
    uid: int
    gid: int
    exec: bool

    def driver_options(self) -> dict[str, str]:
        options = [
            f"size={self.size}",
            f"mode={self.mode:o}",
            f"uid={self.uid}",
            f"gid={self.gid}",
            "nosuid",
            "nodev",
        ]
        if not self.exec:
            options.append("noexec")
        return {"type": "tmpfs", "device": "tmpfs", "o": ",".join(options)}


@attrs.frozen
class ContainerPlan:
    """Engine-neutral description of the container for one sandbox."""

    name: str
    image: str
    command: list[str]
    user: str
    workdir: str
    env: dict[str, str]
    labels: dict[str, str]
    read_only: bool
    cap_add: list[str]
    security_opt: list[str]
    network: str  # "none" or "bridge"
    network_name: str | None  # a bridged sandbox's own network (None: no network)
    dns: list[str]
    memory: int
    pids: int
    nano_cpus: int | None
    ulimits: dict[str, tuple[int, int]]
    tmpfs_volumes: list[TmpfsVolume]
    binds: list[Mount]
    volumes: list[Volume]
    masked_paths: list[str]
    healthcheck: dict[str, Any] | None


def _seccomp_option(profile: str | None) -> list[str]:
    if profile is None:
        return []  # the engine's default profile
    if profile == SECCOMP_UNCONFINED:
        return ["seccomp=unconfined"]
    try:
        text = Path(profile).read_text()
        json.loads(text)
    except (OSError, ValueError) as e:
        raise ConfigError(
            "sandbox.security.seccomp", f"{profile!r} is not a readable JSON profile ({e})"
        ) from None
    return [f"seccomp={text}"]


def plan(
    spec: SandboxSpec, labels: dict[str, str], *, image: str | None, workspace_size: int
) -> ContainerPlan:
    """The container that enforces ``spec``."""
    image = spec.image or image
    if not image:
        raise ConfigError("sandbox.image", "no image given and the backend has no default_image")
    if spec.limits.pids < MIN_PIDS:
        raise ConfigError(
            "sandbox.limits.pids",
            f"{spec.limits.pids} is below {MIN_PIDS}, the least a container takes: the "
            "runtime's own exec helpers count against the limit, and under it commands "
            f"fail to start at random; set it to {MIN_PIDS} or more",
        )
    ids = spec.uid_gid() or (0, 0)
    sec, lim = spec.security, spec.limits
    security_opt = ["no-new-privileges"] if sec.no_new_privileges else []
    security_opt += _seccomp_option(sec.seccomp)
    if sec.apparmor:
        security_opt.append(f"apparmor={sec.apparmor}")
    if sec.selinux_label:
        security_opt.append(
            "label=disable" if sec.selinux_label == "disable" else f"label={sec.selinux_label}"
        )
    ulimits = {
        "nofile": (lim.nofile, lim.nofile),
        "nproc": (lim.nproc, lim.nproc),
        "core": (0, 0),
    }
    if lim.cputime is not None:
        ulimits["cpu"] = (math.ceil(lim.cputime), math.ceil(lim.cputime) + 1)
    if lim.file_size is not None:
        ulimits["fsize"] = (lim.file_size, lim.file_size)
    tmpfs = [TmpfsVolume(spec.workdir, workspace_size, 0o755, ids[0], ids[1], True)]
    if (
        not any(isinstance(m, Tmpfs) and m.target == "/tmp" for m in spec.mounts)
        and spec.workdir != "/tmp"
    ):
        tmpfs.append(TmpfsVolume("/tmp", parse_size("64MiB"), 0o1777, ids[0], ids[1], False))
    for m in spec.mounts:
        if isinstance(m, Tmpfs):
            tmpfs = [t for t in tmpfs if t.target != m.target]
            tmpfs.append(TmpfsVolume(m.target, m.size, m.mode, ids[0], ids[1], m.exec))
    hc = None
    if spec.healthcheck is not None:
        h = spec.healthcheck
        hc = {
            "test": ["CMD", *h.test],
            "interval": int(h.interval * 1e9),
            "timeout": int(h.timeout * 1e9),
            "retries": h.retries,
            "start_period": int(h.start_period * 1e9),
        }
    env = {**spec.network.proxy_env(), **spec.env}
    return ContainerPlan(
        name=container_name(labels["corral.sandbox"]),
        image=image,
        command=init_command(spec.command, lim.lifetime),
        user=spec.user,
        workdir=spec.workdir,
        env=env,
        labels={**labels, SPEC_LABEL: json.dumps(unstructure(spec), separators=(",", ":"))},
        read_only=sec.read_only_root,
        cap_add=list(sec.cap_add),
        security_opt=security_opt,
        network=spec.network.mode,
        network_name=(
            network_name(labels["corral.sandbox"]) if spec.network.mode == "bridge" else None
        ),
        dns=list(spec.network.dns),
        memory=lim.memory,
        pids=lim.pids,
        nano_cpus=None if lim.cpus is None else int(lim.cpus * 1e9),
        ulimits=ulimits,
        tmpfs_volumes=tmpfs,
        binds=_with_read_only_submounts([m for m in spec.mounts if isinstance(m, Mount)]),
        volumes=[m for m in spec.mounts if isinstance(m, Volume)],
        masked_paths=[*DEFAULT_MASKED_PATHS, *sec.masked_paths],
        healthcheck=hc,
    )


def _with_read_only_submounts(binds: list[Mount]) -> list[Mount]:
    """The binds, plus a read-only bind over every host mount below a read-only one.

    The engines make a bind read-only at its top only: the submounts it carries in (a
    tmpfs at ``repo/cache``) stay writable inside, and neither engine here offers a
    recursive read-only option (Docker's ReadOnlyForceRecursive needs API 1.44). So
    each submount is bound again, read-only, over itself.
    """
    points = _host_mount_points()
    out = list(binds)
    targets = {b.target for b in binds}
    for bind in binds:
        if not bind.read_only:
            continue
        prefix = bind.source.rstrip("/") + "/"
        for point in points:
            target = posixpath.join(bind.target, point[len(prefix) :])
            if point.startswith(prefix) and target not in targets:
                out.append(Mount(point, target, read_only=True))
                targets.add(target)
    return out


def _host_mount_points() -> list[str]:
    """Every mount point of this host (the engine's, for a local engine), in mount order."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    # Field 5 is the mount point, with space, tab, newline and backslash as octal escapes.
    unescape = re.compile(r"\\([0-7]{3})")
    return [unescape.sub(lambda m: chr(int(m[1], 8)), line.split(" ")[4]) for line in lines]


def init_command(command: tuple[str, ...] | None, lifetime: float) -> list[str]:
    """PID 1 (under the engine's init, which reaps): it ends with the lifetime, and the
    engine then removes the container, so nothing outlives a crashed caller. The spec's
    own command is bounded the same way, by ``timeout`` (coreutils' or busybox's); an
    image without it fails to start rather than run past its lifetime."""
    seconds = str(math.ceil(lifetime))
    if command is None:
        return ["sleep", seconds]
    return ["timeout", "-s", "KILL", seconds, *command]


def verify(plan_: ContainerPlan, inspect: dict[str, Any]) -> None:
    """Refuse a container the engine did not configure as asked (inspect after create)."""
    hc = inspect.get("HostConfig") or {}
    problems = []

    def expect(field: str, ok: bool, wanted: object) -> None:
        if not ok:
            problems.append(f"{field} is {hc.get(field)!r}, wanted {wanted!r}")

    expect("Privileged", hc.get("Privileged") is False, False)
    expect("ReadonlyRootfs", bool(hc.get("ReadonlyRootfs")) == plan_.read_only, plan_.read_only)
    # Docker reports CapDrop ["ALL"]; Podman lists the dropped capabilities and the
    # effective set it left, which must be exactly what was added.
    dropped_all = "ALL" in [c.upper() for c in hc.get("CapDrop") or []]
    if "EffectiveCaps" in inspect:
        effective = sorted(c.upper().removeprefix("CAP_") for c in inspect["EffectiveCaps"] or [])
        dropped_all = effective == sorted(c.upper().removeprefix("CAP_") for c in plan_.cap_add)
    expect("CapDrop", dropped_all, ["ALL"])
    if "EffectiveCaps" not in inspect:  # Podman leaves CapAdd empty; checked just above
        added = sorted(c.upper().removeprefix("CAP_") for c in hc.get("CapAdd") or [])
        wanted = sorted(c.upper().removeprefix("CAP_") for c in plan_.cap_add)
        expect("CapAdd", added == wanted, plan_.cap_add)
    opts = hc.get("SecurityOpt") or []
    if "no-new-privileges" in plan_.security_opt:
        expect(
            "SecurityOpt", any(o.startswith("no-new-privileges") for o in opts), "no-new-privileges"
        )
    expect("Memory", hc.get("Memory") == plan_.memory, plan_.memory)
    expect("MemorySwap", hc.get("MemorySwap") == plan_.memory, plan_.memory)
    expect("PidsLimit", hc.get("PidsLimit") == plan_.pids, plan_.pids)
    adj = sweep.EXEC_OOM_SCORE_ADJ  # every process's; the keep-alive's is lowered later
    expect("OomScoreAdj", hc.get("OomScoreAdj") == adj, adj)
    if plan_.nano_cpus is not None:
        expect("NanoCpus", hc.get("NanoCpus") == plan_.nano_cpus, plan_.nano_cpus)
    if plan_.network == "none":
        mode = hc.get("NetworkMode")
        expect(
            "NetworkMode",
            mode in ("none", "", None) or inspect.get("Config", {}).get("NetworkDisabled"),
            "none",
        )
    if plan_.network_name is not None:
        # On its own network and no other (the engine's default bridge joins every
        # bridged container to every other).
        joined = sorted((inspect.get("NetworkSettings") or {}).get("Networks") or {})
        if joined != [plan_.network_name]:
            problems.append(f"networks are {joined!r}, wanted [{plan_.network_name!r}]")
    for ns in ("PidMode", "IpcMode", "UTSMode", "UsernsMode"):
        expect(ns, hc.get(ns) != "host", "not host")
    expect("Devices", not hc.get("Devices"), [])
    limits = {u["Name"].lower().removeprefix("rlimit_"): u for u in hc.get("Ulimits") or []}
    expect("Ulimits", limits.get("nofile", {}).get("Hard") == plan_.ulimits["nofile"][1], "nofile")
    if hc.get("MaskedPaths") is not None:  # Docker reports them; Podman does not
        missing = set(plan_.masked_paths) - set(hc["MaskedPaths"])
        expect("MaskedPaths", not missing, sorted(missing))
    mounts = {m.get("Destination"): m for m in inspect.get("Mounts") or []}
    for bind in plan_.binds:
        found = mounts.get(bind.target)
        if found is None or bool(found.get("RW")) == bind.read_only:
            problems.append(f"mount {bind.target} is {found!r}, wanted read_only={bind.read_only}")
    if problems:
        raise PolicyError("the engine did not apply the sandbox's settings: " + "; ".join(problems))


def wait_until_gone(
    exists: Callable[[], bool], backend: str, sandbox_id: str, timeout: float = 30
) -> None:
    """Wait out the engine's own removal (its lifetime just ended), so that nothing of
    the sandbox is left when ``close()`` returns."""
    deadline = time.monotonic() + timeout
    while exists():
        if time.monotonic() > deadline:
            raise ConflictError(
                "the engine did not finish removing the sandbox",
                backend=backend,
                sandbox_id=sandbox_id,
            )
        time.sleep(0.05)


def health_from(report: dict[str, Any] | None) -> Health:
    """The engines' healthcheck report (Status, FailingStreak, Log) as corral's Health."""
    if not report:
        return Health(status="none")
    log = report.get("Log") or []
    return Health(
        status=report.get("Status", "none"),
        failing_streak=report.get("FailingStreak", 0),
        last_output=(log[-1].get("Output", "") if log else ""),
    )


def info_from_labels(
    backend: str, sandbox_id: str, labels: dict[str, str], status: str, image: str | None
) -> SandboxInfo:
    public = {k: v for k, v in labels.items() if k != SPEC_LABEL}
    return SandboxInfo(
        id=sandbox_id,
        backend=backend,
        status=status,
        created=float(labels.get("corral.created", 0)),
        expires=float(labels.get("corral.expires", 0)),
        image=image,
        labels=public,
    )


def spec_from_labels(labels: dict[str, str]) -> SandboxSpec:
    try:
        return structure(json.loads(labels[SPEC_LABEL]), SandboxSpec)
    except (KeyError, ValueError) as e:
        raise InternalError(f"the container's {SPEC_LABEL} label is unreadable: {e}") from None


# -- the exec stream ---------------------------------------------------------------------

_STREAMS = {1: "stdout", 2: "stderr"}


def _write_frames(buffer: bytes, sink: OutputSink) -> bytes:
    """Hand the whole frames in ``buffer`` to ``sink``; what is left of a partial one."""
    while len(buffer) >= 8:
        kind, size = struct.unpack(">BxxxL", buffer[:8])
        if len(buffer) < 8 + size:
            break
        sink.write(_STREAMS.get(kind, "stdout"), buffer[8 : 8 + size])
        buffer = buffer[8 + size :]
    return buffer


def read_frames(
    sock: socket.socket,
    sink: OutputSink,
    deadline: float | None,
    on_timeout: Callable[[], None],
    initial: bytes = b"",
) -> bool:
    """Demultiplex an attached exec stream into ``sink`` until EOF; True if it timed out.

    Frames are an 8-byte header (stream, 0, 0, 0, big-endian size) and the payload.
    ``initial`` is what was read from the stream before (with the HTTP upgrade). On
    the deadline or a cancel, ``on_timeout`` kills the command, and reading goes on
    briefly so the output produced until then is kept.
    """
    buffer = _write_frames(initial, sink)
    timed_out = False
    grace_end: float | None = None
    while True:
        now = time.monotonic()
        if not timed_out and (sink.cancelled or (deadline is not None and now >= deadline)):
            timed_out = True
            on_timeout()
            grace_end = now + 5
        if grace_end is not None and now >= grace_end:
            break
        wait = 0.05
        if deadline is not None and not timed_out:
            wait = min(wait, max(deadline - now, 0))
        ready, _, _ = select.select([sock], [], [], wait)
        if not ready:
            continue
        try:
            chunk = sock.recv(256 * 1024)
        except (ConnectionResetError, OSError):
            break
        if not chunk:
            break
        buffer = _write_frames(buffer + chunk, sink)
    return timed_out


def feed_stdin(sock: socket.socket, data: bytes | None) -> threading.Thread | None:
    """Send stdin on the attached socket, then half-close it so the command sees EOF."""
    if data is None:
        return None

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@attrs.frozen
class ExecSession:
    """A started exec, as an engine module hands it to ``run_exec``."""

    socket: socket.socket  # the attached, multiplexed stream
    pid: Callable[[], int]  # the exec's host pid (asked only to stop it)
    exit_code: Callable[[], int]  # asked once the stream has ended
    close: Callable[[], None]
    buffered: bytes = b""  # stream bytes already read along with the upgrade's headers


def run_exec(
    start: Callable[[dict[str, str]], ExecSession],
    request: ExecRequest,
    sink: OutputSink,
    view: HostView | None,
) -> ExecStatus:
    """Run one exec to its end on either engine: stream, stdin, timeout, sweep, OOM.

    ``start`` creates and starts the exec with the environment given. The engines have
    no API to stop an exec, so on timeout its processes are killed from the host: each
    exec carries a marker variable, and every process in the container that carries
    it dies, ``setsid`` escapees included. The same sweep runs when the command ends,
    so nothing it left in the background outlives it.
    """
    marker = uuid.uuid4().hex
    oom_before = view.oom_kills() if view else 0
    session = start({**request.env, sweep.MARKER: marker})
    deadline = None if request.timeout is None else time.monotonic() + request.timeout

    def stop() -> None:
        with contextlib.suppress(SandboxError):
            pid = session.pid()
            if view is not None:
                view.kill_marked(marker, also=[pid] if pid else [])

    try:
        try:
            feeder = feed_stdin(session.socket, request.stdin)
            timed_out = read_frames(session.socket, sink, deadline, stop, session.buffered)
            if feeder is not None:
                feeder.join(timeout=5)
        finally:
            session.close()
        code = session.exit_code()
    finally:
        # An exec owns its descendants, also when it failed: a stream the engine broke
        # (a restart) or an exit code it cannot report must not leave the command running.
        if view is not None:
            view.kill_marked(marker)
    code = exit_code_for_start_failure(code, sink.value("stderr") + sink.value("stdout"))
    # Exit 137 alone means "SIGKILL from somewhere"; OOM needs the cgroup's own count,
    # taken as a delta around this exec (the container's own flag is sticky, T35).
    oom_events = max(0, view.oom_kills() - oom_before) if view is not None else 0
    oom = code == 137 and not timed_out and oom_events > 0
    return ExecStatus(
        exit_code=code,
        timed_out=timed_out,
        oom_killed=oom,
        signal=code - 128 if code > 128 else None,
        oom_events=oom_events,
    )


# -- one command as the container's own process (corral.run) -----------------------------


def main_process_plan(
    spec: SandboxSpec,
    request: ExecRequest,
    labels: dict[str, str],
    *,
    url: str,
    image: str | None,
    workspace_size: int,
) -> ContainerPlan | None:
    """The container whose own process is ``request``'s command (``corral.run``), or
    None where the command must run as an exec in a sandbox made for it: with stdin
    (fed through an exec's stream), on a remote engine (whose streams corral reaches
    through the client only), or bridged (its network is made, checked and removed
    around the container by create and destroy)."""
    if request.stdin is not None or not url.startswith("unix://") or spec.network.mode != "none":
        return None
    own = attrs.evolve(
        spec,
        command=tuple(request.argv),
        env=dict(request.env),
        workdir=request.workdir or spec.workdir,
        user=request.user or spec.user,
    )
    return plan(own, labels, image=image, workspace_size=workspace_size)


class EngineWait:
    """A wait for a container's exit, asked before it starts, on a connection of its own.

    Both engines answer with the response's headers once the waiter is registered and
    send the body when the container has ended: from then on no exit can be missed,
    also when the engine removes the container at once (auto-remove), which a wait
    asked after the exit would find gone. Local engines only (a unix socket).
    """

    def __init__(self, socket_path: str, path: str, timeout: float) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(socket_path)
            self._sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n"
                "Content-Length: 0\r\n\r\n".encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = self._sock.recv(4096)
                if not chunk:
                    raise OSError("the engine closed the wait before answering")
                head += chunk
        except BaseException:
            self._sock.close()
            raise
        status, _, rest = head.partition(b"\r\n\r\n")
        if b" 200 " not in status.split(b"\r\n", 1)[0]:
            self._sock.close()
            raise InternalError(f"the engine refused the wait: {(status + rest)[:300]!r}")
        self._body = rest
        self._timeout = timeout

    def exit_code(self) -> int:
        """The container's exit status (blocks until it has ended)."""
        body = self._body
        try:
            self._sock.settimeout(self._timeout)
            while chunk := self._sock.recv(4096):  # "Connection: close": read to EOF
                body += chunk
        except OSError as e:
            raise InternalError(f"the engine did not report the command's end ({e})") from None
        finally:
            self.close()
        # The body is one JSON object, possibly in chunked encoding: the object's bytes.
        try:
            answer = json.loads(body[body.index(b"{") : body.rindex(b"}") + 1])
            return int(answer["StatusCode"])
        except (ValueError, KeyError, TypeError):
            raise InternalError(f"the engine's wait answer is unreadable: {body[:300]!r}") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


@attrs.frozen
class MainProcess:
    """A created, attached container whose own process is the command, as an engine
    module hands it to ``run_main``."""

    socket: socket.socket  # the attached, multiplexed stream
    start: Callable[[], None]
    kill: Callable[[], None]  # on timeout or cancel: the whole container
    outcome: Callable[[], tuple[int, int]]  # (exit code, OOM kills), once the stream ended
    buffered: bytes = b""  # stream bytes already read along with the upgrade's headers


def run_main(process: MainProcess, request: ExecRequest, sink: OutputSink) -> ExecStatus:
    """Start the container and follow its command to the end, as ``run_exec`` follows an
    exec: stream, timeout and OOM evidence. Killing the container on timeout ends every
    process the command started, since they all live in it."""
    process.start()
    deadline = None if request.timeout is None else time.monotonic() + request.timeout
    try:
        timed_out = read_frames(process.socket, sink, deadline, process.kill, process.buffered)
    finally:
        with contextlib.suppress(OSError):
            process.socket.close()
    code, oom_events = process.outcome()
    code = exit_code_for_start_failure(code, sink.value("stderr") + sink.value("stdout"))
    return ExecStatus(
        exit_code=code,
        timed_out=timed_out,
        # The container is this one command: its own OOM record is the command's.
        oom_killed=oom_events > 0 and code == 137 and not timed_out,
        signal=code - 128 if code > 128 else None,
        oom_events=oom_events,
    )


def release_frames(error: BaseException) -> None:
    """Clear the locals of the frames in ``error``'s chain: the engine clients leave the
    socket of a connection that failed to open unclosed there, and the error corral
    chains to it would keep it (an open file descriptor) until a garbage collection."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


def out_of_space(engine_message: str) -> str:
    """What a ResourceLimitError says when the engine's own storage is full (T83)."""
    return (
        f"no space left on the engine's storage ({engine_message}); free space there "
        "(its data root, or where its images and containers are kept) and try again"
    )


def not_running(engine_message: str) -> bool:
    """Whether a 409 says the container is not running: it never runs again (its lifetime
    ended, or it was killed from outside, and the engine is removing it), so retrying is
    pointless; other conflicts (a name still taken, a removal under way) may pass."""
    text = engine_message.lower()
    return "is not running" in text or "container state improper" in text


def exit_code_for_start_failure(code: int, output: bytes) -> int:
    """The runtime reports a missing command as 126; shells and corral say 127."""
    text = output.lower()
    if code == 126 and (b"no such file or directory" in text or b"not found" in text):
        return 127
    return code


# -- the container seen from the host ---------------------------------------------------

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
        freezer = self._file("freezer", "freezer.state")
        if freezer is not None:
            with contextlib.suppress(OSError):
                return freezer.read_text().strip() == "THAWED"
        frozen = self._file("unified", "cgroup.freeze")
        if frozen is not None:
            with contextlib.suppress(OSError):
                return frozen.read_text().strip() == "0"
        return True

    def spare_keepalive(self) -> None:
        """Take the container's init and its children (``sleep``, or the spec's
        ``timeout``) back to OOM score adjustment 0, below the execs' (the engine gives
        every process of the container sweep.EXEC_OOM_SCORE_ADJ). The init goes first,
        so that a child it forks meanwhile inherits 0. Exec processes are never its
        children (the engine's shim or conmon starts them). Without the right to
        (another user's processes), the keep-alive stays level with the execs."""
        for pid in [self.init_pid, *sweep.children(self.init_pid)]:
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/oom_score_adj").write_text("0")

    def kill_marked(self, marker: str, also: Iterable[int] = ()) -> int:
        """SIGKILL the container's processes carrying ``marker`` (an exec's), and ``also``;
        its init is spared."""
        return sweep.kill_marked(self.pids, marker, spare={self.init_pid}, also=also)

    def oom_kills(self) -> int:
        path = self._file("memory", "memory.oom_control") or self._file("unified", "memory.events")
        return read_keyed(path).get("oom_kill", 0) if path else 0

    def usage(self, memory_limit: int) -> ResourceUsage:
        memory = self._file("memory", "memory.usage_in_bytes") or self._file(
            "unified", "memory.current"
        )
        peak = self._file("memory", "memory.max_usage_in_bytes") or self._file(
            "unified", "memory.peak"
        )
        cpu_ns = self._file("cpuacct", "cpuacct.usage")
        cpu = read_int(cpu_ns) / 1e9 if cpu_ns and read_int(cpu_ns) is not None else None  # type: ignore[operator]
        if cpu is None and (stat := self._file("unified", "cpu.stat")):
            usec = read_keyed(stat).get("usage_usec")
            cpu = None if usec is None else usec / 1e6
        pids = self._file("pids", "pids.current")
        rx, tx = _net_bytes(self.init_pid)
        read, write = self._block_io()
        return ResourceUsage(
            cpu_seconds=cpu,
            memory_bytes=read_int(memory) if memory else None,
            memory_peak_bytes=read_int(peak) if peak else None,
            memory_limit_bytes=memory_limit,
            pids=read_int(pids) if pids else len(self.pids()),
            net_rx_bytes=rx,
            net_tx_bytes=tx,
            block_read_bytes=read,
            block_write_bytes=write,
            timestamp=time.time(),
        )

    def _block_io(self) -> tuple[int | None, int | None]:
        path = self._file("blkio", "blkio.throttle.io_service_bytes")
        if path is None:
            return None, None
        read = write = 0
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[1] == "Read":
                    read += int(parts[2])
                elif len(parts) == 3 and parts[1] == "Write":
                    write += int(parts[2])
        return read, write


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
