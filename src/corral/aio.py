"""corral for asyncio: the same API as ``corral``, awaitable, never blocking the event loop.

Every blocking call of the sync core runs in a worker thread of a pool of this module's
own (so long commands do not starve asyncio's default executor). Cancelling a task that
awaits ``exec`` or ``stream`` (or a timeout of ``asyncio.wait_for``) stops the command
inside the sandbox, and the cancellation completes only once it has stopped; the
sandbox stays usable. Other calls are not interrupted half-way: a cancelled call
finishes in its thread first, and a sandbox created by a cancelled ``create`` is closed.

A spawned process (``AsyncSandbox.spawn``) is never stopped by a cancel: cancelling a
task that awaits its ``wait()`` or iterates its ``output()`` (or ``asyncio.timeout``)
only stops the waiting; the process runs on until it ends or is killed. Those reads
wait in short steps, so a cancel never leaves a worker thread blocked for long.

Not imported by ``import corral``: ``import corral.aio``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import contextvars
import functools
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .core import lifecycle
from .core.archive import ArchiveLimits
from .core.errors import SandboxClosedError, TimeoutError
from .core.pool import Pool as SyncPool
from .core.pool import PoolStats
from .core.process import _TO_THE_END, Process
from .core.results import (
    Change,
    ExecResult,
    Health,
    OutputChunk,
    ProcessInfo,
    ProcessRead,
    ResourceUsage,
    SandboxInfo,
    SnapshotInfo,
)
from .core.sandbox import Sandbox
from .core.settings import Settings
from .core.snapshot import Snapshot
from .core.spec import SandboxSpec

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .core.options import SandboxOptions

__all__ = [
    "AsyncProcess",
    "AsyncSandbox",
    "AsyncSnapshot",
    "Pool",
    "attach",
    "create",
    "gc",
    "list",
    "run",
    "snapshots",
]

T = TypeVar("T")

log = logging.getLogger("corral")

# Threads are made on demand, so a large cap costs nothing until used; it bounds how
# many blocking calls (mostly running commands) can be in flight at once.
_MAX_WORKERS = 256
# How many output chunks a stream holds for a slow consumer before the command waits.
_STREAM_BUFFER = 64
# The longest one read of a spawned process's output waits in a worker: a cancelled
# wait() or output() is over (and its thread free) within this.
_READ_STEP = 0.25

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The worker threads of corral.aio, made on first use."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(_MAX_WORKERS, thread_name_prefix="corral-aio")
        return _executor


def _start(fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
    """Run ``fn`` in a worker thread (with the caller's context variables)."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return loop.run_in_executor(_pool(), call)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a worker's outcome as seen, so asyncio does not log an unread error."""
    if not future.cancelled():
        future.exception()


async def _settle(future: asyncio.Future[Any]) -> None:
    """Wait for a worker to finish, whatever its outcome; a further cancel ends the wait."""
    future.add_done_callback(_retrieve)
    with contextlib.suppress(Exception):
        await asyncio.shield(future)


async def _call(
    fn: Callable[..., T], *args: Any, on_cancel: Callable[[], None] | None = None, **kwargs: Any
) -> T:
    """Await ``fn`` run in a worker thread.

    On cancellation ``on_cancel`` runs (to ask the work to stop), then the worker is
    waited for, so that when the cancellation arrives the work has really ended.
    """
    future = _start(fn, *args, **kwargs)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        await _settle(future)
        raise


async def _call_owning(
    fn: Callable[..., T], *args: Any, discard: Callable[[T], None], **kwargs: Any
) -> T:
    """Await ``fn`` run in a worker thread; if the awaiter is cancelled, what ``fn``
    made anyway (a process, forks, a snapshot) goes to ``discard``, never left behind."""
    future = _start(fn, *args, **kwargs)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def discard_made(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                made = done.result()
                _pool().submit(discard, made).add_done_callback(_log_discard_failure)

        future.add_done_callback(discard_made)
        await _settle(future)
        raise


def _log_discard_failure(future: Future[Any]) -> None:
    if future.exception() is not None:
        log.error("undoing a cancelled call failed", exc_info=future.exception())


class AsyncSandbox:
    """A running sandbox for asyncio code; ``async with`` closes it on exit.

    Wraps a sync ``corral.Sandbox`` (``.sync``), which stays usable from threads.
    """

    def __init__(self, sandbox: Sandbox) -> None:
        self.sync = sandbox

    # -- identity ----------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.sync.id

    @property
    def backend_name(self) -> str:
        return self.sync.backend_name

    @property
    def spec(self) -> Any:
        return self.sync.spec

    @property
    def info(self) -> SandboxInfo:
        return self.sync.info

    @property
    def labels(self) -> dict[str, str]:
        return self.sync.labels

    @property
    def expires(self) -> float:
        return self.sync.expires

    @property
    def closed(self) -> bool:
        return self.sync.closed

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<AsyncSandbox {self.id} on {self.backend_name} ({state})>"

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            await self.close()
            return
        try:
            await self.close()
        except Exception:  # never mask the error that is already on its way out
            log.exception("closing sandbox %s failed while handling another error", self.id)

    # -- exec --------------------------------------------------------------------------

    async def exec(
        self,
        argv: Sequence[str],
        *,
        timeout: float | str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        stdin: bytes | str | None = None,
        max_output: int | str | None = None,
        idle_timeout: float | str | None = None,
    ) -> ExecResult:
        """Run ``argv`` and wait for its ExecResult; see ``corral.Sandbox.exec``.

        Cancelling the awaiting task stops the command in the sandbox (every process it
        started), and the CancelledError arrives once it has stopped.
        """
        cancel = threading.Event()
        return await _call(
            self.sync.exec,
            argv,
            timeout=timeout,
            env=env,
            workdir=workdir,
            user=user,
            stdin=stdin,
            max_output=max_output,
            idle_timeout=idle_timeout,
            cancel=cancel,
            on_cancel=cancel.set,
        )

    async def stream(
        self,
        argv: Sequence[str],
        *,
        timeout: float | str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        stdin: bytes | str | None = None,
        max_output: int | str | None = None,
        idle_timeout: float | str | None = None,
    ) -> AsyncIterator[OutputChunk | ExecResult]:
        """Like ``exec``, but yields OutputChunks as they come, then the ExecResult.

        At most a few dozen chunks wait for a slow consumer; past that the command waits,
        as it would on a full pipe. Cancelling the consumer, or closing the generator
        (``contextlib.aclosing``; a loop left with ``break`` closes it when collected),
        stops the command.
        """
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        slots = threading.Semaphore(_STREAM_BUFFER)
        events: asyncio.Queue[Any] = asyncio.Queue()
        done = object()

        def on_chunk(chunk: OutputChunk) -> None:
            # In a backend thread: wait for room, unless nobody is reading any more.
            while not slots.acquire(timeout=0.05):
                if cancel.is_set():
                    return
            try:
                loop.call_soon_threadsafe(events.put_nowait, chunk)
            except RuntimeError:  # the loop is closed: nobody will read it
                cancel.set()

        future = _start(
            self.sync.exec,
            argv,
            timeout=timeout,
            env=env,
            workdir=workdir,
            user=user,
            stdin=stdin,
            max_output=max_output,
            idle_timeout=idle_timeout,
            on_chunk=on_chunk,
            cancel=cancel,
        )
        # The result lands after every chunk: both come through the loop in order.
        future.add_done_callback(lambda _: events.put_nowait(done))
        try:
            while (event := await events.get()) is not done:
                slots.release()
                yield event
            yield future.result()
        finally:
            if not future.done():
                cancel.set()
            await _settle(future)

    # -- files -------------------------------------------------------------------------

    async def write_file(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` inside the sandbox; see ``Sandbox.write_file``."""
        await _call(self.sync.write_file, path, data, mode=mode)

    async def read_file(self, path: str, *, max_size: int = 256 * 1024**2) -> bytes:
        """The content of the file at ``path``; see ``Sandbox.read_file``."""
        return await _call(self.sync.read_file, path, max_size=max_size)

    async def upload(self, source: str | os.PathLike[str], destination: str) -> None:
        """Copy a local file or folder into the folder ``destination``; see ``Sandbox.upload``."""
        await _call(self.sync.upload, source, destination)

    async def download(
        self,
        source: str,
        destination: str | os.PathLike[str],
        *,
        limits: ArchiveLimits = ArchiveLimits(),
    ) -> Path:
        """Copy ``source`` out to a new local path; see ``Sandbox.download``."""
        return await _call(self.sync.download, source, destination, limits=limits)

    # -- state -------------------------------------------------------------------------

    async def usage(self) -> ResourceUsage:
        """What the sandbox uses now; see ``Sandbox.usage``."""
        return await _call(self.sync.usage)

    async def health(self) -> Health:
        """The state of the spec's healthcheck; see ``Sandbox.health``."""
        return await _call(self.sync.health)

    def detach(self) -> None:
        """Stop owning the sandbox; see ``Sandbox.detach``."""
        self.sync.detach()

    # -- long-lived sandboxes -----------------------------------------------------------

    async def status(self) -> str:
        """``running`` or ``paused`` (or the backend's word), as the backend says now;
        ``closed`` once closed. See ``Sandbox.status``."""
        return await _call(lambda: self.sync.status)

    async def pause(self) -> None:
        """Freeze every process of the sandbox; see ``Sandbox.pause``."""
        await _call(self.sync.pause)

    async def resume(self) -> None:
        """Thaw what ``pause()`` froze; see ``Sandbox.resume``."""
        await _call(self.sync.resume)

    async def extend(self, duration: float | str) -> float:
        """Move the sandbox's end ``duration`` later; the new end. See ``Sandbox.extend``."""
        return await _call(self.sync.extend, duration)

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        stdin: bytes | str | None = None,
        tty: bool = False,
        timeout: float | str | None = None,
        idle_timeout: float | str | None = None,
        max_output: int | str | None = None,
    ) -> AsyncProcess:
        """Start ``argv`` in the background; its ``AsyncProcess`` at once. See
        ``Sandbox.spawn``. A cancelled spawn kills the process it started anyway (the
        caller never got its handle)."""
        process = await _call_owning(
            self.sync.spawn,
            argv,
            env=env,
            workdir=workdir,
            user=user,
            stdin=stdin,
            tty=tty,
            timeout=timeout,
            idle_timeout=idle_timeout,
            max_output=max_output,
            discard=Process.kill,
        )
        return AsyncProcess(self, process)

    async def processes(self) -> builtins.list[AsyncProcess]:
        """The processes spawned in this sandbox (by any program), running or ended."""
        found = await _call(self.sync.processes)
        return [AsyncProcess(self, process) for process in found]

    async def process(self, process_id: str) -> AsyncProcess:
        """The spawned process ``process_id``; NotFoundError if the sandbox has none."""
        return AsyncProcess(self, await _call(self.sync.process, process_id))

    async def snapshot(
        self, *, memory: bool = False, lifetime: float | str | None = None
    ) -> AsyncSnapshot:
        """Capture the sandbox's files; see ``Sandbox.snapshot``. A cancelled snapshot
        is removed once taken."""
        snap = await _call_owning(
            self.sync.snapshot, memory=memory, lifetime=lifetime, discard=Snapshot.remove
        )
        return AsyncSnapshot(snap)

    async def fork(self, n: int = 1) -> builtins.list[AsyncSandbox]:
        """``n`` new sandboxes from a snapshot of this one; see ``Sandbox.fork``. Forks
        made by a cancelled call are closed."""
        forks = await _call_owning(self.sync.fork, n, discard=_close_all)
        return [AsyncSandbox(sandbox) for sandbox in forks]

    async def port(self, port: int) -> tuple[str, int]:
        """``(host, port)`` where the published ``port`` is reached; see ``Sandbox.port``."""
        return await _call(self.sync.port, port)

    async def changes(self) -> builtins.list[Change]:
        """What was added, changed and deleted since the sandbox was made; see
        ``Sandbox.changes``."""
        return await _call(self.sync.changes)

    async def close(self) -> None:
        """Destroy the sandbox and everything in it. Idempotent; a cancel waits for it."""
        await _call(self.sync.close)


