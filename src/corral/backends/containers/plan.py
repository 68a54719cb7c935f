"""The plan: the engine-neutral container that enforces a sandbox's spec."""

from __future__ import annotations

import json
import math
import posixpath
import re
from pathlib import Path
from typing import Any

import attrs

from ...core.backend import Capability
from ...core.convert import unstructure
from ...core.errors import ConfigError
from ...core.spec import ExecRequest, Mount, SandboxSpec, Tmpfs, Volume, parse_user
from ...core.units import parse_size
from .naming import SPEC_LABEL, container_name, network_name

# Where a movable lifetime's timer folder is bound in the container, and its file.
TIMER_TARGET = "/.corral-lifetime"
TIMER_FILE = TIMER_TARGET + "/extra"

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
    | _C.INIT_COMMAND | _C.USER | _C.HEALTHCHECK | _C.PAUSE | _C.TTY | _C.PORTS
    | _C.SNAPSHOTS
)  # fmt: skip
# What holds only with an engine on this host: a command's pid is then one of this
# host's, to signal (PROCESSES), and a host folder can carry a moved lifetime (EXTEND).
LOCAL_CAPABILITIES = _C.PROCESSES | _C.EXTEND
# A sandbox's changes are walked from the host, out of its reach (snapshots.py).
LOCAL_CAPABILITIES |= _C.CHANGES


@attrs.frozen
class TmpfsVolume:
    """A size-capped, memory-backed volume: reachable by the archive API, unlike --tmpfs."""

    target: str
    size: int
    mode: int
    uid: int
    gid: int
    exec: bool
    # Whether the image's files at the target are copied in (the workspace and /tmp,
    # as a volume would); a tmpfs the spec asks for starts empty, with its own mode.
    copy_up: bool = True

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
    security_opt: list[str]  # Docker's form; seccomp's profile inline
    seccomp: str | None  # None (the engine's default), "unconfined" or a profile's path
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
    # Container ports published on the host's 127.0.0.1, each on a port the engine picks.
    ports: tuple[int, ...] = ()
    # The host folder of a movable lifetime (``lifetimes.py``), bound read-only at
    # ``TIMER_TARGET`` for PID 1 to read; None: the lifetime is fixed.
    lifetime_folder: str | None = None


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
    spec: SandboxSpec,
    labels: dict[str, str],
    *,
    image: str | None,
    workspace_size: int,
    lifetime_folder: str | None = None,
) -> ContainerPlan:
    """The container that enforces ``spec``; with ``lifetime_folder`` (a sandbox without
    a command of its own), one whose lifetime ``extend`` can move."""
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
    # The workspace and /tmp, unless the spec mounts something there itself. One at or
    # below a bind mount or volume of the spec's would hide what it mounts (the engines
    # refuse two mounts at one target outright): the spec's own mount is the folder
    # then, as on the local backend.
    given = [m.target for m in spec.mounts if isinstance(m, (Mount, Volume))]
    own_tmpfs = {m.target for m in spec.mounts if isinstance(m, Tmpfs)}
    defaults = [TmpfsVolume(spec.workdir, workspace_size, 0o755, ids[0], ids[1], True)]
    if spec.workdir != "/tmp":
        defaults.append(TmpfsVolume("/tmp", parse_size("64MiB"), 0o1777, ids[0], ids[1], False))
    tmpfs = [
        t
        for t in defaults
        if t.target not in own_tmpfs and not any(_at_or_below(t.target, g) for g in given)
    ]
    tmpfs += [
        TmpfsVolume(m.target, m.size, m.mode, ids[0], ids[1], m.exec, copy_up=False)
        for m in spec.mounts
        if isinstance(m, Tmpfs)
    ]
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
        command=(
            movable_init_command(lim.lifetime)
            if lifetime_folder is not None and spec.command is None
            else init_command(spec.command, lim.lifetime)
        ),
        user=numeric_user(spec.user),
        workdir=spec.workdir,
        env=env,
        labels={**labels, SPEC_LABEL: json.dumps(unstructure(spec), separators=(",", ":"))},
        read_only=sec.read_only_root,
        cap_add=list(sec.cap_add),
        security_opt=security_opt,
        seccomp=(
            sec.seccomp
            if sec.seccomp in (None, SECCOMP_UNCONFINED)
            else str(Path(sec.seccomp).resolve())
        ),
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
        ports=tuple(spec.ports),
        lifetime_folder=lifetime_folder if spec.command is None else None,
    )


def _at_or_below(path: str, folder: str) -> bool:
    path, folder = posixpath.normpath(path), posixpath.normpath(folder)
    return path == folder or path.startswith(folder.rstrip("/") + "/")


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


def movable_init_command(lifetime: float) -> list[str]:
    """PID 1 of a sandbox whose lifetime ``extend`` can move: it sleeps the lifetime,
    then as long again as the timer file (the host's, bound read-only) says the end was
    moved by, read again after each sleep, and ends when it was moved no further. Shell
    builtins and ``sleep`` only (no clock needed: the host writes seconds past the
    label's end). An unreadable file ends it, as a missing host folder should. The
    image needs ``sh`` then (a sandbox with a command of its own does not): without
    one, the sandbox ends as it starts, as one without ``sleep`` always did."""
    loop = (
        'sleep "$1"; slept=0; '
        f'while read -r extra < "{TIMER_FILE}" && [ "$extra" -gt "$slept" ]; '
        'do sleep "$((extra - slept))"; slept=$extra; done'
    )
    return ["sh", "-c", loop, "corral-lifetime", str(math.ceil(lifetime))]


def main_process_plan(
    spec: SandboxSpec,
    request: ExecRequest,
    labels: dict[str, str],
    *,
    local: bool,
    image: str | None,
    workspace_size: int,
) -> ContainerPlan | None:
    """The container whose own process is ``request``'s command (``corral.run``), or
    None where the command must run as an exec in a sandbox made for it: with stdin
    (fed through an exec's stream), on a remote engine (whose streams corral reaches
    through the client only), or bridged (its network is made, checked and removed
    around the container by create and destroy)."""
    if request.stdin is not None or not local or spec.network.mode != "none":
        return None
    own = attrs.evolve(
        spec,
        command=tuple(request.argv),
        env=dict(request.env),
        workdir=request.workdir or spec.workdir,
        user=request.user or spec.user,
    )
    return plan(own, labels, image=image, workspace_size=workspace_size)


def reaper_command(command: list[str]) -> list[str]:
    """``command`` under a shell as PID 1, for an engine without an init binary: the
    shell reaps every orphan while it waits (wait(2) takes any child), passes the
    command's status on, and ends with it."""
    return ["sh", "-c", '"$@" & wait $!', "corral-init", *command]


def numeric_user(user: str) -> str:
    """``user`` as the engines should read it: a lone uid (``"4242"``) means that uid's
    own group in corral (``uid_gid``), where the engines would give it group 0, root's."""
    ids = parse_user(user) if user else None
    return user if ids is None else f"{ids[0]}:{ids[1]}"
