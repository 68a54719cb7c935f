"""FakeBackend: an in-memory test double of a corral backend, for users' unit tests.

It runs nothing and isolates nothing. Commands return the results a test scripted
(``fake.script([...], stdout=b"42\\n")``), files live in a dict, and every call is
recorded in ``fake.calls`` so a test can assert what its code asked for. It is opt-in:
not an entry point; the pytest plugin's ``fake_backend`` fixture registers it, or
``corral.core.plugins.get_host().register(corral.testing.fake, "corral.testing.fake")``.
"""

from __future__ import annotations

import functools
import io
import operator
import posixpath
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any, NamedTuple, Union

import attrs

from ..core.archive import iter_members
from ..core.backend import Availability, Backend, BackendInfo, Capability, ExecStatus
from ..core.errors import ConflictError, NotFoundError, PathSecurityError
from ..core.hookspecs import hookimpl
from ..core.results import ExecResult, Health, ResourceUsage, SandboxInfo

if TYPE_CHECKING:
    from ..core.output import OutputSink
    from ..core.sandbox import Sandbox
    from ..core.spec import ExecRequest, SandboxSpec

__all__ = ["Call", "FakeBackend", "Rule", "fake_of"]

NAME = "fake"
ALL_CAPABILITIES: Capability = functools.reduce(operator.or_, Capability, Capability(0))

#: What a scripted callable may return: a full result, or just how the command ended.
Response = Union[ExecResult, ExecStatus]  # noqa: UP007 - a runtime alias
Responder = Callable[["ExecRequest"], Response]


class Call(NamedTuple):
    """One recorded call: ``(method, sandbox_id, details)``; ``sandbox_id`` is None for list."""

    method: str
    sandbox_id: str | None
    details: dict[str, Any]


@attrs.frozen
class Rule:
    """A scripted answer for commands whose argv starts with (or, if ``exact``, is) ``argv``."""

    argv: tuple[str, ...]
    respond: Responder
    exact: bool = False

    def matches(self, argv: tuple[str, ...]) -> bool:
        if self.exact:
            return argv == self.argv
        return argv[: len(self.argv)] == self.argv


@attrs.define
class _Node:
    is_dir: bool
    data: bytes = b""
    mode: int = 0o755


@attrs.define
class _FakeSandbox:
    spec: SandboxSpec
    labels: dict[str, str]
    created: float
    expires: float
    tree: dict[str, _Node]
    paused: bool = False

    def info(self, sandbox_id: str) -> SandboxInfo:
        status = "paused" if self.paused else "running"
        return SandboxInfo(
            sandbox_id, NAME, status, self.created, self.expires, self.spec.image, self.labels
        )


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


