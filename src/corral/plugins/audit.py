"""The audit plugin: a JSON-lines trail of what happened to each sandbox, and who did it.

Configured by ``[plugins.audit]``; without a ``path`` it records nothing. Each line is
one event (``created``, ``exec``, ``transfer``, ``usage``, ``destroyed``) with the time
in UTC, the sandbox and its backend; a ``transfer`` is a write_file, read_file, upload or
download, with its path in the sandbox, its direction and its bytes. Environment values
whose names look secret are redacted, and so are passwords in URLs; argv is recorded as
given, so keep secrets out of argv (the file is created readable by its owner only).
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import threading
import time
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from corral.core.convert import structure, unstructure
from corral.core.errors import ConfigError
from corral.core.hookspecs import hookimpl
from corral.core.policy import loosened
from corral.core.spec import bool_field, str_field

from .jsonlines import JsonLinesFile, utc_now

if TYPE_CHECKING:
    from corral.core.output import OutputSink
    from corral.core.results import ExecResult, ResourceUsage
    from corral.core.sandbox import Sandbox
    from corral.core.settings import Settings
    from corral.core.spec import ExecRequest
    from corral.core.transfer import FileTransfer, Transferred

__all__ = ["AuditPlugin", "AuditSettings", "plugin", "redact_env"]

log = logging.getLogger("corral")

NAME = "audit"
REDACTED = "<redacted>"
# A variable whose name holds one of these (in any case) has its value redacted.
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "AUTH")
# Run-together names: APIKEY, AUTHTOKEN, DBPASSWORD (but not AUTHOR, KEYBOARD).
_SECRET_ENDINGS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD")
# scheme://user:password@host: the password goes, the rest stays readable.
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/@:]*):[^\s/@]*@")


@attrs.frozen
class AuditSettings:
    """``[plugins.audit]``: where the audit trail goes; without ``path``, nowhere."""

    path: str | None = str_field()
    usage: bool = bool_field(False)  # also record every usage sample


def looks_secret(name: str) -> bool:
    """Whether a variable's name suggests a secret value (``GITHUB_TOKEN``, ``db_password``,
    ``APIKEY``), word by word, so that ``GIT_AUTHOR_NAME`` stays readable."""
    words = [w for w in re.split(r"[^A-Z0-9]+", name.upper()) if w]
    return any(
        w in SECRET_WORDS
        or w.startswith(("CREDENTIAL", "AUTHORIZATION"))
        or w.endswith(_SECRET_ENDINGS)
        for w in words
    )


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with secret-looking values replaced and passwords in URLs removed."""
    return {
        name: REDACTED if looks_secret(name) else _URL_PASSWORD.sub(rf"\1:{REDACTED}@", value)
        for name, value in env.items()
    }


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in the environment nor in the password database
        return str(os.getuid())


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@attrs.frozen
class _Trail:
    file: JsonLinesFile
    usage: bool


