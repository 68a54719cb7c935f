"""``[backends.ray]``: where the cluster is and how sandboxes are placed on it."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from ...core.errors import ConfigError
from ...core.spec import choice_field, duration_field

__all__ = ["RaySettings"]


def _field(parse: Any, **kwargs: Any) -> Any:
    """A field whose converter's errors name it."""
    return attrs.field(
        converter=attrs.Converter(lambda v, f: parse(v, f.name), takes_field=True), **kwargs
    )


def _resources(value: Any, field: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ConfigError(field, f"{value!r} is not a table of resource names and amounts")
    out = {}
    for name, amount in value.items():
        if not isinstance(name, str) or not name or name in ("CPU", "memory", "GPU"):
            raise ConfigError(
                f"{field}.{name}",
                "must name a custom Ray resource (CPU and memory come from the sandbox's limits)",
            )
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise ConfigError(f"{field}.{name}", f"{amount!r} is not a positive number")
        out[name] = float(amount)
    return out


def _max_per_node(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise ConfigError(field, f"{value!r} is not a whole number of at least 1")
    return value


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(field, f"{value!r} is not a name")
    return value


def _node_backend(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if value == "ray":
        raise ConfigError(field, "a node cannot run its sandboxes through ray again")
    return _name(value, field)


@attrs.frozen
class RaySettings:
    """``[backends.ray]``.

    ``address``: ``auto`` joins the cluster this machine runs (``RAY_ADDRESS``, else the
    one ``ray start`` recorded), or ``host:port`` / ``ray://host:port``. ``node_backend``:
    the corral backend each node runs its sandboxes on; unset, the node's own
    ``backend`` setting, else the first of its backends that is available.
    ``resources``: custom Ray resources each sandbox reserves beside its CPU and memory.
    ``strategy``: ``spread`` (the node with fewest sandboxes first) or ``pack`` (fill one
    node before the next). ``max_per_node``: at most this many sandboxes on one node.
    ``placement_timeout``: how long a create waits for a node with room before a
    CapacityError. ``call_timeout``: how long any one call to a node may take before it
    counts as lost (an exec's own timeout comes on top).
    """

    address: str = _field(_name, default="auto")
    namespace: str = _field(_name, default="corral")
    node_backend: str | None = _field(_node_backend, default=None)
    resources: dict[str, float] = _field(_resources, factory=dict)
    strategy: Literal["spread", "pack"] = choice_field("spread", ("spread", "pack"))
    max_per_node: int | None = _field(_max_per_node, default=None)
    placement_timeout: float = duration_field("30s")
    call_timeout: float = duration_field("60s")
