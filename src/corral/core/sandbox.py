"""The Sandbox users hold: exec, stream, files, usage and close, routed through the hooks."""

from __future__ import annotations

import contextlib
import os
import posixpath
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
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

# deferred: pathlib costs ~5 ms at `import corral`; only an annotation here.
if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["Sandbox"]

LABEL_PREFIX = "corral."


def _warn_unclosed(sandbox_id: str) -> None:
    warnings.warn(
        f"sandbox {sandbox_id} was never closed; use it as a context manager or call close()",
        ResourceWarning,
        stacklevel=2,
    )


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
        self._closed = False
        self._closing = False  # close() has begun; the sandbox is usable until destroying ends
        self._close_lock = threading.Lock()
        # corral.run's sandbox: the backend makes it with its one command (run_once)
        # unless something uses it first (a plugin's created hook), which makes it then.
        self._pending = pending
        self._one_shot: ExecRequest | None = None  # run()'s request, while it runs
        self._made = not pending  # the backend holds it, so close() must destroy it
        self._make_lock = threading.Lock()
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
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Sandbox {self.id} on {self.backend_name} ({state})>"

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
        if self._closed:
            raise SandboxClosedError(
                "this sandbox is closed", backend=self.backend_name, sandbox_id=self.id
            )

    def _ready(self) -> None:
        """Open, and made by the backend (a pending sandbox is made on first use)."""
        self._check_open()
        if self._pending:
            with self._make_lock:
                if self._pending:
                    self._made = True  # from here, close() destroys whatever was made
                    self._pending = False
                    self.backend.create(self.id, self.spec, self.info.labels)

    def _backend_exec(self, request: ExecRequest, sink: OutputSink) -> ExecStatus:
        """The backend's run of one command; the core's ``corral_exec`` calls this."""
        with self._make_lock:
            # run()'s own command only: another one (a plugin's, in its wrapper) gets
            # the sandbox made and runs as an exec.
            one_shot = self._pending and request is self._one_shot
            if one_shot:
                self._pending = False
                self._made = True
        if not one_shot:
            self._ready()
            return self.backend.exec(self.id, request, sink)
        status = self.backend.run_once(self.id, self.spec, self.info.labels, request, sink)
        self._made = False  # run_once removed it
        return status

    def _run_once(
        self,
        argv: Sequence[str],
        *,
        timeout: float | str | None,
        stdin: bytes | str | None,
        max_output: int | str | None,
        on_chunk: Callable[[OutputChunk], None] | None,
        cancel: threading.Event | None,
    ) -> ExecResult:
        """``corral.run``: the one command of a pending sandbox, through ``corral_exec``."""
        request = self._request(argv, timeout, None, None, None, stdin, max_output)
        sink = OutputSink(request.max_output, on_chunk=on_chunk, cancel=cancel)
        self._one_shot = request
        try:
            return self._host.pm.hook.corral_exec(sandbox=self, request=request, sink=sink)
        finally:
            self._one_shot = None

    # -- exec --------------------------------------------------------------------------

    def _request(
        self,
        argv: Sequence[str],
        timeout: float | str | None,
        env: Mapping[str, str] | None,
        workdir: str | None,
        user: str | None,
        stdin: bytes | str | None,
        max_output: int | str | None,
    ) -> ExecRequest:
        self._check_open()
        remaining = self.expires - time.time()
        if remaining <= 0:
            raise SandboxClosedError(
                "this sandbox's lifetime is over", backend=self.backend_name, sandbox_id=self.id
            )
        request = ExecRequest(
            argv=argv,  # type: ignore[arg-type]
            env={**self.spec.network.proxy_env(), **self.spec.env, **(env or {})},
            workdir=workdir,
            user=user,
            stdin=stdin,  # type: ignore[arg-type]
            timeout=timeout,  # type: ignore[arg-type]
            max_output=self._settings.max_output if max_output is None else max_output,
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
            on_chunk: called (from a backend thread) with each OutputChunk as it comes.
            cancel: an event another thread may set to stop the command, as a timeout
                would (the result then has ``timed_out`` set); used by ``corral.aio``.

        Raises:
            ConfigError: bad argv, env or paths (nothing ran).
            SandboxClosedError: the sandbox was closed.
        """
        request = self._request(argv, timeout, env, workdir, user, stdin, max_output)
        sink = OutputSink(request.max_output, on_chunk=on_chunk, cancel=cancel)
        return self._host.pm.hook.corral_exec(sandbox=self, request=request, sink=sink)

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
    ) -> Iterator[OutputChunk | ExecResult]:
        """Like ``exec``, but yields OutputChunks as they come, then the ExecResult.

        Leaving the loop early stops the command.
        """
        import queue  # deferred: only streaming needs it (~1 ms at `import corral`)

        request = self._request(argv, timeout, env, workdir, user, stdin, max_output)
        # Bounded: a slow consumer slows the command (as a pipe would) instead of
        # letting output pile up in memory.
        events: queue.Queue[Any] = queue.Queue(maxsize=256)
        sink = OutputSink(request.max_output, on_chunk=events.put)
        done = object()

        def run() -> None:
            try:
                events.put(self._host.pm.hook.corral_exec(sandbox=self, request=request, sink=sink))
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

    def _owner(self) -> tuple[int, int]:
        return self.spec.uid_gid() or (0, 0)

    def write_file(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` (absolute, inside the sandbox), replacing it."""
        self._ready()
        path = archive.check_sandbox_path(path)
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, bytes):
            raise ConfigError("data", f"{type(data).__name__} is not bytes or str")
        folder, name = posixpath.split(path)
        with archive.build_tar_from_bytes(name, data, mode, self._owner()) as tar:
            self.backend.put_archive(self.id, folder, tar)

    def read_file(self, path: str, *, max_size: int = 256 * 1024**2) -> bytes:
        """The content of the file at ``path``; refused past ``max_size`` bytes."""
        self._ready()
        path = archive.check_sandbox_path(path)
        return archive.read_single_file(self.backend.get_archive(self.id, path), max_size)

    def upload(self, source: str | os.PathLike[str], destination: str) -> None:
        """Copy a local file or folder into the folder ``destination`` of the sandbox.

        ``upload("./src", "/workspace")`` makes ``/workspace/src``. Symlinks and special
        files in ``source`` are refused rather than followed.
        """
        self._ready()
        destination = archive.check_sandbox_path(destination, "destination")
        local = archive.check_host_path(source, "source")
        with archive.build_tar_from_path(local, self._owner()) as tar:
            self.backend.put_archive(self.id, destination, tar)

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
        chunks = self.backend.get_archive(self.id, source)
        return archive.extract(chunks, target, limits)

    # -- state -------------------------------------------------------------------------

    def usage(self) -> ResourceUsage:
        """What the sandbox uses now (CPU seconds, memory, pids, I/O where known)."""
        self._ready()
        sample = self._host.pm.hook.corral_usage(sandbox=self)
        _notify(self._host.pm.hook.corral_usage_sampled, sandbox=self, usage=sample)
        return sample

    def health(self) -> Health:
        """The state of the spec's healthcheck (``none`` without one)."""
        self._ready()
        return self.backend.health(self.id)

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
        with self._close_lock:
            if self._closing:
                return
            self._closing = True
            self._finalizer.detach()
        # Observers may still read files or run commands here (to collect logs).
        _notify(self._host.pm.hook.corral_sandbox_destroying, sandbox=self)
        self._closed = True
        error: BaseException | None = None
        try:
            with self._make_lock:
                self._pending = False  # never made from here on
            if self._made:
                self.backend.destroy(self.id)
        except BaseException as e:
            error = e
            raise
        finally:
            capacity.release(self.info.backend, self.id)  # T42 capacity: the slot of create
            _notify(
                self._host.pm.hook.corral_sandbox_destroyed,
                sandbox_id=self.id,
                backend=self.backend_name,
                error=error,
            )


def _notify(hook: Any, **kwargs: Any) -> None:
    """Call an observer hook; an observer's failure is logged, never raised."""
    try:
        hook(**kwargs)
    except Exception:
        log.exception("a plugin failed in %s", hook.name)
