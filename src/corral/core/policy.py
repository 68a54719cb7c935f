"""corral's own policy, applied to every spec before any backend sees it.

Unsafe options need their name in ``security.allow_unsafe``; bind-mount sources are
resolved on the host and must lie under an allowed root, and never be a sensitive
host folder or an engine socket unless ``sensitive_mounts`` is allowed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import attrs

from .errors import ConfigError, PolicyError
from .settings import Settings
from .spec import UNSAFE_OPTIONS, Mount, SandboxSpec

__all__ = ["apply_policy", "loosened", "sensitive_reason"]

# Refused as a source, and so is anything below them.
_SENSITIVE_TREES = (
    "/etc",
    "/proc",
    "/sys",
    "/dev",
    "/boot",
    "/run",
    "/var/run",
    "/var/lib/docker",
    "/var/lib/containers",
    "/var/lib/containerd",
)
# Refused as a source themselves (a project folder below them is fine).
_SENSITIVE_FOLDERS = (
    "/",
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/sbin",
    "/var",
    "/home",
    "/root",
    "/opt",
)
_SENSITIVE_HOME_TREES = (".ssh", ".gnupg", ".aws", ".docker", ".kube", ".config/gcloud", ".netrc")
# The spec field each unsafe option loosens, for errors that name it.
_FIELDS = {"selinux": "selinux_label"}


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def sensitive_reason(path: Path) -> str | None:
    """Why ``path`` (resolved) must not be mounted, or None when it may be."""
    home = Path.home().resolve()
    if any(_under(path, Path(t)) for t in _SENSITIVE_TREES):
        return "is a system folder"
    if str(path) in _SENSITIVE_FOLDERS or path == home:
        return "is a system or home folder"
    if any(_under(path, home / t) for t in _SENSITIVE_HOME_TREES):
        return "holds credentials"
    try:
        if stat.S_ISSOCK(path.stat().st_mode):
            return "is a socket (an engine socket gives root on the host)"
    except OSError:
        pass
    return None


def _resolve_mount(mount: Mount, index: int, spec: SandboxSpec, settings: Settings) -> Mount:
    field = f"sandbox.mounts[{index}].source"
    source = Path(os.path.expanduser(mount.source))
    try:
        resolved = source.resolve(strict=True)
    except OSError:
        raise ConfigError(field, f"{mount.source!r} does not exist") from None
    # The path as written counts too: /lib resolves to /usr/lib on merged-/usr hosts.
    reason = sensitive_reason(resolved) or sensitive_reason(Path(os.path.abspath(source)))
    if reason and "sensitive_mounts" not in spec.security.allow_unsafe:
        raise PolicyError(
            f"{field}: {str(resolved)!r} {reason}; it can only be mounted with "
            "'sensitive_mounts' in sandbox.security.allow_unsafe"
        )
    roots = settings.allowed_mount_roots()
    if not any(_under(resolved, root) for root in roots):
        allowed = ", ".join(str(r) for r in roots) or "none"
        raise PolicyError(
            f"{field}: {str(resolved)!r} is not under an allowed mount root ({allowed}); "
            "add its folder to the mount_roots setting"
        )
    return attrs.evolve(mount, source=str(resolved))


def apply_policy(spec: SandboxSpec, settings: Settings) -> SandboxSpec:
    """The spec with bind sources resolved, or PolicyError for what it may not do."""
    for name in spec.security.loosened():
        if name not in spec.security.allow_unsafe:
            raise PolicyError(
                f"sandbox.security.{_FIELDS.get(name, name)}: {UNSAFE_OPTIONS[name]}; to allow "
                f"it, add {name!r} to sandbox.security.allow_unsafe"
            )
    mounts = tuple(
        _resolve_mount(m, i, spec, settings) if isinstance(m, Mount) else m
        for i, m in enumerate(spec.mounts)
    )
    return attrs.evolve(spec, mounts=mounts)


def loosened(spec: SandboxSpec) -> list[str]:
    """Every unsafe option a policy-checked spec uses, sensitive mounts included."""
    found = spec.security.loosened()
    if any(isinstance(m, Mount) and sensitive_reason(Path(m.source)) for m in spec.mounts):
        found.append("sensitive_mounts")
    return found
