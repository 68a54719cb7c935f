"""How many sandboxes this process holds open on each backend, against ``max_sandboxes``.

A slot is taken just before a backend's ``create`` and given back when the sandbox is
closed, or when its create fails (THREATS T42). Warm pools create and close through the
same calls, so their ready sandboxes count too. The count is this process's own: other
processes, and sandboxes only attached to, are not in it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

from .errors import CapacityError

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["claim", "extend", "held", "release"]


class _Slots:
    """The open sandboxes of one backend: a counting semaphore whose size is read at
    each claim (two creates may carry different settings), keyed by sandbox id so
    that only a sandbox that took a slot gives one back, and only once."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        # sandbox id -> when its lifetime ends. A sandbox never closed (a handle
        # dropped, a cleanup interrupted) stops counting then: its backend removes it.
        self.expires: dict[str, float] = {}

    def _prune(self, now: float) -> None:
        for sandbox_id in [i for i, end in self.expires.items() if end <= now]:
            del self.expires[sandbox_id]

    def claim(self, backend: str, sandbox_id: str, expires: float, cap: int, wait: float) -> None:
        deadline = time.monotonic() + wait
        with self.cond:
            while True:
                now = time.time()
                self._prune(now)
                if len(self.expires) < cap:
                    self.expires[sandbox_id] = expires
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    waited = f" (waited {wait:g}s for one to close)" if wait else ""
                    raise CapacityError(
                        f"this process already holds {len(self.expires)} {backend} sandboxes, "
                        f"the max_sandboxes cap{waited}; close one, set capacity_wait to "
                        "wait for one, or raise max_sandboxes",
                        backend=backend,
                    )
                # Woken by a close; else by the first lifetime to end, or the deadline.
                next_end = min(self.expires.values()) - now
                self.cond.wait(max(0.0, min(remaining, next_end)) + 0.001)

    def release(self, sandbox_id: str) -> None:
        with self.cond:
            if self.expires.pop(sandbox_id, None) is not None:
                # Every waiter looks: each may have come with a cap of its own.
                self.cond.notify_all()

    def extend(self, sandbox_id: str, expires: float) -> None:
        with self.cond:
            if sandbox_id in self.expires:
                self.expires[sandbox_id] = expires

    def held(self) -> int:
        with self.cond:
            self._prune(time.time())
            return len(self.expires)


_lock = threading.Lock()
_backends: dict[str, _Slots] = {}


def _slots(backend: str) -> _Slots:
    with _lock:
        slots = _backends.get(backend)
        if slots is None:
            slots = _backends[backend] = _Slots()
        return slots


def _forget_after_fork() -> None:
    # A forked child holds none of its parent's sandboxes, and must not inherit a lock
    # that another thread of the parent held at the fork.
    global _lock, _backends
    _lock = threading.Lock()
    _backends = {}


os.register_at_fork(after_in_child=_forget_after_fork)


def claim(backend: str, sandbox_id: str, expires: float, settings: Settings) -> None:
    """Take a slot for ``sandbox_id`` on ``backend`` until ``release`` (or ``expires``).

    Counted always; refused only under a ``max_sandboxes`` cap, after waiting up to
    ``capacity_wait`` seconds for a slot to free.

    Raises:
        CapacityError: the cap is reached (retryable: a close frees a slot).
    """
    cap = settings.max_sandboxes
    _slots(backend).claim(
        backend, sandbox_id, expires, cap if cap is not None else 1 << 62, settings.capacity_wait
    )


def release(backend: str, sandbox_id: str) -> None:
    """Give back the slot of ``sandbox_id``; nothing when it holds none. Never raises."""
    _slots(backend).release(sandbox_id)


def extend(backend: str, sandbox_id: str, expires: float) -> None:
    """Move the end of ``sandbox_id``'s slot (``Sandbox.extend``): it counts until then."""
    _slots(backend).extend(sandbox_id, expires)


def held(backend: str) -> int:
    """How many sandboxes this process holds open on ``backend`` now."""
    return _slots(backend).held()
