"""What a sandbox is asked to be: frozen attrs classes, validated on construction.

Every validator raises ConfigError naming the field; the converter in ``convert.py``
puts the parent path in front (``sandbox.limits.memory``).
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, TypeVar, Union, overload

import attrs

from .arglimits import check_command_size, check_string
from .errors import ConfigError
from .output import InputFeed
from .units import parse_duration, parse_size

__all__ = [
    "UNSAFE_OPTIONS",
    "ExecRequest",
    "Healthcheck",
    "Limits",
    "Mount",
    "MountLike",
    "Network",
    "SandboxSpec",
    "Security",
    "Tmpfs",
    "Volume",
    "parse_user",
]

# Loosenings that are refused unless named in ``security.allow_unsafe``.
UNSAFE_OPTIONS = {
    "cap_add": "adds Linux capabilities",
    "read_only_root": "makes the root filesystem writable",
    "no_new_privileges": "lets setuid programs gain privileges",
    "seccomp": "turns the seccomp filter off or replaces it with a profile of its own",
    "apparmor": "turns the AppArmor profile off",
    "selinux": "turns SELinux labelling off or runs as a super-privileged type (spc_t)",
    "isolate": "runs the command without any isolation",
    "sensitive_mounts": "mounts a sensitive host path or an engine socket",
    "unbounded_rw_mounts": "binds a host folder read-write, whose writes go to the host's "
    "disk with no cap",
}
# Destinations that belong to the kernel or the runtime, never to a mount.
_PSEUDO_ROOTS = ("/proc", "/sys", "/dev")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_T = TypeVar("_T")


# -- field helpers -------------------------------------------------------------------


def _check(ok: bool, field: str, reason: str) -> None:
    if not ok:
        raise ConfigError(field, reason)


def _converted(parse: Callable[[Any, str], Any]) -> attrs.Converter[Any, Any]:
    """An attrs converter that knows its field's name, for errors that name it.

    mypy's attrs plugin reads only named functions, types and lambdas as converters, so
    each field that uses one in the class body carries ``type: ignore[misc]``; its
    ``__init__`` parameter is then Any, which is right: the converter takes anything.
    """
    return attrs.Converter(lambda value, field: parse(value, field.name), takes_field=True)


def _parse(fn: Callable[[Any], _T], value: Any, name: str) -> _T:
    try:
        return fn(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(name, str(e)) from None


def size_field(default: int | str | None, minimum: int = 1, maximum: int | None = None) -> Any:
    def parse(value: Any, name: str) -> int | None:
        if value is None:
            _check(default is None, name, "must be set")
            return None
        size = _parse(parse_size, value, name)
        _check(size >= minimum, name, f"{value!r} is below the minimum of {minimum} bytes")
        _check(maximum is None or size <= maximum, name, f"{value!r} is above {maximum} bytes")
        return size

    return attrs.field(default=default, converter=_converted(parse))


def duration_field(default: float | str | None, maximum: float | None = None) -> Any:
    def parse(value: Any, name: str) -> float | None:
        if value is None:
            _check(default is None, name, "must be set")
            return None
        seconds = _parse(parse_duration, value, name)
        _check(seconds > 0, name, f"{value!r} must be more than zero")
        _check(maximum is None or seconds <= maximum, name, f"{value!r} is above {maximum} s")
        return seconds

    return attrs.field(default=default, converter=_converted(parse))


def count_field(default: int | None, maximum: int) -> Any:
    def parse(value: Any, name: str) -> int | None:
        if value is None:
            _check(default is None, name, "must be set")
            return None
        if type(value) is not int:
            raise ConfigError(name, f"{value!r} is not a whole number")
        _check(1 <= value <= maximum, name, f"{value!r} is outside 1..{maximum}")
        return value

    return attrs.field(default=default, converter=_converted(parse))


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(name, f"{value!r} is not a string")
    _check("\0" not in value, name, "contains a NUL byte")
    return value


def str_field(default: str | None = None, *, required: bool = False) -> Any:
    """A string field; optional (None allowed) unless ``required``."""
    check = _converted(lambda v, n: None if v is None and not required else _str(v, n))
    if required:
        return attrs.field(converter=check)
    return attrs.field(default=default, converter=check)


def _strings(value: Any, name: str) -> tuple[str, ...]:
    _check(
        isinstance(value, (list, tuple)),
        name,
        f"{value!r} is not a list of strings (a single string is not accepted here)",
    )
    for i, item in enumerate(value):
        _str(item, f"{name}[{i}]")
    return tuple(value)


def strings_field(**kwargs: Any) -> Any:
    return attrs.field(factory=tuple, converter=_converted(_strings), **kwargs)


def argv(value: Any, name: str) -> tuple[str, ...]:
    """A command as an argv list: never a string, never empty, no NUL bytes."""
    if isinstance(value, (str, bytes)):
        raise ConfigError(
            name,
            "a command must be a list of arguments, not a string; there is no implicit "
            "shell (use ['sh', '-c', script] to run a script)",
        )
    items = _strings(value, name)
    _check(len(items) > 0, name, "the command is empty")
    for i, item in enumerate(items):
        check_string(item, f"{name}[{i}]")
    return items


def _optional_argv(value: Any, name: str) -> tuple[str, ...] | None:
    return None if value is None else argv(value, name)


def absolute_path(value: Any, name: str) -> str:
    """An absolute, normalised POSIX path with no ``..`` and no NUL."""
    path = _str(value, name)
    _check(path.startswith("/"), name, f"{path!r} is not an absolute path")
    _check(".." not in path.split("/"), name, f"{path!r} contains '..'")
    return posixpath.normpath(path) if path != "/" else path


def _workdir(value: Any, name: str) -> str:
    path = absolute_path(value, name)
    _check(not _under(path, _PSEUDO_ROOTS), name, f"{path!r} is inside a kernel filesystem")
    return path


def _workspace(value: Any, name: str) -> str:
    """A sandbox's workdir: its workspace is mounted there, which '/' cannot be."""
    path = _workdir(value, name)
    _check(path != "/", name, "'/' cannot be the workspace; choose a folder (/workspace)")
    return path


