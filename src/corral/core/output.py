"""The output sink the core hands every exec: bounded capture and live streaming."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from .results import OutputChunk

__all__ = ["InputFeed", "OutputSink"]


class OutputSink:
    """Collects a command's output up to ``max_output`` bytes per stream.

    Backends call ``write`` as bytes arrive (from any thread) and must keep draining
    the command's pipes after the cap is hit, so the command is never blocked by a
    full pipe; bytes past the cap are dropped and ``truncated`` is set. ``on_chunk``
    sees every chunk as it comes, past the cap too (streaming shows all the output
    while the result keeps a bounded copy). ``cancel()`` asks the backend to stop the
    command, as a timeout would; so does setting ``cancel``, an event the caller owns.

    ``idle_timeout``: the sink reads as cancelled once no output came for that many
    seconds (``idle``). Backends poll ``cancelled`` while a command runs, so every
    backend enforces it without knowing of it.
    """

    def __init__(
        self,
        max_output: int,
        on_chunk: Callable[[OutputChunk], None] | None = None,
        cancel: threading.Event | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.max_output = max_output
        self.truncated = False
        self._on_chunk = on_chunk
        self._parts: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self._sizes = {"stdout": 0, "stderr": 0}
        self._lock = threading.Lock()
        # A caller's own event (corral.aio's cancellation) or one of the sink's.
        self._cancelled = threading.Event() if cancel is None else cancel
        self.idle_timeout = idle_timeout
        self._last_output = time.monotonic()
        self.idle = False  # the idle timeout fired

    def write(self, stream: str, data: bytes) -> None:
        if not data:
            return
        self._last_output = time.monotonic()
        with self._lock:
            room = self.max_output - self._sizes[stream]
            kept = data if len(data) <= room else data[: max(room, 0)]
            if len(kept) < len(data):
                self.truncated = True
            if kept:
                self._parts[stream].append(kept)
                self._sizes[stream] += len(kept)
        if self._on_chunk is not None:
            self._on_chunk(OutputChunk(stream, data))  # type: ignore[arg-type]

    def value(self, stream: str) -> bytes:
        with self._lock:
            return b"".join(self._parts[stream])

    @property
    def watched(self) -> bool:
        """Whether someone streams the chunks (so output past the cap still matters:
        a backend that ships output elsewhere may drop it when nobody does)."""
        return self._on_chunk is not None

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        if self._cancelled.is_set() or self.idle:
            return True
        if self.idle_timeout is not None:
            self.idle = time.monotonic() - self._last_output >= self.idle_timeout
        return self.idle

    def wait_cancelled(self, timeout: float | None) -> bool:
        """Sleep up to ``timeout`` seconds, waking early when cancelled."""
        return self._cancelled.wait(timeout)


class InputFeed:
    """A command's standard input as it comes, for a command that runs while it is fed
    (a spawned process): the keeper ``write``s, the backend's exec ``read``s and copies
    to the command, and ``close`` is its end of file. Bounded: a writer waits while
    ``limit`` bytes are unread, as on a full pipe."""

    def __init__(self, limit: int = 1024 * 1024) -> None:
        self._parts: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._limit = limit
        self._closed = False
        self._changed = threading.Condition()

    def write(self, data: bytes, timeout: float | None = None) -> bool:
        """Queue ``data``; False when the feed is closed or stayed full for ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(
                lambda: self._closed or self._size < self._limit, timeout
            ):
                return False
            if self._closed:
                return False
            if data:
                self._parts.append(data)
                self._size += len(data)
                self._changed.notify_all()
            return True

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def read(self, timeout: float | None = None) -> bytes | None:
        """The next bytes; ``b""`` at end of file; None when none came within ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._parts or self._closed, timeout):
                return None
            if not self._parts:
                return b""
            data = self._parts.popleft()
            self._size -= len(data)
            self._changed.notify_all()
            return data
