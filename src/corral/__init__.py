"""corral: run commands in sandboxes, one API for local processes, Docker, Podman and more."""

from __future__ import annotations  # `list` below is corral.list, not the builtin

from typing import TYPE_CHECKING, Any

from .core.archive import ArchiveLimits
from .core.backend import Availability, Backend, BackendInfo, Capability, ExecStatus, NoSettings
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
from .core.lifecycle import attach, create, gc, run
from .core.lifecycle import list_sandboxes as list
from .core.output import OutputSink
from .core.pool import Pool
from .core.results import ExecResult, Health, OutputChunk, ResourceUsage, SandboxInfo
from .core.sandbox import Sandbox
from .core.settings import Settings, load_settings
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

if TYPE_CHECKING:
    from .core.hookspecs import hookimpl, hookspec

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
    "ConfigError",
    "ConflictError",
    "ExecRequest",
    "ExecResult",
    "ExecStatus",
    "Health",
    "Healthcheck",
    "InternalError",
    "Limits",
    "Mount",
    "Network",
    "NoSettings",
    "NotFoundError",
    "OutputChunk",
    "OutputSink",
    "PathSecurityError",
    "PluginError",
    "PolicyError",
    "Pool",
    "ResourceLimitError",
    "ResourceUsage",
    "Sandbox",
    "SandboxClosedError",
    "SandboxError",
    "SandboxInfo",
    "SandboxSpec",
    "Security",
    "Settings",
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
]


# deferred: the hook markers need pluggy (~4 ms), so they load when first asked for.
_LAZY = ("hookimpl", "hookspec")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from .core import hookspecs

        value = getattr(hookspecs, name)
        globals()[name] = value  # found directly from now on
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