def _mount_target(value: Any, name: str) -> str:
    path = _workdir(value, name)
    _check(path != "/", name, "a mount cannot cover '/'")
    _check(not any(c in path for c in ":,"), name, f"{path!r} contains ':' or ','")
    return path


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


def env_map(value: Any, name: str) -> dict[str, str]:
    """Environment variables: valid names, string values, no NUL bytes."""
    _check(isinstance(value, Mapping), name, f"{value!r} is not a mapping of names to values")
    for key, val in value.items():
        _check(
            isinstance(key, str) and bool(_ENV_NAME.match(key)),
            name,
            f"{key!r} is not a valid variable name (letters, digits and '_', not first a digit)",
        )
        _str(val, f"{name}.{key}")
        check_string(f"{key}={val}", f"{name}.{key}")
    return dict(value)


def _labels(value: Any, name: str) -> dict[str, str]:
    _check(isinstance(value, Mapping), name, f"{value!r} is not a mapping")
    for key, val in value.items():
        _str(key, name)
        _check(not key.startswith("corral."), name, f"{key!r}: the 'corral.' prefix is reserved")
        _str(val, f"{name}.{key}")
    return dict(value)


_USER = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.-]*)(?::([A-Za-z0-9_][A-Za-z0-9_.-]*))?")
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to the kernel


@overload
def parse_user(
    value: Any, field: str = "user", *, numbers_for: None = None
) -> tuple[int, int] | None: ...
@overload
def parse_user(value: Any, field: str = "user", *, numbers_for: str) -> tuple[int, int]: ...
def parse_user(
    value: Any, field: str = "user", *, numbers_for: str | None = None
) -> tuple[int, int] | None:
    """Check a ``user`` value (``uid``, ``uid:gid``, ``name`` or ``name:group``).

    Args:
        value: the value as given.
        field: the field it came from, named by the error.
        numbers_for: who needs numeric ids (``"the local backend"``); names are
            then refused.

    Returns:
        ``(uid, gid)`` when written as numbers (``uid`` alone: its group is the same
        number), else None.

    Raises:
        ConfigError: not a user, or names where ``numbers_for`` needs numbers.
    """
    match = _USER.fullmatch(_str(value, field))
    if match is None:
        raise ConfigError(field, f"{value!r} is not 'user' or 'user:group'")
    uid, gid = match.group(1), match.group(2) or match.group(1)
    if not (uid.isdigit() and gid.isdigit()):
        _check(numbers_for is None, field, f"{value!r}: {numbers_for} needs 'uid:gid' in numbers")
        return None
    for number in (uid, gid):
        _check(int(number) <= _MAX_ID, field, f"{value!r}: {number} is above {_MAX_ID}")
    return int(uid), int(gid)


