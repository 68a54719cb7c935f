"""Which node gets a sandbox: what it must reserve, who can host it, in which order.

Pure functions of what the node agents report, so the rules are tested without a
cluster. Ray itself enforces the reservation (a placement group per sandbox, pinned to
the chosen node); these only choose the order in which nodes are asked.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from ...core.backend import Capability
from ...core.spec import SandboxSpec
from . import wire

__all__ = ["bundle", "candidates", "holds", "ordered", "short_of", "shown", "too_big"]


def bundle(spec: SandboxSpec, extra: Mapping[str, float]) -> dict[str, float]:
    """The Ray resources a sandbox holds on its node while it lives: its CPUs (where
    capped), its memory limit in bytes, and the configured custom resources."""
    out: dict[str, float] = {"memory": float(spec.limits.memory)}
    if spec.limits.cpus is not None:
        out["CPU"] = float(spec.limits.cpus)
    out.update(extra)
    return out


def backend_of(report: wire.NodeReport, wanted: str | None) -> str | None:
    return wanted or report.default


def candidates(
    reports: Mapping[str, wire.NodeReport],
    wanted: str | None,
    need: Capability,
    max_per_node: int | None,
    version: str,
) -> tuple[list[str], dict[str, str]]:
    """The nodes that can host the sandbox now, and why each other one cannot. A node
    whose agent runs another corral than ``version`` gets no new sandboxes: the two
    sides of a call must agree on what they send."""
    fit, why = [], {}
    for node, report in reports.items():
        name = backend_of(report, wanted)
        ok, reason, caps = report.backends.get(name or "", (False, "not installed", 0))
        theirs = getattr(report, "version", "")  # an agent older than the field: ""
        if theirs != version:
            why[node] = (
                f"its agent runs corral {theirs or 'of another release'}, this driver {version}"
            )
        elif name is None:
            why[node] = "no corral backend is available on it"
        elif not ok:
            why[node] = f"its {name} backend is not available: {reason}"
        elif need & ~Capability(caps):
            missing = ", ".join(c.name or "" for c in Capability if c in need & ~Capability(caps))
            why[node] = f"its {name} backend cannot enforce {missing}"
        elif max_per_node is not None and report.sandboxes >= max_per_node:
            why[node] = f"it holds max_per_node ({max_per_node}) sandboxes"
        else:
            fit.append(node)
    return fit, why


def holds(want: Mapping[str, float], have: Mapping[str, float]) -> bool:
    """Whether ``have`` (a node's total or free resources) covers ``want``."""
    return all(have.get(r, 0.0) >= amount for r, amount in want.items())


def short_of(want: Mapping[str, float], have: Mapping[str, float]) -> list[str]:
    return [r for r, amount in want.items() if have.get(r, 0.0) < amount]


def too_big(want: Mapping[str, float], totals: Mapping[str, Mapping[str, float]]) -> str | None:
    """Why no node could ever hold ``want`` (a resource no node has enough of in all),
    or None when one could."""
    if any(holds(want, total) for total in totals.values()):
        return None
    for resource, amount in want.items():
        most = max((total.get(resource, 0.0) for total in totals.values()), default=0.0)
        if most < amount:
            return (
                f"no node of the Ray cluster has {shown(resource, amount)} of {resource} "
                f"(the most any node has is {shown(resource, most)})"
            )
    return "no single node of the Ray cluster has all of " + ", ".join(
        f"{shown(r, a)} {r}" for r, a in want.items()
    )


def shown(resource: str, amount: float) -> str:
    if resource == "memory":
        return f"{amount / 1024**2:.0f} MiB"
    return f"{amount:g}"


def ordered(nodes: list[str], counts: Mapping[str, int], strategy: str) -> list[str]:
    """``spread``: the node holding fewest sandboxes first; ``pack``: the one holding
    most first (ties in a random order, so that concurrent drivers do not all pick
    the same node)."""
    shuffled = random.sample(nodes, len(nodes))
    sign = -1 if strategy == "pack" else 1
    return sorted(shuffled, key=lambda node: sign * counts.get(node, 0))
