"""The error table both engines share: an engine's failed answer (its HTTP status and
message) as corral's error, in the style of httpx's transport error mapping. Each
adapter turns its client's exceptions into ``(status, text)`` and adds rules of its own
in front of these."""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Iterable

import attrs

from ...core.errors import (
    ConfigError,
    ConflictError,
    InternalError,
    NotFoundError,
    PathSecurityError,
    ResourceLimitError,
    SandboxError,
)


@attrs.frozen
class Rule:
    """When ``applies(status, text)``: raise ``error`` with ``message(text)``; a
    ConfigError names the spec's ``field(text)``."""

    error: type[SandboxError]
    applies: Callable[[int, str], bool]
    message: Callable[[str], str] = lambda text: text
    retryable: Callable[[int, str], bool | None] = lambda status, text: None
    field: Callable[[str], str] | None = None
    fix: str | None = None


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


# The rlimits runc names by number when the engine cannot set them (the engine's own hard
# limit is lower): RLIMIT_CPU 0, FSIZE 1, NPROC 6, NOFILE 7.
_RLIMIT_FIELDS = {"0": "cputime", "1": "file_size", "6": "nproc", "7": "nofile"}


def _rlimit_field(text: str) -> str:
    found = re.search(r"rlimit type (\d+)", text)
    return f"sandbox.limits.{_RLIMIT_FIELDS.get(found[1] if found else '', 'nofile')}"


RULES = (
    # What the spec asks and the engine cannot give: named by field, before anything runs.
    Rule(
        ConfigError,
        lambda status, text: "unable to find user" in text or "unable to find group" in text,
        lambda text: f"the image has no such user or group ({text})",
        field=lambda text: "sandbox.user",
        fix="use a user the image has, or numeric ids (uid:gid)",
    ),
    Rule(
        ConfigError,
        lambda status, text: "setting rlimit type" in text,
        lambda text: f"above what the engine itself may set ({text})",
        field=_rlimit_field,
        fix="ask for less, or raise the engine's own hard limit (LimitNOFILE, LimitNPROC)",
    ),
    Rule(
        ConfigError,
        lambda status, text: "range of cpus is from" in text.lower(),
        lambda text: f"more than the engine's host has ({text})",
        field=lambda text: "sandbox.limits.cpus",
    ),
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
        fix="write under a writable folder: the workspace, /tmp or a read-write mount",
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
        if not rule.applies(status, text):
            continue
        message = rule.message(text)
        if rule.field is not None:
            return ConfigError(
                rule.field(text), message, backend=backend, sandbox_id=sandbox_id, fix=rule.fix
            )
        return rule.error(
            message,
            backend=backend,
            sandbox_id=sandbox_id,
            retryable=rule.retryable(status, text),
            fix=rule.fix,
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
