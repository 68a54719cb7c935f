"""Output framing: the engines' multiplexed attach stream (8-byte frame headers)."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from ...core.output import OutputSink

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


def read_frames(
    sock: socket.socket,
    sink: OutputSink,
    deadline: float | None,
    on_timeout: Callable[[], None],
    initial: bytes = b"",
) -> bool:
    """Demultiplex an attached exec stream into ``sink`` until EOF; True if it timed out.

    Frames are an 8-byte header (stream, 0, 0, 0, big-endian size) and the payload.
    ``initial`` is what was read from the stream before (with the HTTP upgrade). On
    the deadline or a cancel, ``on_timeout`` kills the command, and reading goes on
    briefly so the output produced until then is kept.
    """
    buffer = _write_frames(initial, sink)
    timed_out = False
    grace_end: float | None = None
    while True:
        now = time.monotonic()
        if not timed_out and (sink.cancelled or (deadline is not None and now >= deadline)):
            timed_out = True
            on_timeout()
            grace_end = now + 5
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
        buffer = _write_frames(buffer + chunk, sink)
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


def exit_code_for_start_failure(code: int, output: bytes) -> int:
    """The runtime reports a missing command as 126; shells and corral say 127."""
    text = output.lower()
    if code == 126 and (b"no such file or directory" in text or b"not found" in text):
        return 127
    return code
