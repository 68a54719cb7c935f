"""The Sandbox users hold, and create / attach / list, which route through the hooks."""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import queue
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from . import archive
from .backend import Backend, Capability, required_capabilities
from .convert import structure, unstructure
from .errors import CapabilityError, ConfigError, SandboxClosedError, SandboxError
from .output import OutputSink
from .plugins import PluginHost, get_host
from .policy import apply_policy
from .results import ExecResult, Health, OutputChunk, ResourceUsage, SandboxInfo
from .settings import Settings, _merge, load_settings
from .spec import ExecRequest, MountLike, SandboxSpec

__all__ = ["Sandbox", "attach", "create", "list_sandboxes"]

log = logging.getLogger("corral")

LABEL_PREFIX = "corral."
# Keywords of corral.create() that belong to spec.limits rather than the spec itself.
_LIMIT_KEYWORDS = (
    "memory",
    "cpus",
    "pids",
    "nofile",
    "nproc",
    "cputime",
    "file_size",
    "disk",
    "lifetime",
)


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

        Raises:
            ConfigError: bad argv, env or paths (nothing ran).
            SandboxClosedError: the sandbox was closed.
        """
        request = self._request(argv, timeout, env, workdir, user, stdin, max_output)
        sink = OutputSink(request.max_output)
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
        self._check_open()
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
        self._check_open()
        path = archive.check_sandbox_path(path)
        return archive.read_single_file(self.backend.get_archive(self.id, path), max_size)

    def upload(self, source: str | os.PathLike[str], destination: str) -> None:
        """Copy a local file or folder into the folder ``destination`` of the sandbox.

        ``upload("./src", "/workspace")`` makes ``/workspace/src``. Symlinks and special
        files in ``source`` are refused rather than followed.
        """
        self._check_open()
        destination = archive.check_sandbox_path(destination, "destination")
        with archive.build_tar_from_path(Path(source), self._owner()) as tar:
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
        self._check_open()
        source = archive.check_sandbox_path(source, "source")
        chunks = self.backend.get_archive(self.id, source)
        return archive.extract(chunks, Path(destination), limits)

    # -- state -------------------------------------------------------------------------

    def usage(self) -> ResourceUsage:
        """What the sandbox uses now (CPU seconds, memory, pids, I/O where known)."""
        self._check_open()
        sample = self._host.pm.hook.corral_usage(sandbox=self)
        _notify(self._host.pm.hook.corral_usage_sampled, sandbox=self, usage=sample)
        return sample

    def health(self) -> Health:
        """The state of the spec's healthcheck (``none`` without one)."""
        self._check_open()
        return self.backend.health(self.id)

    def detach(self) -> None:
        """Stop owning the sandbox: dropping this handle no longer warns, and the sandbox
        outlives it (``corral.attach`` finds it again). The handle stays usable, and
        ``close()`` still removes the sandbox. Unclosed, it removes itself when its
        lifetime ends, or at ``corral gc``.
        """
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
            self.backend.destroy(self.id)
        except BaseException as e:
            error = e
            raise
        finally:
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


# -- module-level API ------------------------------------------------------------------


def select_backend_name(explicit: str | None, settings: Settings) -> str:
    """The backend to use: the argument, else CORRAL_BACKEND, else the setting, else local."""
    return explicit or os.environ.get("CORRAL_BACKEND") or settings.backend or "local"


