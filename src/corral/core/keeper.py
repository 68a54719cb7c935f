"""The keeper: a process of corral's that runs a sandbox's spawned processes.

A spawned process must outlive the program that started it, and be found again by
another (``corral.attach``), so no caller can hold it. One keeper per sandbox and host
holds them all: it runs each through the backend's ordinary ``exec`` in a thread (so an
exec's guarantees hold: its whole tree dies with it, timeouts, OOM accounting), feeds
its stdin from an ``InputFeed``, and writes its output, capped per stream, to a file of
frames in the sandbox's process folder, where any reader finds it. Callers talk to it
over a Unix socket in that folder (``processes.py`` is their side), private to the
user: the folder is 0700.

It is started by the first ``spawn`` (``python -m corral.core.keeper FOLDER``, the
backend's class and settings pickled on stdin), leaves its caller at once (a double
fork, so no zombie is left to the caller), and holds ``keeper.lock`` for its whole
life: a second keeper of the same folder sees it held and leaves. It ends once no
process of its own ran for ``LINGER`` seconds, or when told to (``Sandbox.close``).
It is never a daemon left behind: with nothing running, it goes.

Deadlines are the keeper's, not the exec's: the call's ``timeout``, the idle timeout
(the sink's own), and the sandbox's lifetime, read again from the backend when it
passes, so that ``Sandbox.extend`` moves it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import shutil
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from .backend import Backend
from .errors import ConflictError, InternalError, NotFoundError, SandboxError
from .output import InputFeed, OutputSink
from .results import ExecResult, OutputChunk, ProcessInfo, ProcessRead
from .spec import ExecRequest

# Seconds a keeper with nothing running waits for the next spawn (tests shorten it).
LINGER = float(os.environ.get("CORRAL_KEEPER_LINGER", "30"))
_TICK = 0.1  # how often deadlines are checked
_READ_LIMIT = 1024 * 1024  # output bytes per read answer
_WRITE_WAIT = 30.0  # how long a write waits for room in a full stdin
# The longest an exec may run as the backend sees it: the keeper's own deadlines end
# it (the lifetime, moved by extend), so the backend's must never come first.
_BACKSTOP = 30 * 86400.0

# What a keeper that decided to leave answers a spawn: the caller starts another.
LEAVING = "corral's keeper of this sandbox is leaving"

STREAMS = {"stdout": b"O", "stderr": b"E"}
_NAMES = {v: k for k, v in STREAMS.items()}
_FRAME = struct.Struct(">cI")


def frames(data: bytes, offset: int, limit: int) -> tuple[list[OutputChunk], int]:
    """The whole frames of ``data`` (an output file's bytes from ``offset``), up to about
    ``limit`` bytes, and the offset after the last one (a frame being written is left)."""
    chunks: list[OutputChunk] = []
    at = 0
    while at + _FRAME.size <= len(data) and at < limit:
        kind, size = _FRAME.unpack_from(data, at)
        end = at + _FRAME.size + size
        if end > len(data):
            break
        chunks.append(OutputChunk(_NAMES[kind], data[at + _FRAME.size : end]))  # type: ignore[arg-type]
        at = end
    return chunks, offset + at


def read_output(
    path: Path, offset: int, limit: int | None = _READ_LIMIT
) -> tuple[list[OutputChunk], int]:
    """Frames of the output file at ``path`` from ``offset``: about ``limit`` bytes, or
    all of them (None)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            # A frame is read whole: a little past the limit, so one straddling it comes.
            data = f.read() if limit is None else f.read(limit + _FRAME.size + 64 * 1024)
    except FileNotFoundError:
        return [], offset
    return frames(data, offset, len(data) if limit is None else limit)


_SUN_PATH_MAX = 107  # bytes in sockaddr_un's path, less its terminating NUL


@contextlib.contextmanager
def socket_path(folder: Path) -> Iterator[str]:
    """The address of the keeper's socket in ``folder``, for a bind or a connect. A
    temp folder may make the path longer than a Unix socket's address holds; then it
    is reached through a descriptor of the folder (``/proc/self/fd/N/keeper.sock``),
    which keeps the folder's own permissions in force (an abstract socket would not)."""
    path = str(folder / "keeper.sock")
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    fd = os.open(folder, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/keeper.sock"
    finally:
        os.close(fd)


def send(sock: socket.socket, message: Any) -> None:
    data = pickle.dumps(message)
    sock.sendall(struct.pack(">I", len(data)) + data)


def receive(sock: socket.socket) -> Any:
    head = _exactly(sock, 4)
    return pickle.loads(_exactly(sock, struct.unpack(">I", head)[0]))


def _exactly(sock: socket.socket, size: int) -> bytes:
    parts = []
    while size:
        part = sock.recv(min(size, 1 << 20))
        if not part:
            raise ConnectionError("the keeper's connection closed")
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


class _FileSink(OutputSink):
    """A sink that writes what it keeps (up to ``max_output`` per stream) to the output
    file, as frames, instead of holding it; readers wait on ``changed``."""

    def __init__(self, path: Path, max_output: int, idle_timeout: float | None) -> None:
        super().__init__(max_output, idle_timeout=idle_timeout)
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
        self.size = 0
        self.changed = threading.Condition()

    def write(self, stream: str, data: bytes) -> None:
        if not data:
            return
        self._last_output = time.monotonic()  # output past the cap still means alive
        with self._lock:
            room = max(self.max_output - self._sizes[stream], 0)
            kept = data[:room]
            if len(kept) < len(data):
                self.truncated = True
            if not kept:
                return
            self._sizes[stream] += len(kept)
            frame = _FRAME.pack(STREAMS[stream], len(kept)) + kept
            self._file.write(frame)
            self.size += len(frame)
        with self.changed:
            self.changed.notify_all()

    def close(self) -> None:
        with self._lock:
            self._file.close()


@attrs.define
class _Kept:
    """One spawned process, as its keeper holds it."""

    info: ProcessInfo
    request: ExecRequest
    folder: Path
    sink: _FileSink
    feed: InputFeed
    started: float  # time.monotonic()
    why: str | None = None  # why corral stopped it: killed, timeout, lifetime
    result: ExecResult | None = None
    error: SandboxError | None = None

    @property
    def running(self) -> bool:
        return self.result is None and self.error is None

    def wait_ended(self, timeout: float) -> None:
        with self.sink.changed:
            self.sink.changed.wait_for(lambda: not self.running, timeout)

    def stop(self, why: str) -> None:
        if self.running and self.why is None:
            self.why = why
            self.sink.cancel()


class Keeper:
    """The processes of one sandbox, and the socket their callers reach them by."""

    def __init__(self, backend: Backend, sandbox_id: str, folder: Path) -> None:
        self.backend = backend
        self.sandbox_id = sandbox_id
        self.folder = folder
        self._kept: dict[str, _Kept] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._idle_since = time.monotonic()
        self._expires: float | None = None

    # -- serving ------------------------------------------------------------------------

    def serve(self, listener: socket.socket) -> None:
        threading.Thread(target=self._watch, name="corral-keeper-deadlines", daemon=True).start()
        listener.settimeout(_TICK * 5)
        while not self._done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()
        self._stop_all("sandbox closed")

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                op, args = receive(conn)
            except (OSError, ConnectionError, pickle.UnpicklingError, ValueError):
                return
            try:
                reply: Any = ("ok", getattr(self, "op_" + op)(**args))
            except SandboxError as e:
                reply = ("error", type(e).__name__, dict(vars(e)))
            except Exception as e:  # a bug of ours: said, never a hang of the caller
                failed = InternalError(
                    f"corral's keeper failed: {e!r}",
                    backend=self.backend.name,
                    sandbox_id=self.sandbox_id,
                )
                reply = ("error", "InternalError", dict(vars(failed)))
            with contextlib.suppress(OSError):
                send(conn, reply)

    def _watch(self) -> None:
        """Deadlines, and the keeper's own end once nothing ran for LINGER seconds."""
        while not self._done.wait(_TICK):
            now = time.monotonic()
            with self._lock:
                running = [k for k in self._kept.values() if k.running]
            for kept in running:
                timeout = kept.request.timeout
                if timeout is not None and now - kept.started >= timeout:
                    kept.stop("timeout")
            if running and self._expires is not None and time.time() >= self._expires:
                self._expires = self._lifetime_end()
                if self._expires is None or time.time() >= self._expires:
                    for kept in running:
                        kept.stop("lifetime")
            with self._lock:  # decided as a spawn registers: one or the other first
                if any(k.running for k in self._kept.values()):
                    self._idle_since = now
                elif now - self._idle_since >= LINGER:
                    self._done.set()

    def _lifetime_end(self) -> float | None:
        """The sandbox's end as the backend says now (``extend`` moves it); None: gone."""
        try:
            return self.backend.inspect(self.sandbox_id)[0].expires
        except SandboxError:
            return None

    def _stop_all(self, why: str) -> None:
        with self._lock:
            running = [k for k in self._kept.values() if k.running]
        for kept in running:
            kept.stop(why)
        deadline = time.monotonic() + 10
        for kept in running:
            kept.wait_ended(deadline - time.monotonic())

    # -- operations (``op_NAME``: what a caller may ask) ---------------------------------

    def op_spawn(self, process_id: str, request: ExecRequest) -> ProcessInfo:
        if self._expires is None:  # asked once per keeper; extend's moves are seen later
            self._expires = self._lifetime_end()
            if self._expires is None:
                raise NotFoundError(
                    "the sandbox is gone", backend=self.backend.name, sandbox_id=self.sandbox_id
                )
        folder = self.folder / process_id
        # Asked again after a keeper that left before answering made it: it ran nothing.
        folder.mkdir(mode=0o700, exist_ok=True)
        info = ProcessInfo(
            id=process_id, argv=request.argv, tty=request.tty, started=time.time(), running=True
        )
        meta = {"argv": list(request.argv), "tty": request.tty, "started": info.started}
        (folder / "meta.json").write_text(json.dumps(meta))
        feed = InputFeed()
        if request.stdin:
            feed.write(request.stdin)
        sink = _FileSink(folder / "output", request.max_output, request.idle_timeout)
        kept = _Kept(info, request, folder, sink, feed, time.monotonic())
        with self._lock:
            if self._done.is_set():  # leaving: the caller starts a new keeper
                sink.close()
                shutil.rmtree(folder, ignore_errors=True)  # for the same id, asked again
                raise ConflictError(LEAVING, backend=self.backend.name, sandbox_id=self.sandbox_id)
            self._kept[process_id] = kept
            self._idle_since = time.monotonic()
        run = attrs.evolve(request, stdin=None, input=feed, name=process_id, timeout=_BACKSTOP)
        threading.Thread(
            target=self._run, args=(kept, run), name=f"corral-keeper-{process_id}", daemon=True
        ).start()
        return info

    def _run(self, kept: _Kept, request: ExecRequest) -> None:
        try:
            status = self.backend.exec(self.sandbox_id, request, kept.sink)
        except Exception as e:
            self._failed(kept, e)
        else:
            # A kill is no timeout; a timeout is the idle one, the lifetime or the call's.
            timed_out = status.timed_out and kept.why != "killed"
            why = None
            if timed_out:
                why = "idle_timeout" if kept.sink.idle else kept.why or "timeout"
            record = {
                "exit_code": status.exit_code,
                "duration": time.monotonic() - kept.started,
                "timed_out": timed_out,
                "oom_killed": status.oom_killed,
                "truncated": kept.sink.truncated,
                "signal": status.signal,
                "oom_events": status.oom_events,
                "timed_out_by": why,
            }
            try:
                _write_json(kept.folder / "result.json", record)
                kept.result = result_of(record, kept.folder / "output")
            except Exception as e:  # never a process that runs forever in the books
                self._failed(kept, e)
        finally:
            kept.feed.close()
            kept.sink.close()
            with kept.sink.changed:
                kept.sink.changed.notify_all()

    @staticmethod
    def _failed(kept: _Kept, e: Exception) -> None:
        error = e if isinstance(e, SandboxError) else InternalError(f"the exec failed: {e!r}")
        kept.error = error
        with contextlib.suppress(OSError):
            _write_json(kept.folder / "result.json", {"error": [type(error).__name__, vars(error)]})

    def op_read(self, process_id: str, offset: int, wait: float) -> ProcessRead:
        kept = self._get(process_id)
        sink = kept.sink
        if offset < 0:
            offset = sink.size
        with sink.changed:
            sink.changed.wait_for(lambda: sink.size > offset or not kept.running, wait)
        chunks: list[OutputChunk] = []
        after = offset
        if offset < sink.size:
            chunks, after = read_output(kept.folder / "output", offset)
        if kept.error is not None:
            raise kept.error
        ended = not kept.running and after >= sink.size
        return ProcessRead(tuple(chunks), after, kept.result if ended else None)

    def op_write(self, process_id: str, data: bytes) -> None:
        kept = self._running(process_id)
        if kept.feed.closed:
            raise ConflictError(
                f"process {process_id}'s standard input is closed",
                backend=self.backend.name,
                sandbox_id=self.sandbox_id,
            )
        if not kept.feed.write(data, timeout=_WRITE_WAIT):
            raise ConflictError(
                f"process {process_id} read none of its input for {_WRITE_WAIT:.0f}s",
                backend=self.backend.name,
                sandbox_id=self.sandbox_id,
            )

    def op_close_stdin(self, process_id: str) -> None:
        self._get(process_id).feed.close()

    def op_signal(self, process_id: str, signum: int) -> None:
        self._running(process_id)
        self.backend.exec_signal(self.sandbox_id, process_id, signum)

    def op_resize(self, process_id: str, rows: int, cols: int) -> None:
        kept = self._running(process_id)
        if not kept.request.tty:
            raise ConflictError(
                f"process {process_id} has no terminal to resize (spawn it with tty=True)",
                backend=self.backend.name,
                sandbox_id=self.sandbox_id,
            )
        self.backend.exec_resize(self.sandbox_id, process_id, rows, cols)

    def op_kill(self, process_id: str) -> None:
        self._get(process_id).stop("killed")

    def op_shutdown(self) -> None:
        self._done.set()

    def _get(self, process_id: str) -> _Kept:
        with self._lock:
            kept = self._kept.get(process_id)
        if kept is None:
            raise NotFoundError(
                f"no process {process_id!r} in this sandbox",
                backend=self.backend.name,
                sandbox_id=self.sandbox_id,
            )
        return kept

    def _running(self, process_id: str) -> _Kept:
        kept = self._get(process_id)
        if not kept.running:
            raise ConflictError(
                f"process {process_id} has ended",
                backend=self.backend.name,
                sandbox_id=self.sandbox_id,
            )
        return kept


def _write_json(path: Path, record: dict[str, Any]) -> None:
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(record, default=str))
    os.replace(temp, path)


def result_of(record: dict[str, Any], output: Path) -> ExecResult:
    """The ExecResult of a process from its result record and its output file."""
    chunks, _ = read_output(output, 0, limit=None)
    out = b"".join(c.data for c in chunks if c.stream == "stdout")
    err = b"".join(c.data for c in chunks if c.stream == "stderr")
    return ExecResult(stdout=out, stderr=err, **record)


def main(folder: str) -> None:
    """``python -m corral.core.keeper FOLDER``, with (backend class, settings,
    sandbox id) pickled on stdin; says ``ready`` (or ``busy``: one runs already) on
    stdout once it listens."""
    boot = pickle.load(sys.stdin.buffer)
    if os.fork():  # the caller reaps this parent at once; the keeper is orphaned
        os._exit(0)
    path = Path(folder)
    lock = open(path / "keeper.lock", "a")  # noqa: SIM115 - held for the keeper's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("busy", flush=True)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path / "keeper.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket_path(path) as address:
        listener.bind(address)
    listener.listen(64)
    (path / "keeper.pid").write_text(str(os.getpid()))
    backend_class, settings, sandbox_id = boot
    keeper = Keeper(backend_class(settings), sandbox_id, path)
    print("ready", flush=True)
    os.dup2(os.open(os.devnull, os.O_RDWR), 1)  # the caller stops reading here
    try:
        keeper.serve(listener)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path / "keeper.sock")
        with contextlib.suppress(SandboxError):
            keeper.backend.close()


if __name__ == "__main__":
    main(sys.argv[1])