def _close_all(sandboxes: builtins.list[Sandbox]) -> None:
    for sandbox in sandboxes:
        try:
            sandbox.close()
        except Exception:
            log.exception("closing sandbox %s of a cancelled fork failed", sandbox.id)


class AsyncProcess:
    """A process started by ``AsyncSandbox.spawn``; wraps a ``corral.Process`` (``.sync``).

    Cancelling ``wait()`` or an ``output()`` iteration stops the waiting, never the
    process: only ``kill()``, ``terminate()`` or ``signal()`` stop it.
    """

    def __init__(self, sandbox: AsyncSandbox, process: Process) -> None:
        self.sandbox = sandbox
        self.sync = process
        self._result: ExecResult | None = None

    @property
    def id(self) -> str:
        return self.sync.id

    @property
    def argv(self) -> tuple[str, ...]:
        return self.sync.argv

    @property
    def tty(self) -> bool:
        return self.sync.tty

    @property
    def info(self) -> ProcessInfo:
        return self.sync.info

    def __repr__(self) -> str:
        return f"<AsyncProcess {self.id} {' '.join(self.argv)!r} in sandbox {self.sandbox.id}>"

    # -- input and control --------------------------------------------------------------

    async def write(self, data: bytes | str) -> None:
        """Send ``data`` (text as UTF-8) to its standard input; see ``Process.write``."""
        await _call(self.sync.write, data)

    async def close_stdin(self) -> None:
        """End its standard input (it reads end of file)."""
        await _call(self.sync.close_stdin)

    async def resize(self, rows: int, cols: int) -> None:
        """Set the size of its terminal (spawned with ``tty=True``)."""
        await _call(self.sync.resize, rows, cols)

    async def signal(self, signum: int) -> None:
        """Send ``signum`` to the command itself (not to a shell around it)."""
        await _call(self.sync.signal, signum)

    async def kill(self) -> None:
        """Kill the process and everything it started."""
        await _call(self.sync.kill)

    async def terminate(self) -> None:
        """SIGTERM to the command, which may clean up; ``kill()`` if it must go."""
        await _call(self.sync.terminate)

    # -- output and end -------------------------------------------------------------------

    def _read(self, offset: int, wait: float) -> ProcessRead:
        """One bounded read of the output (in a worker thread)."""
        sandbox = self.sync.sandbox
        sandbox._check_open()
        return sandbox.backend.process_read(sandbox.id, self.id, offset, wait)

    async def running(self) -> bool:
        """Whether the process still runs (asks the sandbox's keeper)."""
        if self._result is not None:
            return False
        read = await _call(self._read, _TO_THE_END, 0.0)
        if read.result is not None:
            self._result = read.result
        return read.result is None

    async def wait(self, timeout: float | None = None) -> ExecResult:
        """Wait for the end and return how it ended; see ``Process.wait``. ``timeout``:
        raise ``corral.TimeoutError`` if it still runs then. Neither that nor cancelling
        the awaiting task stops the process."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._result is None:
            step = _READ_STEP if deadline is None else min(_READ_STEP, deadline - loop.time())
            read = await _call(self._read, _TO_THE_END, max(0.0, step))
            if read.result is not None:
                self._result = read.result
            elif deadline is not None and loop.time() >= deadline:
                raise self._still_running(timeout)
        return self._result

    async def output(
        self, since: Literal["start", "now"] = "start", *, timeout: float | None = None
    ) -> AsyncIterator[OutputChunk]:
        """Its output as it comes, until it ends: all of it (``start``, up to the cap)
        or from now on (``now``); see ``Process.output``. Leaving the loop, cancelling
        it or ``timeout`` (``corral.TimeoutError``) leaves the process running."""
        loop = asyncio.get_running_loop()
        offset = 0 if since == "start" else -1
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            step = _READ_STEP if deadline is None else min(_READ_STEP, deadline - loop.time())
            if step <= 0:
                raise self._still_running(timeout)
            read = await _call(self._read, offset, step)
            for chunk in read.chunks:
                yield chunk
            offset = read.offset
            if read.result is not None:
                self._result = read.result
                return

    def _still_running(self, timeout: float | None) -> TimeoutError:
        return TimeoutError(
            f"process {self.id} still runs after {timeout}s",
            backend=self.sandbox.backend_name,
            sandbox_id=self.sandbox.id,
        )


class AsyncSnapshot:
    """A captured sandbox for asyncio code; wraps a ``corral.Snapshot`` (``.sync``).
    ``corral.aio.create(image=snapshot)`` starts a sandbox from it."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.sync = snapshot

    @property
    def id(self) -> str:
        return self.sync.id

    @property
    def image(self) -> str:
        """What ``create`` takes as its image to start from this snapshot."""
        return self.sync.image

    @property
    def expires(self) -> float:
        return self.sync.expires

    @property
    def info(self) -> SnapshotInfo:
        return self.sync.info

    def __repr__(self) -> str:
        return f"<AsyncSnapshot {self.id} of sandbox {self.info.sandbox_id}>"

    async def remove(self) -> None:
        """Remove the snapshot (ConflictError while a sandbox still starts from it)."""
        await _call(self.sync.remove)