def _user(value: Any, name: str) -> str:
    parse_user(value, name)
    return _str(value, name)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, f"{value!r} is not true or false")
    return value


def bool_field(default: bool) -> Any:
    return attrs.field(default=default, converter=_converted(_bool))


def _mode(value: Any, name: str) -> int:
    if type(value) is not int or not 0 <= value <= 0o1777:
        raise ConfigError(name, f"{value!r} is not a mode")
    return value


def _cpus(value: Any, name: str) -> float | None:
    if value is None:
        return None
    ok = type(value) in (int, float) and math.isfinite(value) and 0.01 <= value <= 1024
    _check(ok, name, f"{value!r} is not a number of CPUs in 0.01..1024")
    return float(value)


def _stdin(value: Any, name: str) -> bytes | None:
    if isinstance(value, str):
        return value.encode()
    if value is not None and not isinstance(value, bytes):
        raise ConfigError(name, f"{type(value).__name__} is not bytes")
    return value


def _one_of(choices: tuple[str | None, ...]) -> Callable[[Any, str], Any]:
    def parse(value: Any, name: str) -> Any:
        names = ", ".join(repr(c) if c is None else c for c in choices)
        _check(value in choices, name, f"{value!r} is not one of: {names}")
        return value

    return parse


def choice_field(default: str | None, choices: tuple[str | None, ...]) -> Any:
    return attrs.field(default=default, converter=_converted(_one_of(choices)))


# -- the model -----------------------------------------------------------------------


