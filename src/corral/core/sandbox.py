"""The Sandbox users hold: exec, stream, files, usage and close, routed through the hooks."""

from __future__ import annotations

import contextlib
import enum
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from . import archive, capacity
from ._log import log
from .backend import Backend, ExecStatus
from .errors import ConfigError, SandboxClosedError
from .output import OutputSink
from .plugins import PluginHost
from .results import ExecResult, Health, OutputChunk, ResourceUsage, SandboxInfo
from .settings import Settings
from .spec import ExecRequest, SandboxSpec
from .transfer import FileTransfer, Transferred

# deferred: pathlib costs ~5 ms at `import corral`; only an annotation here.
if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["Sandbox", "SandboxState"]

LABEL_PREFIX = "corral."


def _warn_unclosed(sandbox_id: str) -> None:
    warnings.warn(
        f"sandbox {sandbox_id} was never closed; use it as a context manager or call close()",
        ResourceWarning,
        stacklevel=2,
    )


class SandboxState(enum.Enum):
    """Where a Sandbox handle is in its life. The transitions, all under the handle's lock:

    - PENDING -> RUNNING: first use of ``corral.run``'s sandbox (a plugin's created hook
      writing a file, say) has the backend make it; ``create``'s start RUNNING.
    - PENDING -> RUNNING -> SPENT: ``corral.run``'s own command, made, run and removed
      by the backend in one call (``run_once``).
    - PENDING, RUNNING or SPENT -> CLOSING: ``close()`` began; observers of
      ``corral_sandbox_destroying`` may still use a sandbox that was RUNNING.
    - CLOSING -> CLOSED: the backend is asked to destroy what it holds; the handle
      refuses every use from here.
    """

    PENDING = "pending"  # corral.run's: the backend makes it on first use
    RUNNING = "running"  # the backend holds it: close() destroys it
    SPENT = "spent"  # run_once made, ran and removed it: nothing left to destroy
    CLOSING = "closing"  # close() began: usable still, until the destroy
    CLOSED = "closed"


_OPEN = frozenset({SandboxState.PENDING, SandboxState.RUNNING, SandboxState.SPENT})


