"""corral: run commands in sandboxes, one API for local processes, Docker, Podman and more."""

from __future__ import annotations  # `list` below is corral.list, not the builtin

# The errors load at once: they are small, and `except corral.X` is everywhere.
from .core.errors import (
    ArchiveError,
    BackendUnavailableError,
    CapabilityError,
    CapacityError,
    ConfigError,
    ConflictError,
    InternalError,
    NotFoundError,
    PathSecurityError,
    PluginError,
    PolicyError,
    ResourceLimitError,
    SandboxClosedError,
    SandboxError,
    TimeoutError,
)

TYPE_CHECKING = False  # typing itself costs `import corral` milliseconds
if TYPE_CHECKING:
    import builtins
    from typing import Any

    from .core.archive import ArchiveLimits
    from .core.backend import (
        Availability,
        Backend,
        BackendInfo,
        Capability,
        ExecStatus,
        NoSettings,
    )
    from .core.hookspecs import hookimpl, hookspec
    from .core.lifecycle import attach, create, gc, run, snapshots
    from .core.lifecycle import list_sandboxes as list
    from .core.output import InputFeed, OutputSink
    from .core.pool import Pool
    from .core.process import Process
    from .core.results import (
        Change,
        ExecResult,
        Health,
        NodeInfo,
        OutputChunk,
        ProcessInfo,
        ResourceUsage,
        SandboxInfo,
        SnapshotInfo,
    )
    from .core.sandbox import Sandbox, SandboxState
    from .core.settings import Settings, load_settings
    from .core.snapshot import Snapshot
    from .core.spec import (
        ExecRequest,
        Healthcheck,
        Limits,
        Mount,
        Network,
        SandboxSpec,
        Security,
        Tmpfs,
        Volume,
    )

__version__ = "0.1.0"

__all__ = [
    "ArchiveError",
    "ArchiveLimits",
    "Availability",
    "Backend",
    "BackendInfo",
    "BackendUnavailableError",
    "Capability",
    "CapabilityError",
    "CapacityError",
    "Change",
    "ConfigError",
    "ConflictError",
    "ExecRequest",
    "ExecResult",
    "ExecStatus",
    "Health",
    "Healthcheck",
    "InputFeed",
    "InternalError",
    "Limits",
    "Mount",
    "Network",
    "NoSettings",
    "NodeInfo",
    "NotFoundError",
    "OutputChunk",
    "OutputSink",
    "PathSecurityError",
    "PluginError",
    "PolicyError",
    "Pool",
    "Process",
    "ProcessInfo",
    "ResourceLimitError",
    "ResourceUsage",
    "Sandbox",
    "SandboxClosedError",
    "SandboxError",
    "SandboxInfo",
    "SandboxSpec",
    "SandboxState",
    "Security",
    "Settings",
    "Snapshot",
    "SnapshotInfo",
    "TimeoutError",
    "Tmpfs",
    "Volume",
    "attach",
    "create",
    "gc",
    "hookimpl",
    "hookspec",
    "list",
    "load_settings",
    "run",
    "snapshots",
]


# Everything else loads when first used (PEP 562): the model's attrs classes, the
# lifecycle and the plugin host take tens of milliseconds to import, which a program
# that imports corral at start-up and makes sandboxes later need not pay then, nor a
# CLI call that fails on its arguments. Name -> (module under corral.core, its name).
_LAZY: dict[str, tuple[str, str]] = {
    "ArchiveLimits": ("archive", "ArchiveLimits"),
    **{n: ("backend", n) for n in ("Availability", "Backend", "BackendInfo", "Capability")},
    **{n: ("backend", n) for n in ("ExecStatus", "NoSettings")},
    "hookimpl": ("hookspecs", "hookimpl"),
    "hookspec": ("hookspecs", "hookspec"),
    **{n: ("lifecycle", n) for n in ("attach", "create", "gc", "run", "snapshots")},
    "list": ("lifecycle", "list_sandboxes"),
    **{n: ("output", n) for n in ("InputFeed", "OutputSink")},
    "Process": ("process", "Process"),
    "Snapshot": ("snapshot", "Snapshot"),
    **{n: ("results", n) for n in ("Change", "ProcessInfo", "SnapshotInfo")},
    "Pool": ("pool", "Pool"),
    **{n: ("results", n) for n in ("ExecResult", "Health", "OutputChunk", "ResourceUsage")},
    "SandboxInfo": ("results", "SandboxInfo"),
    "NodeInfo": ("results", "NodeInfo"),
    "Sandbox": ("sandbox", "Sandbox"),
    "SandboxState": ("sandbox", "SandboxState"),
    "Settings": ("settings", "Settings"),
    "load_settings": ("settings", "load_settings"),
    **{n: ("spec", n) for n in ("ExecRequest", "Healthcheck", "Limits", "Mount", "Network")},
    **{n: ("spec", n) for n in ("SandboxSpec", "Security", "Tmpfs", "Volume")},
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module, attribute = where
    value = getattr(importlib.import_module(f".core.{module}", __name__), attribute)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> builtins.list[str]:  # `list` here is corral.list
    return sorted({*globals(), *_LAZY})