class FakeBackend(Backend):
    """An in-memory backend that runs nothing: a test double, never a sandbox.

    Declares every capability, so any spec is accepted. ``exec`` answers from the rules
    given to ``script`` (the most recently added matching rule wins); a command no rule
    matches ends with exit code 127 and says so on stderr. Files written through the
    core's file helpers are kept per sandbox in memory. ``calls`` lists every call made
    on a sandbox (and ``list``), in order.
    """

    name = NAME

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.calls: list[Call] = []
        self._rules: list[Rule] = []
        self._sandboxes: dict[str, _FakeSandbox] = {}
        self._lock = threading.RLock()

    # -- scripting and inspection, for tests ---------------------------------------------

    def script(
        self,
        argv: Sequence[str],
        respond: Responder | None = None,
        *,
        stdout: bytes | str = b"",
        stderr: bytes | str = b"",
        exit_code: int = 0,
        timed_out: bool = False,
        oom_killed: bool = False,
        signal: int | None = None,
        oom_events: int | None = None,
        exact: bool = False,
    ) -> Rule:
        """Answer commands starting with ``argv`` (exactly ``argv`` when ``exact``).

        Either give the result's fields, or ``respond``: a callable taking the
        ExecRequest and returning an ExecResult (output and status) or an ExecStatus.
        Output goes through the core's sink, so output caps and streaming behave as
        with a real backend. ``oom_events`` defaults to 1 with ``oom_killed`` (the
        command's own kill is one), else 0.
        """
        if oom_events is None:
            oom_events = 1 if oom_killed else 0
        if respond is None:
            canned = ExecResult(
                exit_code=exit_code,
                stdout=_as_bytes(stdout),
                stderr=_as_bytes(stderr),
                timed_out=timed_out,
                oom_killed=oom_killed,
                signal=signal,
                oom_events=oom_events,
            )

            def answer(request: ExecRequest) -> Response:
                return canned

            respond = answer
        rule = Rule(tuple(argv), respond, exact)
        with self._lock:
            self._rules.append(rule)
        return rule

    def reset(self) -> None:
        """Forget every rule, call and sandbox."""
        with self._lock:
            self._rules.clear()
            self.calls.clear()
            self._sandboxes.clear()

    def executed(self, sandbox_id: str | None = None) -> list[tuple[str, ...]]:
        """The argv of every exec, in order (of one sandbox when ``sandbox_id`` is given)."""
        return [
            c.details["argv"]
            for c in self.calls
            if c.method == "exec" and sandbox_id in (None, c.sandbox_id)
        ]

    def files(self, sandbox_id: str) -> dict[str, bytes]:
        """A snapshot of the regular files a sandbox holds, by absolute path."""
        with self._lock:
            tree = self._get(sandbox_id).tree
            return {path: node.data for path, node in tree.items() if not node.is_dir}

    # -- the Backend interface --------------------------------------------------------

    def check(self) -> Availability:
        return Availability(True, "an in-memory test double; it runs nothing")

    def capabilities(self) -> Capability:
        return ALL_CAPABILITIES

    def _record(self, method: str, sandbox_id: str | None, **details: Any) -> None:
        with self._lock:
            self.calls.append(Call(method, sandbox_id, details))

    def _get(self, sandbox_id: str) -> _FakeSandbox:
        with self._lock:
            sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None:
            raise NotFoundError("no such sandbox", backend=NAME, sandbox_id=sandbox_id)
        return sandbox

    def create(self, sandbox_id: str, spec: SandboxSpec, labels: dict[str, str]) -> None:
        self._record("create", sandbox_id, spec=spec, labels=dict(labels))
        tree = {"/": _Node(True)}
        for folder in ("/tmp", spec.workdir):
            _make_folders(tree, folder)
        created = float(labels.get("corral.created", time.time()))
        expires = float(labels.get("corral.expires", created + spec.limits.lifetime))
        with self._lock:
            self._sandboxes[sandbox_id] = _FakeSandbox(spec, dict(labels), created, expires, tree)

    def exec(self, sandbox_id: str, request: ExecRequest, sink: OutputSink) -> ExecStatus:
        self._record("exec", sandbox_id, argv=request.argv, request=request)
        if self._get(sandbox_id).paused:
            raise ConflictError("the sandbox is paused", backend=NAME, sandbox_id=sandbox_id)
        with self._lock:
            rule = next((r for r in reversed(self._rules) if r.matches(request.argv)), None)
        if rule is None:
            sink.write(
                "stderr",
                f"corral fake backend: no scripted result for {list(request.argv)!r}; "
                "script one with fake.script([...])\n".encode(),
            )
            return ExecStatus(exit_code=127)
        response = rule.respond(request)
        if isinstance(response, ExecStatus):
            return response
        sink.write("stdout", response.stdout)
        sink.write("stderr", response.stderr)
        return ExecStatus(
            exit_code=response.exit_code,
            timed_out=response.timed_out,
            oom_killed=response.oom_killed,
            signal=response.signal,
            oom_events=response.oom_events,
        )

    def put_archive(self, sandbox_id: str, path: str, archive: IO[bytes]) -> None:
        sandbox = self._get(sandbox_id)
        names = []
        with self._lock:
            folder = sandbox.tree.get(path)
            if folder is None or not folder.is_dir:
                raise NotFoundError(f"{path!r} is not a folder in the sandbox", backend=NAME)
            for name, member, data in iter_members(archive):
                if name == ".":
                    continue
                target = posixpath.join(path, name)
                _make_folders(sandbox.tree, posixpath.dirname(target))
                existing = sandbox.tree.get(target)
                if data is None:
                    if existing is not None and not existing.is_dir:
                        raise PathSecurityError(f"{target!r} is a file, not a folder")
                    sandbox.tree[target] = _Node(True, mode=member.mode & 0o777)
                else:
                    if existing is not None and existing.is_dir:
                        raise PathSecurityError(f"{target!r} is a folder, not a file")
                    sandbox.tree[target] = _Node(False, data.read(), member.mode & 0o777)
                names.append(name)
        self._record("put_archive", sandbox_id, path=path, names=names)

    def get_archive(self, sandbox_id: str, path: str) -> Iterator[bytes]:
        self._record("get_archive", sandbox_id, path=path)
        with self._lock:
            tree = self._get(sandbox_id).tree
            if path not in tree:
                raise NotFoundError(f"{path!r} does not exist in the sandbox", backend=NAME)
            below = sorted(p for p in tree if p == path or p.startswith(path.rstrip("/") + "/"))
            entries = [(p, tree[p].is_dir, tree[p].data, tree[p].mode) for p in below]
        top = posixpath.basename(path) or "."
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for full, is_dir, data, mode in entries:
                info = tarfile.TarInfo(top + full[len(path) :] if full != path else top)
                info.mode = mode
                if is_dir:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        yield out.getvalue()

    def usage(self, sandbox_id: str) -> ResourceUsage:
        self._record("usage", sandbox_id)
        limit = self._get(sandbox_id).spec.limits.memory
        return ResourceUsage(
            cpu_seconds=0.0,
            memory_bytes=0,
            memory_peak_bytes=0,
            memory_limit_bytes=limit,
            pids=0,
            timestamp=time.time(),
        )

    def health(self, sandbox_id: str) -> Health:
        self._record("health", sandbox_id)
        return Health(status="healthy" if self._get(sandbox_id).spec.healthcheck else "none")

    def pause(self, sandbox_id: str) -> None:
        self._record("pause", sandbox_id)
        self._get(sandbox_id).paused = True

    def resume(self, sandbox_id: str) -> None:
        self._record("resume", sandbox_id)
        self._get(sandbox_id).paused = False

    def destroy(self, sandbox_id: str) -> None:
        self._record("destroy", sandbox_id)
        with self._lock:
            self._sandboxes.pop(sandbox_id, None)

    def list(self) -> list[SandboxInfo]:
        self._record("list", None)
        with self._lock:
            return [s.info(i) for i, s in self._sandboxes.items()]

    def inspect(self, sandbox_id: str) -> tuple[SandboxInfo, SandboxSpec]:
        self._record("inspect", sandbox_id)
        sandbox = self._get(sandbox_id)
        return sandbox.info(sandbox_id), sandbox.spec


def _make_folders(tree: dict[str, _Node], folder: str) -> None:
    """Make ``folder`` and its parents, as ``mkdir -p`` would; a file in the way refuses."""
    path = "/"
    for part in folder.strip("/").split("/"):
        if not part:
            continue
        path = posixpath.join(path, part)
        node = tree.setdefault(path, _Node(True))
        if not node.is_dir:
            raise PathSecurityError(f"{path!r} is a file, not a folder")


def fake_of(sandbox: Sandbox) -> FakeBackend:
    """The live FakeBackend behind ``sandbox``, to script it or read what it was asked."""
    backend = sandbox.backend
    if not isinstance(backend, FakeBackend):
        raise TypeError(f"{sandbox!r} does not run on the fake backend")
    return backend


@hookimpl
def corral_backends() -> list[BackendInfo]:
    return [
        BackendInfo(
            name=NAME,
            backend=FakeBackend,
            description="in-memory test double for unit tests; runs nothing, isolates nothing",
        )
    ]