@attrs.frozen
class Mount:
    """A host folder or file bound into the sandbox; read-only unless ``read_only=False``."""

    kind: ClassVar[str] = "bind"
    source: str = str_field(required=True)
    target: str = attrs.field(converter=_converted(_mount_target))  # type: ignore[misc]
    read_only: bool = bool_field(True)

    @classmethod
    def parse(cls, text: str) -> Mount:
        """``SRC:DST[:ro|rw]``, as the command line and config files write a bind mount."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise ConfigError("mounts", f"{text!r} is not SRC:DST[:ro|rw]")
        return cls(parts[0], parts[1], read_only=len(parts) == 2 or parts[2] == "ro")


@attrs.frozen
class Tmpfs:
    """A memory-backed folder with a size cap; never executable unless ``exec=True``."""

    kind: ClassVar[str] = "tmpfs"
    target: str = attrs.field(converter=_converted(_mount_target))  # type: ignore[misc]
    size: int = size_field("64MiB", minimum=4096)
    mode: int = attrs.field(default=0o1777, converter=_converted(_mode))  # type: ignore[misc]
    exec: bool = bool_field(False)


@attrs.frozen
class Volume:
    """A named volume that the backend owns, read-write unless ``read_only=True``."""

    kind: ClassVar[str] = "volume"
    name: str = str_field(required=True)
    target: str = attrs.field(converter=_converted(_mount_target))  # type: ignore[misc]
    read_only: bool = bool_field(False)

    @name.validator
    def _name(self, attribute: Any, value: str) -> None:
        _check(
            bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value)),
            "name",
            f"{value!r} is not a volume name",
        )


MountLike = Union[Mount, Tmpfs, Volume]  # noqa: UP007 - a runtime alias; | needs 3.10 types


def _mount_from_table(table: Mapping[str, Any], name: str) -> MountLike:
    """A mount written as a table, ``{"type": "tmpfs", "target": "/cache"}``; bind by default."""
    kinds = {cls.kind: cls for cls in (Mount, Tmpfs, Volume)}
    fields = dict(table)
    kind = fields.pop("type", "bind")
    _check(kind in kinds, f"{name}.type", f"{kind!r} is not one of: {', '.join(kinds)}")
    cls = kinds[kind]
    known = {f.name for f in attrs.fields(cls)}
    for key in fields:
        _check(key in known, f"{name}.{key}", "unknown setting (check the spelling)")
    try:
        return cls(**fields)
    except ConfigError as e:
        raise e.prefixed(name) from None
    except TypeError as e:
        raise ConfigError(name, f"missing a required setting ({e})") from None


def _mounts(value: Any, name: str) -> tuple[MountLike, ...]:
    _check(isinstance(value, (list, tuple)), name, f"{value!r} is not a list of mounts")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = Mount.parse(item)
        elif isinstance(item, Mapping):
            item = _mount_from_table(item, f"{name}[{i}]")
        _check(
            isinstance(item, (Mount, Tmpfs, Volume)),
            f"{name}[{i}]",
            f"{item!r} is not a Mount, Tmpfs or Volume",
        )
        out.append(item)
    targets = [m.target for m in out]
    for t in targets:
        _check(targets.count(t) == 1, name, f"two mounts share the target {t!r}")
    return tuple(out)


def _ports(value: Any, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (int, str)):
        value = [value]
    ports: list[int] = []
    for item in value:
        try:
            port = int(item)
        except (TypeError, ValueError):
            raise ConfigError(name, f"{item!r} is not a port number") from None
        _check(
            1 <= port <= 65535 and not isinstance(item, bool),
            name,
            f"{item!r} is not a port (1-65535)",
        )
        _check(port not in ports, name, f"port {port} is listed twice")
        ports.append(port)
    return tuple(ports)


@attrs.frozen
class Limits:
    """Resource limits. Every sandbox has them; the defaults are deliberately small."""

    memory: int = size_field("512MiB", minimum=6 * 1024**2)
    cpus: float | None = attrs.field(default=None, converter=_converted(_cpus))  # type: ignore[misc]
    pids: int = count_field(256, maximum=1_000_000)
    nofile: int = count_field(1024, maximum=1_048_576)
    nproc: int = count_field(512, maximum=1_000_000)
    cputime: float | None = duration_field(None)
    file_size: int | None = size_field(None)
    disk: int | None = size_field(None, minimum=1024**2)
    lifetime: float = duration_field("1h", maximum=30 * 86400)


@attrs.frozen
class Network:
    """``none`` (the default: loopback only) or ``bridge`` (outbound through the engine,
    on a network of the sandbox's own that no other sandbox reaches)."""

    mode: Literal["none", "bridge"] = attrs.field(
        default="none",
        converter=_converted(_one_of(("none", "bridge"))),  # type: ignore[misc]
    )
    dns: tuple[str, ...] = strings_field()
    http_proxy: str | None = str_field()
    https_proxy: str | None = str_field()
    no_proxy: str | None = str_field()

    def proxy_env(self) -> dict[str, str]:
        """The proxy settings as the variables programs read, in both spellings."""
        env = {}
        for var, value in (
            ("http_proxy", self.http_proxy),
            ("https_proxy", self.https_proxy),
            ("no_proxy", self.no_proxy),
        ):
            if value is not None:
                env[var] = env[var.upper()] = value
        return env


@attrs.frozen
class Security:
    """Hardening. Loosening a setting marked unsafe needs its name in ``allow_unsafe``."""

    cap_add: tuple[str, ...] = strings_field()
    read_only_root: bool = bool_field(True)
    no_new_privileges: bool = bool_field(True)
    seccomp: str | None = str_field()
    apparmor: str | None = str_field()
    selinux_label: str | None = str_field()
    masked_paths: tuple[str, ...] = strings_field()
    isolate: bool = bool_field(True)
    allow_unsafe: tuple[str, ...] = strings_field()

    @allow_unsafe.validator
    def _allow(self, attribute: Any, value: tuple[str, ...]) -> None:
        for item in value:
            _check(
                item in UNSAFE_OPTIONS,
                "allow_unsafe",
                f"{item!r} is not an unsafe option (choose from: {', '.join(UNSAFE_OPTIONS)})",
            )

    def loosened(self) -> list[str]:
        """The unsafe options this spec turns on, by name."""
        found = []
        if self.cap_add:
            found.append("cap_add")
        if self.isolate and not self.read_only_root:  # without isolation there is no root
            found.append("read_only_root")
        if not self.no_new_privileges:
            found.append("no_new_privileges")
        # A profile of the caller's own replaces the engine's default wholesale, and
        # corral cannot tell a stricter one from {"defaultAction": "SCMP_ACT_ALLOW"}.
        if self.seccomp is not None:
            found.append("seccomp")
        if self.apparmor == "unconfined":
            found.append("apparmor")
        if self.selinux_label == "disable" or "spc_t" in (self.selinux_label or ""):
            found.append("selinux")
        if not self.isolate:
            found.append("isolate")
        return found


@attrs.frozen
class Healthcheck:
    """A command run periodically inside the sandbox; exit 0 means healthy."""

    test: tuple[str, ...] = attrs.field(converter=_converted(argv))  # type: ignore[misc]
    interval: float = duration_field("30s")
    timeout: float = duration_field("30s")
    retries: int = count_field(3, maximum=1000)
    start_period: float = attrs.field(
        default=0.0,
        converter=_converted(lambda v, n: 0.0 if v in (0, "0") else _parse(parse_duration, v, n)),  # type: ignore[misc]
    )


@attrs.frozen
class SandboxSpec:
    """Everything a backend needs to make one sandbox. Built with ``corral.create(...)``."""

    image: str | None = str_field()
    command: tuple[str, ...] | None = attrs.field(
        default=None,
        converter=_converted(_optional_argv),  # type: ignore[misc]
    )
    env: dict[str, str] = attrs.field(factory=dict, converter=_converted(env_map))  # type: ignore[misc]
    workdir: str = attrs.field(default="/workspace", converter=_converted(_workspace))  # type: ignore[misc]
    user: str = attrs.field(default="1000:1000", converter=_converted(_user))  # type: ignore[misc]
    mounts: tuple[MountLike, ...] = attrs.field(factory=tuple, converter=_converted(_mounts))  # type: ignore[misc]
    limits: Limits = attrs.field(factory=Limits)
    network: Network = attrs.field(factory=Network)
    security: Security = attrs.field(factory=Security)
    labels: dict[str, str] = attrs.field(factory=dict, converter=_converted(_labels))  # type: ignore[misc]
    healthcheck: Healthcheck | None = None
    #: Ports of the sandbox published on the host's loopback (a bridged network only);
    #: ``Sandbox.port(p)`` says where.
    ports: tuple[int, ...] = attrs.field(factory=tuple, converter=_converted(_ports))  # type: ignore[misc]
    #: A call that needs the sandbox running resumes a paused one, instead of raising.
    auto_resume: bool = bool_field(False)

    def __attrs_post_init__(self) -> None:
        check_command_size(self.command or (), self.env, "command", "env")
        _check(
            not self.ports or self.network.mode != "none",
            "ports",
            "publishing ports needs a network: set network = 'bridge' (a sandbox with "
            "network 'none' has loopback only)",
        )

    def uid_gid(self) -> tuple[int, int] | None:
        """The numeric user and group, when ``user`` is written as numbers."""
        return parse_user(self.user)


@attrs.frozen
class ExecRequest:
    """One command to run in a sandbox, as the core hands it to ``corral_exec``."""

    argv: tuple[str, ...] = attrs.field(converter=_converted(argv))  # type: ignore[misc]
    env: dict[str, str] = attrs.field(factory=dict, converter=_converted(env_map))  # type: ignore[misc]
    workdir: str | None = attrs.field(
        default=None,
        converter=_converted(lambda v, n: None if v is None else _workdir(v, n)),  # type: ignore[misc]
    )
    user: str | None = attrs.field(
        default=None,
        converter=_converted(lambda v, n: None if v is None else _user(v, n)),  # type: ignore[misc]
    )
    stdin: bytes | None = attrs.field(default=None, converter=_converted(_stdin))  # type: ignore[misc]
    timeout: float | None = duration_field(None, maximum=30 * 86400)
    max_output: int = size_field("4MiB", minimum=0)
    #: Stop the command once it wrote nothing for this long. The core enforces it
    #: (through the sink, on every backend); a backend need not.
    idle_timeout: float | None = duration_field(None, maximum=30 * 86400)
    #: Run the command on a pseudo-terminal (Capability.TTY): stdout and stderr are one
    #: stream, reported as stdout.
    tty: bool = bool_field(False)
    #: The caller's name for this exec, for ``exec_signal`` and ``exec_resize`` while it
    #: runs (a spawned process's id); backends may use it as the exec's marker.
    name: str | None = str_field()
    #: Standard input as it comes (a spawned process's; instead of ``stdin``). Never
    #: shipped anywhere: the keeper that runs the exec holds it.
    input: InputFeed | None = attrs.field(default=None, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        check_command_size(self.argv, self.env, "argv", "env")
