"""corral's own policy, applied to every spec before any backend sees it.

Unsafe options need their name in ``security.allow_unsafe``; bind-mount sources are
resolved on the host and must lie under an allowed root, and never be a sensitive
host folder or an engine socket unless ``sensitive_mounts`` is allowed. A read-write
bind writes to the host's disk with no cap: it needs ``unbounded_rw_mounts``, and its
filesystem must keep ``rw_mount_reserve`` free.
"""

from __future__ import annotations

import os
import posixpath
import stat
from typing import TYPE_CHECKING

import attrs

from .errors import ConfigError, PolicyError, ResourceLimitError
from .settings import Settings
from .spec import UNSAFE_OPTIONS, Mount, SandboxSpec, Volume

# deferred: pathlib costs ~5 ms at `import corral`; it loads when a spec is checked.
if TYPE_CHECKING:
    from pathlib import Path

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
    from pathlib import Path

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
    from pathlib import Path

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
    if not mount.read_only:
        _check_rw(mount, index, resolved, spec, settings)
    return attrs.evolve(mount, source=str(resolved))


def _check_rw(
    mount: Mount, index: int, resolved: Path, spec: SandboxSpec, settings: Settings
) -> None:
    """A read-write bind: opted into, and on a filesystem with its reserve free."""
    field = f"sandbox.mounts[{index}]"
    if "unbounded_rw_mounts" not in spec.security.allow_unsafe:
        raise PolicyError(
            f"{field}: {str(resolved)!r} on {mount.target!r} is read-write, and what the "
            "sandbox writes there goes to the host's disk with no cap; mount it read-only, "
            "or add 'unbounded_rw_mounts' to sandbox.security.allow_unsafe"
        )
    reserve = settings.rw_mount_reserve
    if reserve:
        try:
            found = os.statvfs(resolved)
        except OSError as e:
            raise ConfigError(f"{field}.source", f"cannot read its free space: {e}") from None
        free = found.f_bavail * found.f_frsize
        if free < reserve:
            raise ResourceLimitError(
                f"{field}: the filesystem of {str(resolved)!r} has {_approximate(free)} free, "
                f"less than the {_approximate(reserve)} a read-write mount must leave "
                "(the rw_mount_reserve setting); free space there or lower the setting"
            )


def _approximate(size: int) -> str:
    """A size for a message: 1.5 GiB, 300.0 MiB, 512 bytes."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} bytes"


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
    resolved = attrs.evolve(spec, mounts=mounts)
    _check_mount_points(resolved)
    return resolved


def _check_mount_points(spec: SandboxSpec) -> None:
    """Refuse a mount (or the workdir) whose place lies in a read-only mount that lacks
    it: no backend can make a mount point in a read-only folder (runc and bubblewrap
    fail to start the sandbox, or its first command), and a volume's content is not
    known here. Only the innermost mount around a place matters."""
    places = [(f"sandbox.mounts[{i}].target", m.target) for i, m in enumerate(spec.mounts)]
    places.append(("sandbox.workdir", spec.workdir))
    for field, place in places:
        around = [m for m in spec.mounts if _strictly_below(place, m.target)]
        if not around:
            continue
        outer = max(around, key=lambda m: len(m.target))
        if not (isinstance(outer, (Mount, Volume)) and outer.read_only):
            continue
        inside = posixpath.relpath(place, outer.target)
        if isinstance(outer, Volume):
            raise ConfigError(
                field,
                f"{place!r} lies in the read-only volume {outer.name!r} at {outer.target!r}, "
                "where no mount point can be made; mount the volume read-write, or use "
                "another place",
            )
        if not os.path.lexists(os.path.join(outer.source, inside)):
            raise ConfigError(
                field,
                f"{place!r} lies in the read-only mount of {outer.source!r} at "
                f"{outer.target!r}, which has no {inside!r}; create it there, or mount "
                "that folder read-write",
            )


def _strictly_below(path: str, folder: str) -> bool:
    return path != folder and path.startswith(folder.rstrip("/") + "/")


def loosened(spec: SandboxSpec) -> list[str]:
    """Every unsafe option a policy-checked spec uses, sensitive mounts included."""
    from pathlib import Path

    found = spec.security.loosened()
    binds = [m for m in spec.mounts if isinstance(m, Mount)]
    if any(sensitive_reason(Path(m.source)) for m in binds):
        found.append("sensitive_mounts")
    if any(not m.read_only for m in binds):
        found.append("unbounded_rw_mounts")
    return found
