"""The error table both engines share: an engine's failed answer (its HTTP status and
message) as corral's error, in the style of httpx's transport error mapping. Each
adapter turns its client's exceptions into ``(status, text)`` and adds rules of its own
in front of these."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable

import attrs

from ...core.errors import (
    ConflictError,
    InternalError,
    NotFoundError,
    PathSecurityError,
    ResourceLimitError,
    SandboxError,
)


@attrs.frozen
class Rule:
    """When ``applies(status, text)``: raise ``error`` with ``message(text)``."""

    error: type[SandboxError]
    applies: Callable[[int, str], bool]
    message: Callable[[str], str] = lambda text: text
    retryable: Callable[[int, str], bool | None] = lambda status, text: None


def out_of_space(engine_message: str) -> str:
    """What a ResourceLimitError says when the engine's own storage is full (T83)."""
    return (
        f"no space left on the engine's storage ({engine_message}); free space there "
        "(its data root, or where its images and containers are kept) and try again"
    )


def not_running(engine_message: str) -> bool:
    """Whether a 409 says the container is not running: it never runs again (its lifetime
    ended, or it was killed from outside, and the engine is removing it), so retrying is
    pointless; other conflicts (a name still taken, a removal under way) may pass."""
    text = engine_message.lower()
    return "is not running" in text or "container state improper" in text


RULES = (
    # A container removed while the call ran can also come back as a 500 saying so.
    Rule(
        NotFoundError,
        lambda status, text: status == 404 or "no such container" in text.lower(),
        lambda text: f"not found: {text}",
    ),
    Rule(
        ConflictError,
        lambda status, text: status == 409,
        lambda text: f"the engine refused: {text}",
        lambda status, text: not not_running(text),
    ),
    Rule(ResourceLimitError, lambda status, text: "no space left" in text.lower(), out_of_space),
    Rule(
        PathSecurityError,
        lambda status, text: "read-only" in text or "read only" in text,
        lambda text: f"{text}; write under the workspace or a volume",
    ),
)


def error_for(
    status: int,
    text: str,
    *,
    backend: str,
    sandbox_id: str | None,
    rules: Iterable[Rule] = (),
) -> SandboxError:
    """corral's error for an engine's failed answer: the first rule that applies, of
    ``rules`` then the shared ones; an InternalError (retryable if the engine's fault)
    when none does."""
    for rule in (*rules, *RULES):
        if rule.applies(status, text):
            return rule.error(
                rule.message(text),
                backend=backend,
                sandbox_id=sandbox_id,
                retryable=rule.retryable(status, text),
            )
    return InternalError(
        f"the engine failed: {text}",
        backend=backend,
        sandbox_id=sandbox_id,
        retryable=status >= 500,
    )


def release_frames(error: BaseException) -> None:
    """Clear the locals of the frames in ``error``'s chain: the engine clients leave the
    socket of a connection that failed to open unclosed there, and the error corral
    chains to it would keep it (an open file descriptor) until a garbage collection."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__
