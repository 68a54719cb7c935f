"""The output sink the core hands every exec: bounded capture and live streaming."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .results import OutputChunk

__all__ = ["OutputSink"]


class OutputSink:
    """Collects a command's output up to ``max_output`` bytes per stream.

    Backends call ``write`` as bytes arrive (from any thread) and must keep draining
    the command's pipes after the cap is hit, so the command is never blocked by a
    full pipe; bytes past the cap are dropped and ``truncated`` is set. ``on_chunk``
    sees every chunk as it comes, past the cap too (streaming shows all the output
    while the result keeps a bounded copy). ``cancel()`` asks the backend to stop the
    command, as a timeout would; so does setting ``cancel``, an event the caller owns.
    """

    def __init__(
        self,
        max_output: int,
        on_chunk: Callable[[OutputChunk], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.max_output = max_output
        self.truncated = False
        self._on_chunk = on_chunk
        self._parts: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self._sizes = {"stdout": 0, "stderr": 0}
        self._lock = threading.Lock()
        # A caller's own event (corral.aio's cancellation) or one of the sink's.
        self._cancelled = threading.Event() if cancel is None else cancel

    def write(self, stream: str, data: bytes) -> None:
        if not data:
            return
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
        return self._cancelled.is_set()

    def wait_cancelled(self, timeout: float | None) -> bool:
        """Sleep up to ``timeout`` seconds, waking early when cancelled."""
        return self._cancelled.wait(timeout)