class AuditPlugin:
    """Writes the audit trail. Each sandbox keeps the trail it was created under."""

    def __init__(self) -> None:
        self._trail: _Trail | None = None
        self._bound: dict[str, _Trail | None] = {}
        self._lock = threading.Lock()

    def _trail_of(self, sandbox_id: str) -> _Trail | None:
        with self._lock:
            if sandbox_id in self._bound:
                return self._bound[sandbox_id]
            return self._trail  # a sandbox attached to, not created here

    def _write(
        self, trail: _Trail, event: str, sandbox_id: str, backend: str, **fields: Any
    ) -> None:
        record = {"time": utc_now(), "event": event, "sandbox": sandbox_id, "backend": backend}
        trail.file.write({**record, **fields})

    # -- hooks -------------------------------------------------------------------------

    @hookimpl
    def corral_configure(self, settings: Settings) -> None:
        own = structure(settings.plugins.get(NAME, {}), AuditSettings, f"plugins.{NAME}")
        trail = None
        if own.path is not None:
            trail = _Trail(JsonLinesFile(Path(own.path).expanduser().absolute()), own.usage)
        with self._lock:
            self._trail = trail

    @hookimpl
    def corral_sandbox_created(self, sandbox: Sandbox) -> None:
        with self._lock:
            trail = self._bound[sandbox.id] = self._trail
        if trail is None:
            return
        spec = sandbox.spec
        try:
            self._write(
                trail,
                "created",
                sandbox.id,
                sandbox.backend_name,
                user=_who(),
                pid=os.getpid(),
                image=spec.image,
                loosened=loosened(spec),
                sandbox_user=spec.user,
                workdir=spec.workdir,
                env=redact_env(spec.env),
                mounts=[unstructure(m) for m in spec.mounts],
                network=spec.network.mode,
                expires=sandbox.expires,
            )
        except OSError as e:
            # Nothing runs unaudited: the sandbox is removed and the caller told.
            raise ConfigError(
                f"plugins.{NAME}.path", f"cannot write {str(trail.file.path)!r}: {e.strerror}"
            ) from e

    @hookimpl(wrapper=True)
    def corral_exec(
        self, sandbox: Sandbox, request: ExecRequest, sink: OutputSink
    ) -> Generator[None, ExecResult, ExecResult]:
        trail = self._trail_of(sandbox.id)
        if trail is None:
            return (yield)
        started = time.monotonic()
        base = {**sandbox.spec.network.proxy_env(), **sandbox.spec.env}
        fields: dict[str, Any] = {
            "argv": list(request.argv),
            "workdir": request.workdir,
            "exec_user": request.user,
            # The sandbox's own variables are in its created event; here, what differs.
            "env": redact_env({k: v for k, v in request.env.items() if base.get(k) != v}),
        }
        try:
            result = yield
        except BaseException as e:
            fields.update(duration=time.monotonic() - started, error=_error_text(e))
            self._record_exec(trail, sandbox, fields)
            raise
        fields.update(
            exit_code=result.exit_code,
            signal=result.signal,
            duration=result.duration,
            timed_out=result.timed_out,
            oom_killed=result.oom_killed,
            oom_events=result.oom_events,
            truncated=result.truncated,
            stdout_bytes=len(result.stdout),
            stderr_bytes=len(result.stderr),
        )
        self._record_exec(trail, sandbox, fields)
        return result

    def _record_exec(self, trail: _Trail, sandbox: Sandbox, fields: dict[str, Any]) -> None:
        self._record(trail, sandbox, "exec", fields)

    def _record(self, trail: _Trail, sandbox: Sandbox, event: str, fields: dict[str, Any]) -> None:
        # It already happened: a failing trail is logged, never raised over its result.
        try:
            self._write(trail, event, sandbox.id, sandbox.backend_name, **fields)
        except OSError:
            log.exception("the audit trail %s could not record an %s", trail.file.path, event)

    @hookimpl(wrapper=True)
    def corral_transfer(
        self, sandbox: Sandbox, transfer: FileTransfer
    ) -> Generator[None, Transferred, Transferred]:
        trail = self._trail_of(sandbox.id)
        if trail is None:
            return (yield)
        started = time.monotonic()
        fields: dict[str, Any] = {
            "operation": transfer.operation,
            "direction": transfer.direction,
            "path": transfer.path,
            "host_path": transfer.host_path,
        }
        try:
            done = yield
        except BaseException as e:
            fields.update(duration=time.monotonic() - started, error=_error_text(e))
            self._record(trail, sandbox, "transfer", fields)
            raise
        fields.update(bytes=done.size, duration=time.monotonic() - started)
        self._record(trail, sandbox, "transfer", fields)
        return done

    @hookimpl
    def corral_usage_sampled(self, sandbox: Sandbox, usage: ResourceUsage) -> None:
        trail = self._trail_of(sandbox.id)
        if trail is not None and trail.usage:
            self._write(trail, "usage", sandbox.id, sandbox.backend_name, **attrs.asdict(usage))

    @hookimpl
    def corral_process_spawned(
        self, sandbox: Sandbox, request: ExecRequest, process_id: str
    ) -> None:
        trail = self._trail_of(sandbox.id)
        if trail is not None:
            fields = {"process": process_id, "argv": list(request.argv), "tty": request.tty}
            self._record(trail, sandbox, "spawn", fields)

    @hookimpl
    def corral_sandbox_destroyed(
        self, sandbox_id: str, backend: str, error: BaseException | None
    ) -> None:
        with self._lock:
            trail = self._bound.pop(sandbox_id, self._trail)
        if trail is not None:
            text = None if error is None else _error_text(error)
            self._write(trail, "destroyed", sandbox_id, backend, error=text)


plugin = AuditPlugin()
