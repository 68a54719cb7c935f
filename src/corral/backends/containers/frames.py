"""Output framing: the engines' multiplexed attach stream (8-byte frame headers)."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from ...core.output import InputFeed, OutputSink

_STREAMS = {1: "stdout", 2: "stderr"}


def _write_frames(buffer: bytes, sink: OutputSink) -> bytes:
    """Hand the whole frames in ``buffer`` to ``sink``; what is left of a partial one."""
    while len(buffer) >= 8:
        kind, size = struct.unpack(">BxxxL", buffer[:8])
        if len(buffer) < 8 + size:
            break
        sink.write(_STREAMS.get(kind, "stdout"), buffer[8 : 8 + size])
        buffer = buffer[8 + size :]
    return buffer


_KILL_AGAIN = 0.25  # seconds between kills of a stopped exec whose stream goes on


def read_frames(
    sock: socket.socket,
    sink: OutputSink,
    deadline: float | None,
    on_timeout: Callable[[], None],
    initial: bytes = b"",
    *,
    raw: bool = False,
) -> bool:
    """Demultiplex an attached exec stream into ``sink`` until EOF; True if it timed out.

    Frames are an 8-byte header (stream, 0, 0, 0, big-endian size) and the payload.
    ``initial`` is what was read from the stream before (with the HTTP upgrade). On
    the deadline or a cancel, ``on_timeout`` kills the command, and reading goes on
    briefly so the output produced until then is kept. A ``raw`` stream (a tty exec's)
    has no frames: every byte is the terminal's, reported as stdout.
    """

    def take(buffer: bytes) -> bytes:
        if raw:
            sink.write("stdout", buffer)
            return b""
        return _write_frames(buffer, sink)

    buffer = take(initial)
    timed_out = False
    grace_end: float | None = None
    next_kill = 0.0
    while True:
        now = time.monotonic()
        if not timed_out and (sink.cancelled or (deadline is not None and now >= deadline)):
            timed_out = True
            grace_end = now + 5
        if timed_out and now >= next_kill:
            # Again until the stream ends: a cancel that comes as the exec starts can
            # find its process not yet there, or not yet carrying its marker.
            on_timeout()
            next_kill = now + _KILL_AGAIN
        if grace_end is not None and now >= grace_end:
            break
        wait = 0.05
        if deadline is not None and not timed_out:
            wait = min(wait, max(deadline - now, 0))
        ready, _, _ = select.select([sock], [], [], wait)
        if not ready:
            continue
        try:
            chunk = sock.recv(256 * 1024)
        except (ConnectionResetError, OSError):
            break
        if not chunk:
            break
        buffer = take(buffer + chunk)
    return timed_out


def feed_stdin(sock: socket.socket, data: bytes | None) -> threading.Thread | None:
    """Send stdin on the attached socket, then half-close it so the command sees EOF."""
    if data is None:
        return None

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def feed_input(
    sock: socket.socket, feed: InputFeed, ended: threading.Event, *, tty: bool = False
) -> threading.Thread:
    """Copy stdin as it comes (a spawned process's) to the attached socket until the
    feed's end of file, then half-close it so the command sees EOF; stop once the
    command ended (``ended``). On a terminal, EOF is the terminal's own (Ctrl-D) too:
    the engines do not pass a half-close on to a tty."""

    def send() -> None:
        with contextlib.suppress(OSError):
            while not ended.is_set():
                data = feed.read(timeout=0.05)
                if data is None:
                    continue
                if not data:
                    if tty:
                        sock.sendall(b"\x04")
                    sock.shutdown(socket.SHUT_WR)
                    return
                sock.sendall(data)

    thread = threading.Thread(target=send, name="corral-exec-stdin", daemon=True)
    thread.start()
    return thread


def exit_code_for_start_failure(code: int, output: bytes) -> int:
    """The runtime reports a missing command as 126; shells and corral say 127."""
    text = output.lower()
    if code == 126 and (b"no such file or directory" in text or b"not found" in text):
        return 127
    return code
