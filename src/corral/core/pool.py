"""Warm pools: sandboxes of one spec made ahead of time, each handed out once.

Creating a sandbox costs hundreds of milliseconds on a container engine; a pool pays
that in a background thread so that ``acquire()`` only has to hand one over. A sandbox
is never returned to the pool: it is destroyed when its user is done, so nothing one
user leaves behind (files, processes, environment) reaches the next.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import attrs

from . import options
from ._log import log
from .errors import CapacityError, ConfigError, ResourceLimitError, SandboxClosedError, TimeoutError
from .lifecycle import build_spec, create, select_backend_name
from .plugins import get_host
from .sandbox import Sandbox
from .settings import Settings, load_settings
from .spec import SandboxSpec

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Pool", "PoolStats"]

# Backoff between failed creations: doubles from the first to the last, reset by a success.
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
# How long close() waits for a creation in flight before giving up on it (it is then
# destroyed by the refill thread when the creation ends, if the program still runs).
_JOIN_TIMEOUT = 60.0
# The refill thread's longest sleep while full (a lifetime may be longer than a wait allows).
_MAX_SLEEP = 3600.0
# The keywords of corral.create() a pool passes through; backend and settings are its own.
_CREATE_KEYWORDS = frozenset(options.names(options.CREATE))


@attrs.frozen
class PoolStats:
    """A snapshot of a pool's counters.

    Attributes:
        ready: sandboxes waiting in the pool.
        in_use: sandboxes handed out (or being checked before hand-out) not yet destroyed.
        creating: creations in flight (0 or 1: one refill thread creates one at a time).
        created: sandboxes the pool created since it started.
        destroyed: sandboxes the pool destroyed (used, dead, expired or left at close).
        failures: creations that failed.
        last_error: the last creation error as ``"Type: message"``, or None.
    """

    ready: int
    in_use: int
    creating: int
    created: int
    destroyed: int
    failures: int
    last_error: str | None


class _Core:
    """The pool's state and refill loop, kept apart from ``Pool`` so that neither the
    refill thread nor the finalizer holds the ``Pool`` alive: dropping the last
    reference to a pool closes it."""

    def __init__(
        self, size: int, backend: str, settings: Settings, keywords: dict[str, Any]
    ) -> None:
        self.size = size
        self.backend = backend
        self.settings = settings
        self.keywords = keywords
        self.cond = threading.Condition()
        self.ready: collections.deque[Sandbox] = collections.deque()
        self.closed = False
        self.in_use = 0
        self.creating = 0
        self.created = 0
        self.destroyed = 0
        self.failures = 0
        self.last_error: str | None = None
        self.thread = threading.Thread(
            target=self.refill, name=f"corral-pool-{backend}", daemon=True
        )

    # -- refill ------------------------------------------------------------------------

    def refill(self) -> None:
        """Keep ``size`` sandboxes ready until closed; never raises."""
        backoff = _BACKOFF_FIRST
        while True:
            with self.cond:
                stale = self._pop_expired()
                while not stale and not self.closed and self._full():
                    self.cond.wait(self._until_next_expiry())
                    stale = self._pop_expired()
                closed = self.closed
                if not closed and not stale:
                    self.creating += 1
            for sandbox in stale:  # destroyed off the lock: acquirers need not wait for it
                self._destroy(sandbox)
            if closed:
                return
            if stale:
                continue
            try:
                sandbox = create(backend=self.backend, settings=self.settings, **self.keywords)
            except Exception as e:
                # At the max_sandboxes cap (T42) nothing is wrong: a close frees a slot,
                # so the pool asks again soon, without growing the backoff or warning.
                full = isinstance(e, CapacityError)
                (log.info if full else log.warning)(
                    "a pool could not create a %s sandbox: %s", self.backend, e
                )
                with self.cond:
                    self.creating -= 1
                    self.failures += 1
                    self.last_error = f"{type(e).__name__}: {e}"
                    self.cond.notify_all()  # waiters may report the error sooner
                    # Hand-outs notify too; only close() may cut the backoff short.
                    self.cond.wait_for(lambda: self.closed, backoff)
                backoff = _BACKOFF_FIRST if full else min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = _BACKOFF_FIRST
            # Asked once here, off the hand-out path, so that the backend has what it
            # needs to answer quickly (a container's host view) when acquire asks again.
            sandbox.backend.alive(sandbox.id)
            with self.cond:
                self.creating -= 1
                self.created += 1
                late = self.closed
                if not late:
                    self.ready.append(sandbox)
                    self.cond.notify_all()
            if late:  # closed while creating: the new sandbox must not outlive the pool
                self._destroy(sandbox)
                return

    def _until_next_expiry(self) -> float | None:
        """Seconds until the first ready sandbox's lifetime ends (None: wait for a wake-up)."""
        if not self.ready:
            return None
        left = min(s.expires for s in self.ready) - time.time()
        return min(max(0.0, left) + 0.01, _MAX_SLEEP)

    def _pop_expired(self) -> list[Sandbox]:
        """Take the ready sandboxes whose lifetime is over out of the pool (lock held)."""
        now = time.time()
        expired = [s for s in self.ready if s.expires <= now]
        for sandbox in expired:
            self.ready.remove(sandbox)
            log.info("pooled sandbox %s outlived its lifetime; replacing it", sandbox.id)
        return expired

    def _full(self) -> bool:
        return len(self.ready) + self.creating >= self.size

    # -- hand-out ----------------------------------------------------------------------

    def take(self, timeout: float, on_empty: str, cancel: threading.Event | None) -> Sandbox:
        """A ready sandbox checked alive, counted in use; see ``Pool.acquire``."""
        deadline = time.monotonic() + timeout
        while True:
            with self.cond:
                while True:
                    if self.closed:
                        raise SandboxClosedError("this pool is closed", backend=self.backend)
                    if cancel is not None and cancel.is_set():
                        raise TimeoutError("the caller stopped waiting", backend=self.backend)
                    if self.ready:
                        sandbox = self.ready.popleft()
                        self.in_use += 1
                        self.cond.notify_all()  # room for the refill thread
                        break
                    remaining = deadline - time.monotonic()
                    if on_empty == "fail" or remaining <= 0:
                        raise self._empty_error(on_empty, timeout)
                    self.cond.wait(remaining)
            # The check talks to the backend, so it runs off the lock.
            if self._alive(sandbox):
                return sandbox
            self.release(sandbox, quiet=True)

    def _empty_error(self, on_empty: str, timeout: float) -> ResourceLimitError | TimeoutError:
        why = f" (last creation error: {self.last_error})" if self.last_error else ""
        if on_empty == "fail":
            return ResourceLimitError(f"the pool has no ready sandbox{why}", backend=self.backend)
        return TimeoutError(
            f"no pooled sandbox became ready within {timeout:g}s{why}", backend=self.backend
        )

    def _alive(self, sandbox: Sandbox) -> bool:
        """Whether a pooled sandbox can still be used: lifetime left, and the backend says
        it still runs (``Backend.alive``: on a local engine a read of the container's
        cgroup, which sees a container removed, stopped or paused behind the pool's back)."""
        if sandbox.expires <= time.time():
            log.info("pooled sandbox %s outlived its lifetime; replacing it", sandbox.id)
            return False
        try:
            alive = sandbox.backend.alive(sandbox.id)
        except Exception as e:
            log.warning("pooled sandbox %s cannot be checked (%s); replacing it", sandbox.id, e)
            return False
        if not alive:
            log.warning("pooled sandbox %s no longer runs; replacing it", sandbox.id)
        return alive

    def release(self, sandbox: Sandbox, *, quiet: bool = False) -> None:
        """Destroy a sandbox that was handed out; a failure raises unless ``quiet``."""
        try:
            if quiet:
                self._destroy(sandbox, count=False)
            else:
                sandbox.close()
        finally:
            with self.cond:
                self.in_use -= 1
                self.destroyed += 1
                self.cond.notify_all()

    def _destroy(self, sandbox: Sandbox, *, count: bool = True) -> None:
        """Close a sandbox, logging rather than raising: used where nobody could act on it."""
        try:
            sandbox.close()
        except Exception:
            log.exception("a pool could not destroy sandbox %s", sandbox.id)
        if count:
            with self.cond:
                self.destroyed += 1

    # -- shutdown ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop refilling and destroy every ready sandbox; handed-out ones stay theirs."""
        with self.cond:
            self.closed = True
            left = list(self.ready)
            self.ready.clear()
            self.cond.notify_all()
        errors = []
        for sandbox in left:
            try:
                sandbox.close()
            except Exception as e:
                log.exception("a pool could not destroy sandbox %s", sandbox.id)
                errors.append(e)
            finally:
                with self.cond:
                    self.destroyed += 1
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(_JOIN_TIMEOUT)
            if self.thread.is_alive():
                log.warning("a pool's refill thread did not stop within %gs", _JOIN_TIMEOUT)
        if errors:
            raise errors[0]

    def stats(self) -> PoolStats:
        with self.cond:
            return PoolStats(
                ready=len(self.ready),
                in_use=self.in_use,
                creating=self.creating,
                created=self.created,
                destroyed=self.destroyed,
                failures=self.failures,
                last_error=self.last_error,
            )