class _Handover:
    """A sandbox obtained in a worker thread, passed to its awaiter unless it gave up;
    one nobody will use goes to ``discard`` (closed, or given back to its pool)."""

    def __init__(self, discard: Callable[[Sandbox], None]) -> None:
        self.discard = discard
        self.lock = threading.Lock()
        self.abandoned = False
        self.sandbox: Sandbox | None = None

    def run(self, obtain: Callable[..., Sandbox], *args: Any, **kwargs: Any) -> Sandbox | None:
        """In the worker: obtain a sandbox, then hand it over or discard it."""
        sandbox = obtain(*args, **kwargs)
        with self.lock:
            if not self.abandoned:
                self.sandbox = sandbox
                return sandbox
        self.discard(sandbox)
        return None

    def abandon(self) -> None:
        """The awaiter was cancelled: discard the sandbox, now or once it exists."""
        with self.lock:
            self.abandoned = True
            sandbox, self.sandbox = self.sandbox, None
        if sandbox is not None:
            _pool().submit(self.discard, sandbox).add_done_callback(_log_failure)


def _log_failure(future: Future[Any]) -> None:
    if future.exception() is not None:
        log.error("closing an abandoned sandbox failed", exc_info=future.exception())


async def _obtain(
    obtain: Callable[..., Sandbox],
    discard: Callable[[Sandbox], None],
    *args: Any,
    stop: Callable[[], None] | None = None,
    **kwargs: Any,
) -> Sandbox:
    """``obtain`` in a worker; on cancellation ``stop`` asks it to give up, and what it
    obtained anyway goes to ``discard``."""
    handover = _Handover(discard)

    def cancelled() -> None:
        handover.abandon()
        if stop is not None:
            stop()

    sandbox = await _call(handover.run, obtain, *args, on_cancel=cancelled, **kwargs)
    assert sandbox is not None  # only an abandoned handover gives None
    return sandbox


