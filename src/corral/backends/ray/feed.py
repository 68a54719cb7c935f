"""Streams between a node and a driver that polls: output and archives out, archives in.

Ray has no stream a driver can push into an actor, and its generators give a node no
way to learn that their reader went away. So a stream here is a buffer on the node
that a driver empties call by call (each call waits until there is something, or a
short while), and that a driver fills call by call for uploads. Both are bounded in
bytes: a producer that runs ahead waits, as it would on a full pipe. A stream whose
driver stops calling is abandoned once that driver's Ray job is dead (``Leases``).
"""

from __future__ import annotations

import collections
import io
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Abandoned", "Feed", "Intake", "Leases"]

_UNSET = object()


class Abandoned(Exception):
    """The driver of a stream is gone; what feeds or reads it stops."""


class Feed:
    """Items a node thread produces and a driver takes, ``limit`` bytes at most held."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cancelled = threading.Event()  # the driver asked to stop, or is gone
        self._cond = threading.Condition()
        self._items: collections.deque[tuple[Any, int]] = collections.deque()
        self._held = 0
        self._end: Any = _UNSET
        self.abandoned = False
        self.dropped = False  # output past the cap let go on the node (nobody streamed it)
        self.touched = time.monotonic()

    def put(self, item: Any, size: int) -> None:
        """Add ``item`` (``size`` bytes), waiting while the feed is full; raises
        Abandoned once the driver is gone."""
        with self._cond:
            while self._held and self._held + size > self.limit and not self.abandoned:
                self._cond.wait(0.5)
            if self.abandoned:
                raise Abandoned
            self._items.append((item, size))
            self._held += size
            self._cond.notify_all()

    def finish(self, end: Any) -> None:
        """The last word: what the driver gets once it has taken every item."""
        with self._cond:
            self._end = end
            self._cond.notify_all()

    def take(self, wait: float, most: int, linger: float = 0.01) -> tuple[list[Any], Any]:
        """Items up to ``most`` bytes (at least one), waiting up to ``wait`` seconds for
        the first and then ``linger`` more for the end (a quick command's output and
        its end travel in one reply); and the end once every item is taken (``None``
        before)."""
        deadline = time.monotonic() + wait
        with self._cond:
            self.touched = time.monotonic()
            while not self._items and self._end is _UNSET:
                left = deadline - time.monotonic()
                if left <= 0:
                    return [], None
                self._cond.wait(left)
            settle = time.monotonic() + linger
            while self._end is _UNSET and self._held < most and time.monotonic() < settle:
                self._cond.wait(settle - time.monotonic())
            items: list[Any] = []
            taken = 0
            while self._items and (not items or taken + self._items[0][1] <= most):
                item, size = self._items.popleft()
                items.append(item)
                taken += size
            self._held -= taken
            self._cond.notify_all()
            self.touched = time.monotonic()
            end = self._end if not self._items and self._end is not _UNSET else None
            return items, end

    def abandon(self) -> None:
        with self._cond:
            self.abandoned = True
            self.cancelled.set()
            self._cond.notify_all()


class Intake(io.RawIOBase):
    """A file a node thread reads (an archive going in) while the driver sends chunks."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self._cond = threading.Condition()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._held = 0
        self._ended = False
        self.abandoned = False
        self.touched = time.monotonic()

    def feed(self, data: bytes, last: bool) -> None:
        """Add a chunk from the driver, waiting while the reader is ``limit`` behind."""
        with self._cond:
            self.touched = time.monotonic()
            while self._held and self._held + len(data) > self.limit and not self.abandoned:
                self._cond.wait(0.5)
            if data:
                self._chunks.append(data)
                self._held += len(data)
            self._ended = self._ended or last
            self._cond.notify_all()

    def abandon(self) -> None:
        with self._cond:
            self.abandoned = True
            self._cond.notify_all()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        with self._cond:
            while not self._chunks and not self._ended:
                if self.abandoned:
                    raise Abandoned
                self._cond.wait(0.5)
            if not self._chunks:
                return 0
            chunk = self._chunks.popleft()
            n = min(len(view), len(chunk))
            view[:n] = chunk[:n]
            if n < len(chunk):
                self._chunks.appendleft(chunk[n:])
            self._held -= n
            self._cond.notify_all()
            return n


class Leases:
    """Which streams' drivers are gone: a stream not polled for ``grace`` seconds is
    abandoned once its driver's Ray job is dead (a slow reader of a live driver only
    slows its command, as a full pipe would)."""

    def __init__(self, job_dead: Callable[[str], bool], grace: float = 10.0) -> None:
        self._job_dead = job_dead
        self.grace = grace

    def expired(self, touched: float, job: str) -> bool:
        if time.monotonic() - touched < self.grace:
            return False
        try:
            return self._job_dead(job)
        except Exception:  # the head not answering says nothing of the driver
            return False
