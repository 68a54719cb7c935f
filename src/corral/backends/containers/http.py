"""The HTTP that corral speaks to a local engine's socket by hand: a wait asked before
the start, and a POST upgraded to the raw attach stream (neither client offers both)."""

from __future__ import annotations

import contextlib
import json
import socket

from ...core.errors import InternalError


class EngineWait:
    """A wait for a container's exit, asked before it starts, on a connection of its own.

    Both engines answer with the response's headers once the waiter is registered and
    send the body when the container has ended: from then on no exit can be missed,
    also when the engine removes the container at once (auto-remove), which a wait
    asked after the exit would find gone. Local engines only (a unix socket).
    """

    def __init__(self, socket_path: str, path: str, timeout: float) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(socket_path)
            self._sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n"
                "Content-Length: 0\r\n\r\n".encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = self._sock.recv(4096)
                if not chunk:
                    raise OSError("the engine closed the wait before answering")
                head += chunk
        except BaseException:
            self._sock.close()
            raise
        status, _, rest = head.partition(b"\r\n\r\n")
        if b" 200 " not in status.split(b"\r\n", 1)[0]:
            self._sock.close()
            raise InternalError(f"the engine refused the wait: {(status + rest)[:300]!r}")
        self._body = rest
        self._timeout = timeout

    def exit_code(self) -> int:
        """The container's exit status (blocks until it has ended)."""
        body = self._body
        try:
            self._sock.settimeout(self._timeout)
            while chunk := self._sock.recv(4096):  # "Connection: close": read to EOF
                body += chunk
        except OSError as e:
            raise InternalError(f"the engine did not report the command's end ({e})") from None
        finally:
            self.close()
        # The body is one JSON object, possibly in chunked encoding: the object's bytes.
        try:
            answer = json.loads(body[body.index(b"{") : body.rindex(b"}") + 1])
            return int(answer["StatusCode"])
        except (ValueError, KeyError, TypeError):
            raise InternalError(f"the engine's wait answer is unreadable: {body[:300]!r}") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


class Refused(Exception):
    """The engine answered an upgrade with an error: its status and message, which the
    adapter's error table turns into corral's error."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status}: {text}")
        self.status = status
        self.text = text


def upgrade(socket_path: str, path: str, body: bytes, timeout: float) -> socket.socket:
    """POST ``path`` (an exec start, an attach) on a connection of its own, upgraded to
    the raw stream; ``Refused`` when the engine answers with an error, OSError when it
    cannot be reached."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: engine\r\n"
            "Content-Type: application/json\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(1)  # byte by byte: the stream's first bytes follow at once
            if not chunk:
                raise InternalError("the engine closed the stream before it began")
            reply += chunk
        status = reply.split(b"\r\n", 1)[0]
        if b" 101 " not in status and b" 200 " not in status:
            raise _refused(sock, reply)
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


def _refused(sock: socket.socket, head: bytes) -> Refused:
    """The refusal of an upgrade, from the body of the engine's answer (a full disk is a
    500 whose message says so)."""
    status_line, _, headers = head.decode("latin-1").partition("\r\n")
    parts = status_line.split()
    code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 500
    length = 0
    for line in headers.split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            length = min(int(value), 64 * 1024)
    body = b""
    with contextlib.suppress(OSError):
        while len(body) < length and (chunk := sock.recv(length - len(body))):
            body += chunk
    return Refused(code, message_of(body.decode(errors="replace").strip() or status_line))


def message_of(body: str) -> str:
    """An engine's error message, from its answer's body (JSON or text)."""
    try:
        return str(json.loads(body).get("message") or body)
    except (ValueError, AttributeError):
        return body