async def create(
    image: str | None = None,
    *,
    backend: str | None = None,
    spec: SandboxSpec | None = None,
    settings: Settings | None = None,
    **options: Unpack[SandboxOptions],
) -> AsyncSandbox:
    """Create and start a sandbox; the keywords are those of ``corral.create``.

    Use the result with ``async with``. If the awaiting task is cancelled, the creation
    finishes in its thread and the new sandbox is closed, not leaked. ``image`` may be
    an ``AsyncSnapshot`` (or a ``corral.Snapshot``): the sandbox starts from it.
    """
    start: Any = image.sync if isinstance(image, AsyncSnapshot) else image
    sandbox = await _obtain(
        lifecycle.create,
        Sandbox.close,
        start,
        backend=backend,
        spec=spec,
        settings=settings,
        **options,
    )
    return AsyncSandbox(sandbox)


async def run(
    argv: Sequence[str],
    image: str | None = None,
    *,
    timeout: float | str | None = None,
    stdin: bytes | str | None = None,
    max_output: int | str | None = None,
    idle_timeout: float | str | None = None,
    on_chunk: Callable[[OutputChunk], None] | None = None,
    backend: str | None = None,
    spec: SandboxSpec | None = None,
    settings: Settings | None = None,
    **options: Unpack[SandboxOptions],
) -> ExecResult:
    """Run ``argv`` in a fresh sandbox and remove it; see ``corral.run`` (same keywords,
    but for ``cancel``).

    Cancelling the awaiting task stops the command, and the CancelledError arrives once
    the sandbox is gone.
    """
    if "cancel" in options:
        raise TypeError("corral.aio.run is stopped by cancelling its task, not by an event")
    cancel = threading.Event()
    return await _call(
        lifecycle.run,
        argv,
        image,
        timeout=timeout,
        stdin=stdin,
        max_output=max_output,
        idle_timeout=idle_timeout,
        on_chunk=on_chunk,
        cancel=cancel,
        backend=backend,
        spec=spec,
        settings=settings,
        on_cancel=cancel.set,
        **options,
    )