def _keyword_layer(kwargs: dict[str, Any]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    limits = {k: kwargs.pop(k) for k in _LIMIT_KEYWORDS if kwargs.get(k) is not None}
    if limits:
        layer["limits"] = limits
    network = kwargs.pop("network", None)
    if network is not None:
        layer["network"] = {"mode": network} if isinstance(network, str) else network
    for key, value in kwargs.items():
        # A lone string is not iterated into characters: the spec refuses it whole.
        if key == "mounts" and isinstance(value, (list, tuple)):
            layer[key] = [_as_data(m) for m in value]
        elif value is not None:
            layer[key] = _as_data(value)
    return layer


def _as_data(value: Any) -> Any:
    """Model objects given as keywords become plain data, so layers can merge."""
    return unstructure(value) if attrs.has(type(value)) else value


def build_spec(
    settings: Settings, spec: SandboxSpec | None, keywords: dict[str, Any]
) -> SandboxSpec:
    """The spec from settings defaults, a spec object and keywords, strongest last."""
    data = dict(settings.sandbox)
    if spec is not None:
        if not isinstance(spec, SandboxSpec):
            raise ConfigError("spec", f"{type(spec).__name__} is not a SandboxSpec")
        data = _merge(data, unstructure(spec))
    return structure(_merge(data, _keyword_layer(dict(keywords))), SandboxSpec, "sandbox")


def _contribute(host: PluginHost, spec: SandboxSpec, backend: str) -> SandboxSpec:
    hook = host.pm.hook
    extra_mounts: list[MountLike] = [
        m for ms in hook.corral_extra_mounts(spec=spec, backend=backend) for m in ms or ()
    ]
    extra_env: dict[str, str] = {}
    for env in hook.corral_extra_env(spec=spec, backend=backend):
        extra_env.update(env or {})
    if not extra_mounts and not extra_env:
        return spec
    return structure(
        {
            **unstructure(spec),
            "mounts": [unstructure(m) for m in (*spec.mounts, *extra_mounts)],
            "env": {**extra_env, **spec.env},
        },
        SandboxSpec,
        "sandbox",
    )


def _check_capabilities(backend: Backend, spec: SandboxSpec) -> None:
    have = backend.capabilities()
    missing = {cap: field for cap, field in required_capabilities(spec).items() if cap not in have}
    if missing:
        lines = "; ".join(f"{field} needs {cap.name}" for cap, field in missing.items())
        combined = Capability(0)
        for cap in missing:
            combined |= cap
        hint = backend.capability_hint(combined)
        raise CapabilityError(
            f"the {backend.name} backend cannot enforce what this sandbox asks for here: "
            f"{lines}" + (f" ({hint})" if hint else ""),
            backend=backend.name,
        )


def create(
    image: str | None = None,
    *,
    backend: str | None = None,
    spec: SandboxSpec | None = None,
    command: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    workdir: str | None = None,
    user: str | None = None,
    mounts: Sequence[Any] | None = None,
    memory: int | str | None = None,
    cpus: float | None = None,
    pids: int | None = None,
    nofile: int | None = None,
    nproc: int | None = None,
    cputime: float | str | None = None,
    file_size: int | str | None = None,
    disk: int | str | None = None,
    lifetime: float | str | None = None,
    network: str | None = None,
    security: Any = None,
    labels: Mapping[str, str] | None = None,
    healthcheck: Any = None,
    settings: Settings | None = None,
) -> Sandbox:
    """Create and start a sandbox; use the result as a context manager.

    The backend is ``backend``, else ``CORRAL_BACKEND``, else the ``backend`` setting,
    else ``local``. Keywords override ``spec``, which overrides the ``[sandbox]``
    defaults of the settings. Nothing is created unless every check passes.

    Raises:
        ConfigError: a bad value (the message names the field).
        PolicyError: an unsafe option not opted into, or a refused mount source.
        CapabilityError: the backend cannot enforce what the spec asks for.
        BackendUnavailableError: the backend cannot run here (with the fix).
    """
    settings = load_settings() if settings is None else settings
    keywords = {
        "image": image,
        "command": command,
        "env": env,
        "workdir": workdir,
        "user": user,
        "mounts": mounts,
        "memory": memory,
        "cpus": cpus,
        "pids": pids,
        "nofile": nofile,
        "nproc": nproc,
        "cputime": cputime,
        "file_size": file_size,
        "disk": disk,
        "lifetime": lifetime,
        "network": network,
        "security": security,
        "labels": labels,
        "healthcheck": healthcheck,
    }
    final = build_spec(settings, spec, keywords)
    host = get_host()
    host.configure(settings)
    name = select_backend_name(backend, settings)
    chosen = host.backend(name, settings)
    final = _contribute(host, final, name)
    final = apply_policy(final, settings)
    host.pm.hook.corral_check_spec(spec=final, backend=name)
    _check_capabilities(chosen, final)

    sandbox_id = uuid.uuid4().hex[:16]
    now = time.time()
    labels_out = {
        **final.labels,
        "corral.managed": "true",
        "corral.sandbox": sandbox_id,
        "corral.backend": name,
        "corral.created": str(int(now)),
        "corral.expires": str(int(now + final.limits.lifetime)),
    }
    loosened = final.security.loosened()
    if loosened:
        labels_out["corral.loosened"] = ",".join(loosened)
    if loosened:
        log.warning("sandbox %s loosens: %s", sandbox_id, ", ".join(loosened))
    host.pm.hook.corral_sandbox_creating(spec=final, sandbox_id=sandbox_id, backend=name)
    try:
        chosen.create(sandbox_id, final, labels_out)
    except BaseException:
        _destroy_quietly(chosen, sandbox_id)
        raise
    info = SandboxInfo(
        id=sandbox_id,
        backend=name,
        status="running",
        created=now,
        expires=now + final.limits.lifetime,
        image=final.image,
        labels=labels_out,
    )
    sandbox = Sandbox(
        sandbox_id=sandbox_id, backend=chosen, spec=final, info=info, host=host, settings=settings
    )
    try:
        host.pm.hook.corral_sandbox_created(sandbox=sandbox)
    except BaseException:
        # A full close, so observers that saw it created also see it go.
        try:
            sandbox.close()
        except Exception:
            log.exception("cleaning up sandbox %s after a failed create also failed", sandbox_id)
        raise
    return sandbox


def _destroy_quietly(backend: Backend, sandbox_id: str) -> None:
    """Clean up after a failed create without hiding why it failed."""
    try:
        backend.destroy(sandbox_id)
    except Exception:
        log.exception("cleaning up sandbox %s after a failed create also failed", sandbox_id)


def attach(
    sandbox_id: str, *, backend: str | None = None, settings: Settings | None = None
) -> Sandbox:
    """A handle on a sandbox made elsewhere (another process); NotFoundError if gone."""
    settings = load_settings() if settings is None else settings
    host = get_host()
    host.configure(settings)
    chosen = host.backend(select_backend_name(backend, settings), settings)
    info, spec = chosen.inspect(sandbox_id)
    return Sandbox(
        sandbox_id=sandbox_id, backend=chosen, spec=spec, info=info, host=host, settings=settings
    )


def list_sandboxes(
    *, backend: str | None = None, settings: Settings | None = None
) -> list[SandboxInfo]:
    """Every sandbox corral made on the backend (found by corral's labels)."""
    settings = load_settings() if settings is None else settings
    chosen = get_host().backend(select_backend_name(backend, settings), settings)
    return chosen.list()


def gc(
    *, backend: str | None = None, settings: Settings | None = None, everything: bool = False
) -> list[str]:
    """Remove expired sandboxes (all of corral's with ``everything``); their ids."""
    settings = load_settings() if settings is None else settings
    chosen = get_host().backend(select_backend_name(backend, settings), settings)
    now = time.time()
    removed = []
    for info in chosen.list():
        if everything or info.expires <= now:
            try:
                chosen.destroy(info.id)
                removed.append(info.id)
            except SandboxError:
                log.exception("could not remove sandbox %s", info.id)
    return removed
