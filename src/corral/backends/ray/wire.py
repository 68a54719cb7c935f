"""What crosses between the driver and a node agent, beside corral's own attrs classes.

A node answers every call with a value or a ``Failure``: corral's errors are raised on
the node and raised again, the same class with the same fields, on the driver. They
do not travel as exceptions because Ray would wrap them in its own (and some of
corral's take other arguments than their message, so plain pickling loses them).
"""

from __future__ import annotations

from typing import Any

import attrs

from ...core import errors
from ...core.backend import ExecStatus
from ...core.results import NodeInfo

__all__ = ["ExecReply", "Failure", "Full", "NodeReport", "Reply", "failure", "raise_failure"]


@attrs.frozen
class Failure:
    """A SandboxError raised on a node: its class's name and its fields."""

    kind: str
    fields: dict[str, Any]


def failure(error: errors.SandboxError) -> Failure:
    return Failure(type(error).__name__, dict(vars(error)))


def raise_failure(answer: Failure) -> Any:
    raise errors.rebuilt(answer.kind, answer.fields)


@attrs.frozen
class Full:
    """A node refused a create for room: ``max_per_node`` reached, or ``resource``
    (``CPU``, ``memory`` or a custom one) short right now."""

    reason: str
    resource: str | None = None


@attrs.frozen
class ExecReply:
    """A piece of an exec: the output since the last reply and, at the end, how it ended.

    ``token`` names the exec on its node, for the next piece and for cancelling it.
    ``dropped`` says the node let output past the cap go (nobody streamed it), so the
    driver marks the result truncated.
    """

    token: str
    chunks: tuple[tuple[str, bytes], ...] = ()
    status: ExecStatus | None = None
    dropped: bool = False


@attrs.frozen
class Reply:
    """A piece of a file stream from a node: data, and whether it is the last."""

    token: str
    chunks: tuple[bytes, ...] = ()
    done: bool = False


@attrs.frozen
class NodeReport:
    """What a node agent says of its node: where it is, which corral backends it can
    run (available or why not, and what each enforces), how many sandboxes it holds,
    and which corral it runs."""

    node: NodeInfo
    default: str | None
    backends: dict[str, tuple[bool, str, int]]  # name: (available, why not, Capability)
    sandboxes: int
    version: str = ""  # the node's corral
