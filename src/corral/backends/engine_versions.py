"""The engine and runtime version gate: releases with known container escapes.

Releases where an escape is reachable from inside a container are refused outright.
Releases older than a later fix are warned about instead, because distributions
backport such fixes without changing the version (Debian 12's runc 1.1.5 carries the
CVE-2024-21626 fix, for one), so refusing them would refuse patched hosts.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import Any

import attrs

__all__ = ["Verdict", "judge", "judge_report", "runtime_version"]

log = logging.getLogger("corral")

Version = tuple[int, ...]

# Per engine: (first safe release, advisory). Below it: refused.
_REFUSED_BELOW = {
    "docker": [((18, 9, 2), "CVE-2019-5736: runc overwritten through exec")],
    "podman": [((1, 6, 0), "CVE-2019-18466: cp resolves symlinks on the host")],
}
# Exact releases refused.
_REFUSED_EXACTLY = {
    "docker": [((19, 3, 0), "CVE-2019-14271: cp runs code from the container")],
}
# Below these: warned, since a distribution may have backported the fix.
_WARNED_BELOW = {
    "podman": [((5, 2, 5), "CVE-2024-9676: a symlinked /etc/passwd reaches the host")],
    "runc": [
        ((1, 1, 12), "CVE-2024-21626: a leaked fd lets exec escape"),
        ((1, 2, 8), "CVE-2025-31133: a fake /dev/null defeats masked paths"),
    ],
}


def parse(text: str) -> Version | None:
    """``(20, 10, 24)`` from ``"20.10.24+dfsg1"`` or ``"runc version 1.1.5+ds1"``."""
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if found is None:
        return None
    return tuple(int(part or 0) for part in found.groups())


@attrs.frozen
class Verdict:
    """What the gate says of an engine: why it is refused (or None), and warnings."""

    refused: str | None
    warnings: tuple[str, ...]


def _dotted(version: Version) -> str:
    return ".".join(map(str, version))


def judge(engine: str, engine_version: str, runtime: str | None) -> Verdict:
    """The verdict on ``engine`` ("docker" or "podman") at ``engine_version`` running
    the OCI runtime whose version text is ``runtime`` (runc's; None when unknown)."""
    refused = None
    warnings: list[str] = []
    version = parse(engine_version)
    if version is not None:
        for safe, advisory in _REFUSED_BELOW.get(engine, []):
            if version < safe:
                refused = f"{engine} {engine_version} is older than {_dotted(safe)} ({advisory})"
        for bad, advisory in _REFUSED_EXACTLY.get(engine, []):
            if version == bad:
                refused = f"{engine} {engine_version} has a known escape ({advisory})"
        warnings += _older(engine, version, _WARNED_BELOW.get(engine, []))
    runc = parse(runtime) if runtime else None
    if runc is not None:
        warnings += _older("runc", runc, _WARNED_BELOW["runc"])
    return Verdict(refused, tuple(warnings))


def _older(name: str, version: Version, fixes: Iterable[tuple[Version, str]]) -> list[str]:
    return [
        f"{name} {_dotted(version)} is older than {_dotted(safe)} ({advisory}); "
        "make sure your distribution has backported the fix"
        for safe, advisory in fixes
        if version < safe
    ]


def runtime_version(components: Iterable[dict[str, Any]]) -> str | None:
    """The runc version text among an engine's ``/version`` components, if listed."""
    for component in components:
        if "runc" in str(component.get("Name", "")).lower():
            return str(component.get("Version", ""))
    return None


# The warnings logged so far in this process: each once, whatever the number of backend
# instances, CLI calls or checks that judge the same engine.
_logged: set[str] = set()
_logged_lock = threading.Lock()


def judge_report(engine: str, report: dict[str, Any]) -> Verdict:
    """The verdict on an engine from its ``/version`` answer (Docker's and Podman's have
    the same shape).

    Its warnings are logged at INFO on the ``corral`` logger, each at most once per
    process, and never printed: they belong in ``Availability.warnings``, which ``corral
    doctor`` and ``corral backends`` show. A distribution's backported fix does not
    change the version, so on most hosts the warning is noise at every call.
    """
    runtime = runtime_version(report.get("Components") or [])
    verdict = judge(engine, report.get("Version", ""), runtime)
    with _logged_lock:
        fresh = [w for w in verdict.warnings if w not in _logged]
        _logged.update(fresh)
    for warning in fresh:
        log.info("%s", warning)
    return verdict