class Sandbox:
    """A running sandbox. Use it as a context manager; ``close()`` removes it.

    Thread-safe: several threads may exec in one sandbox at once.
    """

    def __init__(
        self,
        *,
        sandbox_id: str,
        backend: Backend,
        spec: SandboxSpec,
        info: SandboxInfo,
        host: PluginHost,
        settings: Settings,
        pending: bool = False,
    ) -> None:
        self.id = sandbox_id
        self.backend = backend
        self.spec = spec
        self.info = info
        self._host = host
        self._settings = settings
        # corral.run's sandbox is PENDING: the backend makes it with its one command
        # (run_once) unless something uses it first (a plugin's created hook).
        self._state = SandboxState.PENDING if pending else SandboxState.RUNNING
        # Held while the state changes, and while the backend makes a pending sandbox,
        # so that a close() waits for a create in flight instead of racing it.
        self._lock = threading.RLock()
        self._one_shot: ExecRequest | None = None  # run()'s request, while it runs
        self._finalizer = weakref.finalize(self, _warn_unclosed, sandbox_id)

    # -- identity ----------------------------------------------------------------------

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.info.labels)

    @property
    def expires(self) -> float:
        return self.info.expires

    @property
    def state(self) -> SandboxState:
        """Where this handle is in its life (see SandboxState for the transitions)."""
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is SandboxState.CLOSED

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} on {self.backend_name} ({self._state.value})>"

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # never mask the error that is already on its way out
            log.exception("closing sandbox %s failed while handling another error", self.id)

    def _check_open(self) -> None:
        if self._state is SandboxState.CLOSED:
            raise SandboxClosedError(
                "this sandbox is closed", backend=self.backend_name, sandbox_id=self.id
            )

    def _ready(self) -> None:
        """Open, and made by the backend (a pending sandbox is made on first use)."""
        self._check_open()
        if self._state is SandboxState.PENDING:
            with self._lock:
                if self._state is SandboxState.PENDING:
                    # RUNNING first: from here, close() destroys whatever was made.
                    self._state = SandboxState.RUNNING
                    self.backend.create(self.id, self.spec, self.info.labels)

    def _backend_exec(self, request: ExecRequest, sink: OutputSink) -> ExecStatus:
        """The backend's run of one command; the core's ``corral_exec`` calls this."""
        with self._lock:
            # run()'s own command only: another one (a plugin's, in its wrapper) gets
            # the sandbox made and runs as an exec.
            one_shot = self._state is SandboxState.PENDING and request is self._one_shot
            if one_shot:
                self._state = SandboxState.RUNNING
        if not one_shot:
            self._ready()
            return self.backend.exec(self.id, request, sink)
        status = self.backend.run_once(self.id, self.spec, self.info.labels, request, sink)
        # run_once removed it. (When it raised, close() still asks for a destroy: it is
        # idempotent, and a backend that broke mid-way may have left something.)
        with self._lock:
            if self._state is SandboxState.RUNNING:
                self._state = SandboxState.SPENT
        return status

    def _run_once(
        self,
        argv: Sequence[str],
        *,
        timeout: float | str | None,
        stdin: bytes | str | None,
        max_output: int | str | None,
        idle_timeout: float | str | None,
        on_chunk: Callable[[OutputChunk], None] | None,
        cancel: threading.Event | None,
    ) -> ExecResult:
        """``corral.run``: the one command of a pending sandbox, through ``corral_exec``."""
        request = self._request(
            argv, timeout=timeout, stdin=stdin, max_output=max_output, idle_timeout=idle_timeout
        )
        sink = self._sink(request, on_chunk=on_chunk, cancel=cancel)
        self._one_shot = request
        try:
            return self._host.hooks.exec(self, request, sink)
        finally:
            self._one_shot = None

    # -- exec --------------------------------------------------------------------------

    def _request(
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
    ) -> ExecRequest:
        """The checked request of one command: exec's options (``options.EXEC``), the
        sandbox's own variables under the command's, a timeout within its lifetime."""
        self._check_open()
        remaining = self.expires - time.time()
        if remaining <= 0:
            raise SandboxClosedError(
                "this sandbox's lifetime is over", backend=self.backend_name, sandbox_id=self.id
            )
        # The ignores: mypy takes a field made by spec's helpers (duration_field,
        # size_field) for a default of the annotated type, while the converter takes
        # "30s" and "4MiB" as well.
        request = ExecRequest(
            argv=argv,
            env={**self.spec.network.proxy_env(), **self.spec.env, **(env or {})},
            workdir=workdir,
            user=user,
            stdin=stdin,
            timeout=timeout,  # type: ignore[arg-type]
            max_output=self._settings.max_output if max_output is None else max_output,  # type: ignore[arg-type]
            idle_timeout=idle_timeout,  # type: ignore[arg-type]
        )
        # A command never outlives its sandbox.
        if request.timeout is None or request.timeout > remaining:
            request = attrs.evolve(request, timeout=remaining)
        return request

    def exec(
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
        on_chunk: Callable[[OutputChunk], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> ExecResult:
        """Run ``argv`` (a list; never a string, there is no implicit shell) and wait.

        Args:
            argv: the program and its arguments.
            timeout: seconds (or "30s"); on expiry every process the command started
                is killed and the result has ``timed_out`` set, with the output so far.
            env: variables added to the sandbox's own for this command.
            workdir: absolute folder to run in (default: the sandbox's workdir).
            user: ``uid[:gid]`` or a name, where the backend supports it.
            stdin: bytes (or text, sent as UTF-8) fed to the command.
            max_output: cap per stream; output past it is dropped, ``truncated`` set.
            idle_timeout: seconds (or "30s") the command may print nothing; then it is
                stopped as on ``timeout``, and ``timed_out_by`` says ``idle_timeout``.
            on_chunk: called (from a backend thread) with each OutputChunk as it comes.
            cancel: an event another thread may set to stop the command, as a timeout
                would (the result then has ``timed_out`` set); used by ``corral.aio``.

        Raises:
            ConfigError: bad argv, env or paths (nothing ran).
            SandboxClosedError: the sandbox was closed.
        """
        request = self._request(
            argv,
            timeout=timeout,
            env=env,
            workdir=workdir,
            user=user,
            stdin=stdin,
            max_output=max_output,
            idle_timeout=idle_timeout,
        )
        sink = self._sink(request, on_chunk=on_chunk, cancel=cancel)
        return self._host.hooks.exec(self, request, sink)

    @staticmethod
    def _sink(
        request: ExecRequest,
        *,
        on_chunk: Callable[[OutputChunk], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> OutputSink:
        return OutputSink(
            request.max_output,
            on_chunk=on_chunk,
            cancel=cancel,
            idle_timeout=request.idle_timeout,
        )

    def stream(
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
    ) -> Generator[OutputChunk | ExecResult, None, None]:
        """Like ``exec``, but yields OutputChunks as they come, then the ExecResult.

        Leaving the loop early stops the command.
        """
        import queue  # deferred: only streaming needs it (~1 ms at `import corral`)

        request = self._request(
            argv,
            timeout=timeout,
            env=env,
            workdir=workdir,
            user=user,
            stdin=stdin,
            max_output=max_output,
            idle_timeout=idle_timeout,
        )
        # Bounded: a slow consumer slows the command (as a pipe would) instead of
        # letting output pile up in memory.
        events: queue.Queue[Any] = queue.Queue(maxsize=256)
        sink = self._sink(request, on_chunk=events.put)
        done = object()

        def run() -> None:
            try:
                events.put(self._host.hooks.exec(self, request, sink))
            except BaseException as e:
                events.put(e)
            finally:
                events.put(done)

        worker = threading.Thread(target=run, name=f"corral-stream-{self.id}", daemon=True)
        worker.start()
        try:
            while (event := events.get()) is not done:
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            sink.cancel()
            # Keep emptying the queue so that no producer stays blocked on a full one.
            while worker.is_alive():
                with contextlib.suppress(queue.Empty):
                    events.get(timeout=0.05)

    # -- files -------------------------------------------------------------------------

    def _transfer(self, transfer: FileTransfer) -> Transferred:
        """A checked transfer through ``corral_transfer``; what it moved."""
        return self._host.hooks.transfer(self, transfer)

    def write_file(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` (absolute, inside the sandbox), replacing it."""
        self._ready()
        path = archive.check_sandbox_path(path)
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, bytes):
            raise ConfigError("data", f"{type(data).__name__} is not bytes or str")
        self._transfer(FileTransfer("write_file", path, data=data, mode=mode))

    def read_file(self, path: str, *, max_size: int = 256 * 1024**2) -> bytes:
        """The content of the file at ``path``; refused past ``max_size`` bytes."""
        self._ready()
        path = archive.check_sandbox_path(path)
        done = self._transfer(FileTransfer("read_file", path, max_size=max_size))
        return done.data if done.data is not None else b""

    def upload(self, source: str | os.PathLike[str], destination: str) -> None:
        """Copy a local file or folder into the folder ``destination`` of the sandbox.

        ``upload("./src", "/workspace")`` makes ``/workspace/src``. Symlinks and special
        files in ``source`` are refused rather than followed.
        """
        self._ready()
        destination = archive.check_sandbox_path(destination, "destination")
        local = archive.check_host_path(source, "source")
        self._transfer(FileTransfer("upload", destination, host_path=str(local)))

    def download(
        self,
        source: str,
        destination: str | os.PathLike[str],
        *,
        limits: archive.ArchiveLimits = archive.ArchiveLimits(),
    ) -> Path:
        """Copy the file or folder ``source`` out of the sandbox to a new local path.

        ``destination`` must not exist. Links, devices and anything that would land
        outside ``destination`` are refused, and nothing partial is left behind.
        """
        self._ready()
        source = archive.check_sandbox_path(source, "source")
        target = archive.check_host_path(destination, "destination")
        done = self._transfer(
            FileTransfer("download", source, host_path=str(target), limits=limits)
        )
        return done.local if done.local is not None else target

    # -- state -------------------------------------------------------------------------

    def usage(self) -> ResourceUsage:
        """What the sandbox uses now (CPU seconds, memory, pids, I/O where known)."""
        self._ready()
        sample = self._host.hooks.usage(self)
        self._host.hooks.usage_sampled(self, sample)
        return sample

    def health(self) -> Health:
        """The state of the spec's healthcheck (``none`` without one)."""
        self._ready()
        return self._host.hooks.health(self)

    def detach(self) -> None:
        """Stop owning the sandbox: dropping this handle no longer warns, and the sandbox
        outlives it (``corral.attach`` finds it again). The handle stays usable, and
        ``close()`` still removes the sandbox. Unclosed, it removes itself when its
        lifetime ends, or at ``corral gc``.
        """
        self._ready()  # a sandbox that outlives its handle must exist
        self._finalizer.detach()

    def close(self) -> None:
        """Destroy the sandbox and everything in it. Idempotent."""
        with self._lock:
            if self._state not in _OPEN:
                return
            # A pending sandbox is never made from here on: there is nothing to destroy.
            held = self._state is SandboxState.RUNNING
            self._state = SandboxState.CLOSING
            self._finalizer.detach()
        # Observers may still read files or run commands here (to collect logs).
        self._host.hooks.sandbox_destroying(self)
        with self._lock:
            self._state = SandboxState.CLOSED
        error: BaseException | None = None
        try:
            if held:
                self.backend.destroy(self.id)
        except BaseException as e:
            error = e
            raise
        finally:
            capacity.release(self.info.backend, self.id)  # T42 capacity: the slot of create
            self._host.hooks.sandbox_destroyed(self.id, self.backend_name, error)
