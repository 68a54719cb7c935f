"""The options of create and exec, declared once.

Each option is a record: its keyword, the type users see, where its value lands in the
spec or the request, and how the command line spells it. ``corral.create``,
``corral.run``, ``corral.Pool``, ``corral.aio``, ``Sandbox.exec`` and ``stream`` keep
explicit, typed signatures (what an IDE shows); ``tests/unit/test_options.py`` proves
each matches this table, the command line is built from it, and so is the spec layer
that keywords make (``keyword_layer``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypedDict

import attrs

from .convert import unstructure

__all__ = [
    "CREATE",
    "EXEC",
    "WATCH",
    "Flag",
    "Option",
    "SandboxOptions",
    "keyword_layer",
    "names",
]


@attrs.frozen
class Flag:
    """How the command line spells an option.

    ``kind``: ``value`` (one string, checked by the spec), ``int`` and ``float``
    (converted by the parser), ``list`` (repeatable), ``pairs`` (repeatable ``K=V``,
    made a mapping), ``switch`` (present or not).
    """

    names: tuple[str, ...]
    kind: Literal["value", "int", "float", "list", "pairs", "switch"] = "value"
    metavar: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        """The attribute argparse stores it in."""
        long = next(n for n in self.names if n.startswith("--"))
        return long[2:].replace("-", "_")


def _as_data(value: Any) -> Any:
    """Model objects given as keywords become plain data, so layers can merge."""
    return unstructure(value) if attrs.has(type(value)) else value


def _mounts_data(value: Any) -> Any:
    # A lone string is not iterated into characters: the spec refuses it whole.
    return [_as_data(m) for m in value] if isinstance(value, (list, tuple)) else value


def _network_data(value: Any) -> Any:
    return {"mode": value} if isinstance(value, str) else _as_data(value)


@attrs.frozen
class Option:
    """One keyword option.

    Attributes:
        name: the keyword.
        annotation: its type, exactly as the signatures write it.
        help: one line for the command line's help.
        path: where the value lands, in the spec (create) or the request (exec);
            empty for a way to watch or stop a command (``WATCH``).
        to_data: the keyword's value as spec data (create's options).
        flag: the command line's spelling, if it has one.
    """

    name: str
    annotation: str
    help: str
    path: tuple[str, ...] = ()
    to_data: Callable[[Any], Any] = _as_data
    flag: Flag | None = None


def _limit(name: str, annotation: str, help: str, flag: Flag | None = None) -> Option:
    return Option(name, annotation, help, ("limits", name), flag=flag)


def _flag(*names: str, **kwargs: Any) -> Flag:
    return Flag(names, **kwargs)


# create's options (``run`` and the pool take them too); ``image`` is create's first
# positional parameter, the others are keyword-only.
# What a sandbox and an exec both take, the same way.
_SHARED = (
    Option(
        "env",
        "Mapping[str, str] | None",
        "set a variable (repeatable)",
        ("env",),
        flag=_flag("--env", "-e", kind="pairs", metavar="K=V"),
    ),
    Option(
        "workdir",
        "str | None",
        "folder to run in",
        ("workdir",),
        flag=_flag("--workdir", "-w", metavar="DIR"),
    ),
    Option(
        "user",
        "str | None",
        "user to run as",
        ("user",),
        flag=_flag("--user", "-u", metavar="UID[:GID]"),
    ),
)

CREATE: tuple[Option, ...] = (
    Option(
        "image",
        "str | None",
        "image to start from (container backends)",
        ("image",),
        flag=_flag("--image"),
    ),
    Option("command", "Sequence[str] | None", "the sandbox's own command", ("command",)),
    *_SHARED,
    Option(
        "mounts",
        "Sequence[Any] | None",
        "bind a host folder; read-only unless :rw, which needs --allow-unsafe "
        "unbounded_rw_mounts (repeatable)",
        ("mounts",),
        _mounts_data,
        _flag("--mount", kind="list", metavar="SRC:DST[:ro|rw]"),
    ),
    _limit(
        "memory",
        "int | str | None",
        "memory limit (512MiB, 1g)",
        _flag("--memory", "-m", metavar="SIZE"),
    ),
    _limit("cpus", "float | None", "CPU limit, in CPUs (0.5, 2)", _flag("--cpus", kind="float")),
    _limit("pids", "int | None", "limit on the number of processes", _flag("--pids", kind="int")),
    _limit(
        "nofile", "int | None", "limit on open files per process", _flag("--nofile", kind="int")
    ),
    _limit("nproc", "int | None", "limit on processes per user", _flag("--nproc", kind="int")),
    _limit(
        "cputime",
        "float | str | None",
        "CPU time limit per process (seconds, or 30s, 5m)",
        _flag("--cputime", metavar="T"),
    ),
    _limit(
        "file_size",
        "int | str | None",
        "largest file a process may write (1g)",
        _flag("--file-size", metavar="SIZE"),
    ),
    _limit(
        "disk",
        "int | str | None",
        "disk space of the sandbox (1g)",
        _flag("--disk", metavar="SIZE"),
    ),
    _limit(
        "lifetime",
        "float | str | None",
        "remove the sandbox after T at the latest",
        _flag("--lifetime", metavar="T"),
    ),
    Option(
        "network",
        "str | None",
        "network (default: none)",
        ("network",),
        _network_data,
        _flag("--network", choices=("none", "bridge")),
    ),
    Option(
        "security",
        "Any",
        "allow one loosening by name, as sandbox.security.allow_unsafe does (repeatable)",
        ("security",),
        flag=_flag("--allow-unsafe", kind="list", metavar="NAME"),
    ),
    Option(
        "labels",
        "Mapping[str, str] | None",
        "label the sandbox (repeatable)",
        ("labels",),
        flag=_flag("--label", kind="pairs", metavar="K=V"),
    ),
    Option(
        "healthcheck", "Any", "a command that says whether the sandbox is healthy", ("healthcheck",)
    ),
    Option(
        "ports",
        "Sequence[int] | None",
        "publish a port of the sandbox on the host's loopback (needs --network bridge; repeatable)",
        ("ports",),
        flag=_flag("--publish", "-p", kind="list", metavar="PORT"),
    ),
    Option(
        "auto_resume",
        "bool | None",
        "resume a paused sandbox when a call needs it running, instead of refusing",
        ("auto_resume",),
        flag=_flag("--auto-resume", kind="switch"),
    ),
)

# exec's options: the fields of the ExecRequest it makes. ``run`` takes those that
# create does not (its env, workdir and user are the sandbox's).
EXEC: tuple[Option, ...] = (
    Option(
        "timeout",
        "float | str | None",
        "stop the command after T (seconds, or 30s, 5m); exit 124",
        ("timeout",),
        flag=_flag("--timeout", metavar="T"),
    ),
    *_SHARED,
    Option(
        "stdin",
        "bytes | str | None",
        "send our standard input to the command (read to its end first)",
        ("stdin",),
        flag=_flag("--interactive", "-i", kind="switch"),
    ),
    Option(
        "max_output",
        "int | str | None",
        "cap on each output stream; past it, output is dropped (4MiB)",
        ("max_output",),
        flag=_flag("--max-output", metavar="SIZE"),
    ),
    Option(
        "idle_timeout",
        "float | str | None",
        "stop the command once it printed nothing for T; exit 124",
        ("idle_timeout",),
        flag=_flag("--idle-timeout", metavar="T"),
    ),
)

# How a caller watches or stops a command it waits for (``exec`` and ``run``; a stream
# yields its chunks, and asyncio cancels a task instead).
WATCH: tuple[Option, ...] = (
    Option(
        "on_chunk",
        "Callable[[OutputChunk], None] | None",
        "called with each chunk of output as it comes",
    ),
    Option("cancel", "threading.Event | None", "set to stop the command, as a timeout would"),
)


_CREATE_BY_NAME = {option.name: option for option in CREATE}


def names(options: Sequence[Option]) -> tuple[str, ...]:
    """The keywords of ``options``, in order."""
    return tuple(option.name for option in options)


def keyword_layer(keywords: Mapping[str, Any]) -> dict[str, Any]:
    """The spec data that create's keywords give (None: not given), nested by path. A
    keyword not in the table passes through, for the spec to refuse by name."""
    layer: dict[str, Any] = {}
    for name, value in keywords.items():
        option = _CREATE_BY_NAME.get(name)
        if value is None:
            continue
        if option is None:
            layer[name] = _as_data(value)
            continue
        target = layer
        for part in option.path[:-1]:
            target = target.setdefault(part, {})
        target[option.path[-1]] = option.to_data(value)
    return layer


class SandboxOptions(TypedDict, total=False):
    """create's keyword-only options, for ``**options: Unpack[SandboxOptions]`` where a
    function passes them on (``corral.run``, ``corral.Pool``, ``corral.aio``)."""

    command: Sequence[str] | None
    env: Mapping[str, str] | None
    workdir: str | None
    user: str | None
    mounts: Sequence[Any] | None
    memory: int | str | None
    cpus: float | None
    pids: int | None
    nofile: int | None
    nproc: int | None
    cputime: float | str | None
    file_size: int | str | None
    disk: int | str | None
    lifetime: float | str | None
    network: str | None
    security: Any
    labels: Mapping[str, str] | None
    healthcheck: Any
    ports: Sequence[int] | None
    auto_resume: bool | None
