"""Names and labels: how corral finds its containers and networks on an engine."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from ...core.convert import structure
from ...core.errors import InternalError
from ...core.results import LEFTOVER, SandboxInfo
from ...core.spec import SandboxSpec

NAME_PREFIX = "corral-"
SPEC_LABEL = "corral.spec"


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