class Pool:
    """A warm pool for asyncio code: the same pool as ``corral.Pool``, awaited.

    ``async with corral.aio.Pool(4, backend="docker", image=...) as pool:`` starts it
    (in a worker thread: the backend is checked and the refill thread started) and
    closes it at the end; ``async with pool.acquire() as sandbox:`` hands out an
    ``AsyncSandbox``, destroyed when the block ends. A task cancelled while waiting for
    a sandbox takes none: one handed over too late goes back to be destroyed.
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
        **options: Unpack[SandboxOptions],
    ) -> None:
        self.size = size
        self._keywords: dict[str, Any] = {
            "backend": backend,
            "settings": settings,
            "on_empty": on_empty,
            "acquire_timeout": acquire_timeout,
            "image": image,
            "spec": spec,
            **options,
        }
        self.sync: SyncPool | None = None

    def __repr__(self) -> str:
        return repr(self.sync) if self.sync is not None else "<Pool (not started)>"

    async def start(self) -> Pool:
        """Make the pool (idempotent); ``async with`` calls this."""
        if self.sync is None:
            self.sync = await _call(SyncPool, self.size, **self._keywords)
        return self

    async def __aenter__(self) -> Pool:
        return await self.start()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            await self.close()
            return
        try:
            await self.close()
        except Exception:  # never mask the error that is already on its way out
            log.exception("closing a pool failed while handling another error")

    def _started(self) -> SyncPool:
        if self.sync is None:
            raise SandboxClosedError("this pool was not started: use `async with` or start()")
        return self.sync

    @contextlib.asynccontextmanager
    async def acquire(self, timeout: float | None = None) -> AsyncIterator[AsyncSandbox]:
        """Hand out a ready sandbox for one ``async with`` block; see ``corral.Pool.acquire``."""
        pool = self._started()
        cancel = threading.Event()

        def stop_waiting() -> None:
            cancel.set()
            pool.wake()

        sandbox = await _obtain(
            pool.take, pool.give_back, timeout, cancel=cancel, stop=stop_waiting
        )
        try:
            yield AsyncSandbox(sandbox)
        except BaseException:
            await _settle(_start(pool.give_back, sandbox))  # never mask the error
            raise
        await _call(pool.give_back, sandbox, raise_errors=True)

    def stats(self) -> PoolStats:
        """Counts of ready, in-use, created and destroyed sandboxes; see ``corral.Pool``."""
        return self._started().stats()

    async def close(self) -> None:
        """Stop refilling and destroy every ready sandbox. Idempotent."""
        if self.sync is not None:
            await _call(self.sync.close)


async def attach(
    sandbox_id: str, *, backend: str | None = None, settings: Settings | None = None
) -> AsyncSandbox:
    """A handle on a sandbox made elsewhere; see ``corral.attach``."""
    sandbox = await _call(lifecycle.attach, sandbox_id, backend=backend, settings=settings)
    return AsyncSandbox(sandbox)


async def list(
    *, backend: str | None = None, settings: Settings | None = None
) -> builtins.list[SandboxInfo]:
    """Every sandbox corral made on the backend; see ``corral.list``."""
    return await _call(lifecycle.list_sandboxes, backend=backend, settings=settings)


async def gc(
    *, backend: str | None = None, settings: Settings | None = None, everything: bool = False
) -> builtins.list[str]:
    """Remove expired sandboxes (all of corral's with ``everything``); see ``corral.gc``."""
    return await _call(lifecycle.gc, backend=backend, settings=settings, everything=everything)


async def snapshots(
    *, backend: str | None = None, settings: Settings | None = None
) -> builtins.list[AsyncSnapshot]:
    """Every snapshot corral took on the backend; see ``corral.snapshots``."""
    found = await _call(lifecycle.snapshots, backend=backend, settings=settings)
    return [AsyncSnapshot(snap) for snap in found]
