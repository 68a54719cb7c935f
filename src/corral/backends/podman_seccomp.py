"""corral's default seccomp profile on Podman: Podman's own, without what nests containers.

Podman's default profile allows ``unshare``, ``setns``, ``mount``, ``keyctl`` and
namespace flags on ``clone`` to anyone, so that containers can run containers; Docker's
allows them only with CAP_SYS_ADMIN. A sandbox has no capabilities and runs hostile
code, for which new user namespaces and keyrings are kernel attack surface with no use.
The profile is derived from the service host's own file (so it tracks that Podman's
syscall list), written once to a file of corral's, and passed by path.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["sandbox_profile"]

# Where distributions install Podman's default profile.
_SOURCES = ("/usr/share/containers/seccomp.json", "/etc/containers/seccomp.json")
# Refused unless the sandbox holds CAP_SYS_ADMIN, as in Docker's default profile.
_ADMIN_ONLY = frozenset(
    {"unshare", "setns", "mount", "umount", "umount2", "pivot_root", "keyctl", "add_key",
     "request_key", "clone", "clone3"}
)  # fmt: skip
# clone's namespace flags: NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET.
_CLONE_NAMESPACES = sum(
    (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
)
_ENOSYS = 38


def _tightened(profile: dict[str, Any]) -> dict[str, Any]:
    rules = []
    for rule in profile["syscalls"]:
        unconditional = rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("includes")
        if unconditional and _ADMIN_ONLY & set(rule["names"]):
            names = [n for n in rule["names"] if n not in _ADMIN_ONLY]
            if not names:
                continue
            rule = {**rule, "names": names}
        rules.append(rule)
    admin = {"caps": ["CAP_SYS_ADMIN"]}
    rules += [
        # Plain forks and threads, never new namespaces.
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [
                {"index": 0, "value": _CLONE_NAMESPACES, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
            ],
            "excludes": admin,
        },
        # clone3's flags are behind a pointer, out of seccomp's reach: libc falls back
        # to clone on ENOSYS.
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": _ENOSYS, "excludes": admin},
        {"names": sorted(_ADMIN_ONLY), "action": "SCMP_ACT_ALLOW", "includes": admin},
    ]
    return {**profile, "syscalls": rules}


def sandbox_profile() -> str | None:
    """The path of corral's profile, made from the host's Podman profile; None when the
    host has none (a remote service, or an unusual install): Podman's own then applies."""
    for source in _SOURCES:
        try:
            text = Path(source).read_text()
            profile = json.loads(text)
        except (OSError, ValueError):
            continue
        data = json.dumps(_tightened(profile), sort_keys=True)
        digest = hashlib.sha256(data.encode()).hexdigest()[:16]
        # A hidden name: one file per profile version, shared by every sandbox.
        path = Path(tempfile.gettempdir()) / f".corral-podman-seccomp-{digest}.json"
        if not path.is_file():
            partial = path.with_name(f"{path.name}.{os.getpid()}")
            partial.write_text(data)
            os.chmod(partial, 0o644)
            partial.replace(path)  # atomic: a concurrent writer writes the same bytes
        return str(path)
    return None