class Pool:
    """Keeps ``size`` sandboxes of one spec ready on a backend; each is handed out once.

    ``Pool(4, image="python:3.12", memory="512m")`` takes the keywords of
    ``corral.create`` and makes sandboxes in one background thread, up to ``size`` ready
    at a time (the ones handed out do not count). ``with pool.acquire() as sandbox:``
    hands one out and destroys it when the block ends; it never goes back to the pool.

    When no sandbox is ready, ``on_empty="wait"`` blocks up to the timeout and then
    raises ``TimeoutError`` (retryable); ``on_empty="fail"`` raises
    ``ResourceLimitError`` at once. Creation errors are logged and retried with a
    backoff; ``stats().last_error`` keeps the last one.

    A sandbox's lifetime starts when the pool creates it and keeps running while it
    waits: a handed-out sandbox has less than the full lifetime left (``sandbox.expires``
    says when it ends). Sandboxes whose lifetime ends in the pool are replaced.

    ``close()``, leaving the ``with`` block of the pool, dropping the last reference to
    it or the program's exit stops the refill thread and destroys every ready sandbox.
    Thread-safe: any number of threads may acquire at once.
    """

    def __init__(
        self,
        size: int = 1,
        *,
        backend: str | None = None,
        settings: Settings | None = None,
        on_empty: Literal["wait", "fail"] = "wait",
        acquire_timeout: float = 30.0,
        image: str | None = None,
        spec: SandboxSpec | None = None,
        **sandbox_options: Unpack[options.SandboxOptions],
    ) -> None:
        unknown = sorted(set(sandbox_options) - _CREATE_KEYWORDS)
        if unknown:
            raise TypeError(f"Pool() got keywords corral.create does not take: {unknown}")
        create_keywords: dict[str, Any] = {"image": image, "spec": spec, **sandbox_options}
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError("size", f"must be a whole number of at least 1, not {size!r}")
        if on_empty not in ("wait", "fail"):
            raise ConfigError("on_empty", f"must be 'wait' or 'fail', not {on_empty!r}")
        if acquire_timeout < 0:
            raise ConfigError("acquire_timeout", "must not be negative")
        settings = load_settings() if settings is None else settings
        name = select_backend_name(backend, settings)
        # Fail here, not in the background: bad values, and a backend that cannot run.
        build_spec(
            settings,
            create_keywords.get("spec"),
            {k: v for k, v in create_keywords.items() if k != "spec"},
        )
        get_host().backend(name, settings)
        self.size = size
        self.backend = name
        self.on_empty = on_empty
        self.acquire_timeout = acquire_timeout
        # The refill thread never waits for a capacity slot (capacity_wait): it would
        # hold up close(); it retries instead.
        refill_settings = attrs.evolve(settings, capacity_wait=0.0)
        self._core = _Core(size, name, refill_settings, dict(create_keywords))
        self._finalizer = weakref.finalize(self, self._core.close)
        self._core.thread.start()

    def __repr__(self) -> str:
        s = self.stats()
        state = "closed" if self.closed else f"{s.ready}/{self.size} ready, {s.in_use} in use"
        return f"<Pool of {self.backend} sandboxes ({state})>"

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # never mask the error that is already on its way out
            log.exception("closing a pool failed while handling another error")

    @property
    def closed(self) -> bool:
        return self._core.closed

    @contextlib.contextmanager
    def acquire(self, timeout: float | None = None) -> Iterator[Sandbox]:
        """Hand out a ready sandbox for one ``with`` block; it is destroyed at the end.

        Args:
            timeout: seconds to wait for one under ``on_empty="wait"`` (default: the
                pool's ``acquire_timeout``).

        Raises:
            SandboxClosedError: the pool is closed.
            TimeoutError: none became ready in time (``on_empty="wait"``).
            ResourceLimitError: none is ready now (``on_empty="fail"``).
        """
        sandbox = self.take(timeout)
        try:
            yield sandbox
        except BaseException:
            self.give_back(sandbox)  # quietly: never mask the error on its way out
            raise
        self.give_back(sandbox, raise_errors=True)

    def take(self, timeout: float | None = None, cancel: threading.Event | None = None) -> Sandbox:
        """``acquire`` in two halves, for callers that cannot hold a ``with`` block
        (``corral.aio``): a checked sandbox, which must then go to ``give_back``. Setting
        ``cancel`` (then calling ``wake``) ends the wait for one."""
        timeout = self.acquire_timeout if timeout is None else timeout
        return self._core.take(timeout, self.on_empty, cancel)

    def wake(self) -> None:
        """Wake the threads waiting in ``take``, to look at their ``cancel`` events."""
        with self._core.cond:
            self._core.cond.notify_all()

    def give_back(self, sandbox: Sandbox, *, raise_errors: bool = False) -> None:
        """Destroy a sandbox from ``take`` (it never returns to the pool); a failure to
        destroy it is logged, or raised with ``raise_errors``."""
        self._core.release(sandbox, quiet=not raise_errors)

    def stats(self) -> PoolStats:
        """Counts of ready, in-use, created and destroyed sandboxes, and the last error."""
        return self._core.stats()

    def close(self) -> None:
        """Stop refilling and destroy every ready sandbox. Idempotent.

        Sandboxes handed out stay usable and are destroyed when their block ends.
        """
        self._finalizer()
