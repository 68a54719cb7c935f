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
from .errors import (
    CapabilityError,
    ConfigError,
    ConflictError,
    NotFoundError,
    SandboxClosedError,
)
from .output import OutputSink
from .plugins import PluginHost
from .results import Change, ExecResult, Health, OutputChunk, ResourceUsage, SandboxInfo
from .settings import Settings
from .spec import ExecRequest, SandboxSpec
from .transfer import FileTransfer, Transferred

# deferred: pathlib costs ~5 ms at `import corral`; only an annotation here.
if TYPE_CHECKING:
    from pathlib import Path

    from .process import Process
    from .snapshot import Snapshot

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
        # Paused through this handle (or found paused by attach): calls that need the
        # sandbox running resume it (spec.auto_resume) or say why they cannot run.
        self._paused = info.status == "paused"
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

    def _running_for(self, what: str) -> None:
        """Open, made, and not paused: a paused sandbox is resumed (``auto_resume``), or
        the call is refused, naming it, before anything reaches the backend."""
        self._ready()
        if not self._paused:
            return
        # Another handle may have resumed it: only a refusal costs a look.
        if self.backend.inspect(self.id)[0].status != "paused":
            self._paused = False
            return
        if self.spec.auto_resume:
            self.resume()
            return
        raise ConflictError(
            f"this sandbox is paused: {what} needs it running",
            backend=self.backend_name,
            sandbox_id=self.id,
            fix="call resume() first, or create the sandbox with auto_resume=True",
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
        if self._state is not SandboxState.PENDING:
            self._running_for("a command")
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
        self._running_for("write_file")
        path = archive.check_sandbox_path(path)
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, bytes):
            raise ConfigError("data", f"{type(data).__name__} is not bytes or str")
        self._transfer(FileTransfer("write_file", path, data=data, mode=mode))

    def read_file(self, path: str, *, max_size: int = 256 * 1024**2) -> bytes:
        """The content of the file at ``path``; refused past ``max_size`` bytes."""
        self._running_for("read_file")
        path = archive.check_sandbox_path(path)
        done = self._transfer(FileTransfer("read_file", path, max_size=max_size))
        return done.data if done.data is not None else b""

    def upload(self, source: str | os.PathLike[str], destination: str) -> None:
        """Copy a local file or folder into the folder ``destination`` of the sandbox.

        ``upload("./src", "/workspace")`` makes ``/workspace/src``. Symlinks and special
        files in ``source`` are refused rather than followed.
        """
        self._running_for("upload")
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
        self._running_for("download")
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

    # -- long-lived sandboxes -----------------------------------------------------------

    @property
    def status(self) -> str:
        """``running`` or ``paused`` (or the backend's word, ``exited`` say), as the
        backend says now; ``closed`` once this handle closed it."""
        if self._state is SandboxState.CLOSED:
            return "closed"
        self._ready()
        return self.backend.inspect(self.id)[0].status

    def pause(self) -> None:
        """Freeze every process of the sandbox: they keep their memory and files and use
        no CPU until ``resume()``. The lifetime keeps counting (``extend`` moves it)."""
        self._ready()
        with self._lock:
            self.backend.pause(self.id)
            self._paused = True

    def resume(self) -> None:
        """Thaw what ``pause()`` froze."""
        self._ready()
        with self._lock:
            self.backend.resume(self.id)
            self._paused = False

    def extend(self, duration: float | str) -> float:
        """Move the sandbox's end ``duration`` (seconds, or "30m") later; the new end
        (a ``time.time()``). A lifetime never passes 30 days from now."""
        from .spec import Limits

        self._ready()
        try:
            seconds = Limits(lifetime=duration).lifetime  # type: ignore[arg-type]
        except ConfigError as e:  # named as the caller wrote it
            raise ConfigError("duration", e.reason) from None
        expires = min(self.expires + seconds, time.time() + 30 * 86400)
        self.backend.extend(self.id, expires)
        self.info = attrs.evolve(self.info, expires=expires)
        capacity.extend(self.info.backend, self.id, expires)
        return expires

    def spawn(
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
    ) -> Process:
        """Start ``argv`` in the background and return its ``Process`` at once.

        The process outlives this program (``corral.attach(id).process(pid)`` finds it
        again) and ends with the sandbox, at its ``timeout`` or ``idle_timeout``, or at
        the sandbox's lifetime (moved by ``extend``). ``stdin``: bytes sent first (more
        with ``Process.write``). ``tty``: run on a pseudo-terminal (stdout and stderr
        are then one stream, stdout); ``Process.resize`` sets its size.

        Raises:
            CapabilityError: the backend cannot run background processes (or
                terminals, with ``tty``).
        """
        from .backend import Capability
        from .process import Process

        request = self._request(
            argv,
            env=env,
            workdir=workdir,
            user=user,
            stdin=stdin,
            max_output=max_output,
            idle_timeout=idle_timeout,
        )
        # The keeper holds the lifetime itself (extend moves it): only the call's own.
        request = attrs.evolve(request, timeout=timeout, tty=bool(tty))  # type: ignore[arg-type]
        if tty and not self.backend.capabilities() & Capability.TTY:
            raise CapabilityError(
                f"the {self.backend_name} backend cannot give a command a terminal (TTY)",
                backend=self.backend_name,
                sandbox_id=self.id,
            )
        info = self.backend.spawn(self.id, request, request.idle_timeout)
        self._host.hooks.process_spawned(self, request, info.id)
        return Process(self, info)

    def processes(self) -> list[Process]:
        """The processes spawned in this sandbox (by any program), running or ended."""
        from .process import Process

        self._ready()
        return [Process(self, info) for info in self.backend.processes(self.id)]

    def process(self, process_id: str) -> Process:
        """The spawned process ``process_id``; NotFoundError if the sandbox has none."""
        for found in self.processes():
            if found.id == process_id:
                return found
        raise NotFoundError(
            f"no process {process_id!r} in this sandbox",
            backend=self.backend_name,
            sandbox_id=self.id,
        )

    def snapshot(self, *, memory: bool = False, lifetime: float | str | None = None) -> Snapshot:
        """Capture the sandbox's files (its writable layer and folders) as a Snapshot
        that ``corral.create(image=snapshot)`` starts from. ``memory``: its running
        processes too, where the backend can (CapabilityError before anything happens
        otherwise). The snapshot carries corral's labels and is removed by ``gc`` after
        ``lifetime`` (default: the sandbox's own lifetime setting)."""
        import uuid

        from .backend import Capability
        from .snapshot import Snapshot
        from .spec import Limits

        self._ready()
        needed = Capability.SNAPSHOTS | (Capability.MEMORY_SNAPSHOTS if memory else Capability(0))
        missing = needed & ~self.backend.capabilities()
        if missing:
            raise CapabilityError(
                f"the {self.backend_name} backend cannot take "
                f"{'memory ' if memory else ''}snapshots ({missing.name})",
                backend=self.backend_name,
                sandbox_id=self.id,
            )
        seconds = self.spec.limits.lifetime
        if lifetime is not None:
            seconds = Limits(lifetime=lifetime).lifetime  # type: ignore[arg-type]
        snapshot_id = "sn-" + uuid.uuid4().hex[:12]
        now = time.time()
        labels = {
            "corral.managed": "true",
            "corral.snapshot": snapshot_id,
            "corral.sandbox": self.id,
            "corral.backend": self.backend_name,
            "corral.created": str(int(now)),
            "corral.expires": str(int(now + seconds)),
            "corral.memory": "true" if memory else "false",
        }
        return Snapshot(self.backend.snapshot(self.id, snapshot_id, labels, memory), self.backend)

    def fork(self, n: int = 1) -> list[Sandbox]:
        """``n`` new sandboxes, each starting from a snapshot of this one (files as they
        are now; the same spec). Close them as any other; the snapshot goes at ``gc``
        once expired."""
        from .lifecycle import create

        if not isinstance(n, int) or n < 1:
            raise ConfigError("n", f"{n!r} is not a number of forks (1 or more)")
        snap = self.snapshot()
        forks: list[Sandbox] = []
        try:
            for _ in range(n):
                forks.append(
                    create(
                        spec=attrs.evolve(self.spec, image=snap.image),
                        backend=self.backend_name,
                        settings=self._settings,
                    )
                )
        except BaseException:
            for made in forks:
                with contextlib.suppress(Exception):
                    made.close()
            raise
        return forks

    def port(self, port: int) -> tuple[str, int]:
        """``(host, port)`` where the sandbox's published ``port`` is reached, on the
        host's loopback (the sandbox was created with ``ports=[...]``)."""
        self._ready()
        if port not in self.spec.ports:
            raise ConfigError(
                "port",
                f"port {port} is not published (this sandbox publishes "
                f"{list(self.spec.ports) or 'none'}; create it with ports=[{port}])",
            )
        return self.backend.port(self.id, port)

    def changes(self) -> list[Change]:
        """What was added, changed and deleted under the sandbox's writable paths since
        it was made (from its image or snapshot), by path; contents are never read."""
        self._ready()
        return self.backend.changes(self.id)

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
                self.backend.forget_processes(self.id)
        except BaseException as e:
            error = e
            raise
        finally:
            capacity.release(self.info.backend, self.id)  # T42 capacity: the slot of create
            self._host.hooks.sandbox_destroyed(self.id, self.backend_name, error)
