"""ContainerBackend: the whole container lifecycle, once, for every engine.

Plan, verify, create and start, exec and the one-call run, usage and alive, destroy,
networks and gc live here; an ``Engine`` adapter speaks one engine's API.
"""

from __future__ import annotations

import builtins
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, ClassVar, Literal

import attrs

from ...core._log import log
from ...core.backend import (
    Availability,
    Backend,
    Capability,
    ExecStatus,
    is_snapshot_image,
    snapshot_id_of,
)
from ...core.errors import (
    BackendUnavailableError,
    CapabilityError,
    ConflictError,
    InternalError,
    NotFoundError,
    PathSecurityError,
    ResourceLimitError,
    SandboxError,
)
from ...core.output import OutputSink
from ...core.results import Change, Health, ResourceUsage, SandboxInfo, SnapshotInfo
from ...core.spec import ExecRequest, SandboxSpec, choice_field, duration_field, size_field
from .. import engine_versions, sweep
from . import lifetimes, naming, snapshots
from .engine import Engine, Stream
from .frames import exit_code_for_start_failure, feed_input, feed_stdin, read_frames
from .hostview import HostView
from .http import EngineWait
from .plan import (
    CAPABILITIES,
    LOCAL_CAPABILITIES,
    PULL_POLICIES,
    ContainerPlan,
    main_process_plan,
    numeric_user,
    plan,
)
from .verify import verify

__all__ = ["ContainerBackend", "ContainerSettings"]


# How long exec_signal and exec_resize wait for an exec of that name to begin.
_REGISTERED_WITHIN = 5.0


@attrs.define
class _RunningExec:
    """An exec with a name (a spawned process's) while it runs: for exec_signal and
    exec_resize, which another thread of the same program calls."""

    marker: str
    tty: bool
    exec_id: str = ""
    started: threading.Event = attrs.field(factory=threading.Event)


@attrs.frozen
class ContainerSettings:
    """What every engine's ``[backends.NAME]`` has; adapters add where to reach it."""

    timeout: float = duration_field("60s")
    pull: Literal["never", "missing", "always"] = choice_field("missing", PULL_POLICIES)
    default_image: str | None = None
    workspace_size: int = size_field("1GiB", minimum=1024**2)


class ContainerBackend(Backend):
    """Sandboxes as locked-down containers on an engine that ``Engine`` speaks to."""

    #: The adapter class; one instance per backend instance.
    Engine: ClassVar[type[Engine]]

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.engine = self.Engine(settings)
        self._verdict: engine_versions.Verdict | None = None
        self._security: Capability | None = None
        # What this process knows of its sandboxes, so that most calls need no inspect.
        self._specs: dict[str, SandboxSpec] = {}
        self._views: dict[str, HostView | None] = {}
        self._pidfiles: dict[str, tuple[str, str]] = {}  # sandbox: container id, pid file
        self._running: dict[tuple[str, str], _RunningExec] = {}  # (sandbox, name): exec
        self._swept = False  # networks of ended sandboxes, swept at the first bridged create
        self._sweep_lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.engine.url

    @contextlib.contextmanager
    def _engine(self, sandbox_id: str | None = None) -> Iterator[None]:
        """The error boundary around engine calls: the adapter's table, and corral's own
        errors completed with where they happened."""
        try:
            with self.engine.translate(sandbox_id):
                yield
        except SandboxError as e:
            e.backend = e.backend or self.name
            e.sandbox_id = e.sandbox_id or sandbox_id
            raise

    # -- what this engine can do ----------------------------------------------------

    def check(self) -> Availability:
        try:
            with self._engine():
                self.engine.ping()
            verdict = self._version_verdict()
        except BackendUnavailableError as e:
            return Availability(False, e.message, e.fix or self.engine.start_fix())
        except SandboxError as e:
            return Availability(False, str(e), f"check {self.engine.title}")
        if verdict.refused:
            return Availability(False, f"refused: {verdict.refused}", "upgrade the engine")
        return Availability(True, self.engine.describe(), warnings=verdict.warnings)

    def _version_verdict(self) -> engine_versions.Verdict:
        """The version gate's verdict on this engine, asked once."""
        if self._verdict is None:
            with self._engine():
                report = self.engine.version()
            self._verdict = engine_versions.judge_report(self.name, report)
        return self._verdict

    def capabilities(self) -> Capability:
        if self._security is None:
            with self._engine():
                self._security = self.engine.security()
        local = LOCAL_CAPABILITIES if self.engine.socket_path is not None else Capability(0)
        return CAPABILITIES | self._security | local

    def capability_hint(self, missing: Capability) -> str:
        if missing & LOCAL_CAPABILITIES and self.engine.socket_path is None:
            return (
                f"{self.engine.title} at {self.url} is not on this host: signalling a "
                "command (PROCESSES) and moving a lifetime (EXTEND) need its pids and "
                "folders on this host; use an engine here (a unix:// socket)"
            )
        with self._engine():
            return self.engine.capability_hint(missing)

    def diagnose(self) -> list[str]:
        with self._engine():
            return self.engine.diagnose()

    # -- lifecycle ------------------------------------------------------------------

    def _plan(self, spec: SandboxSpec, labels: dict[str, str]) -> ContainerPlan:
        folder = None
        if self.engine.socket_path is not None and spec.command is None:
            # A lifetime extend can move (EXTEND): its host folder, named by a label.
            folder = str(lifetimes.prepare(self.name, labels["corral.sandbox"]))
            labels = {**labels, lifetimes.LABEL: folder}
        return plan(
            spec,
            labels,
            image=self.settings.default_image,
            workspace_size=self.settings.workspace_size,
            lifetime_folder=folder,
        )

    def create(self, sandbox_id: str, spec: SandboxSpec, labels: dict[str, str]) -> None:
        plan_ = self._plan(spec, labels)
        container_id = self._make(sandbox_id, spec, labels, plan_)
        with self._engine(sandbox_id):
            self.engine.start(container_id)
            self.engine.ready(plan_, container_id)
        if is_snapshot_image(plan_.image) and not self.engine.copies_up_tmpfs:
            self._fill_from_snapshot(sandbox_id, plan_)
        self._record_baseline(sandbox_id, plan_)  # what changes() compares with

    def _make(
        self, sandbox_id: str, spec: SandboxSpec, labels: dict[str, str], plan_: ContainerPlan
    ) -> str:
        """Create the container of ``plan_`` (and its network), not started, and verify
        it; its id."""
        with self._engine(sandbox_id):
            self._ensure_image(plan_.image)
            self._specs[sandbox_id] = spec  # so that destroy, after a failure too, finds all
            if plan_.network_name:
                self._create_network(plan_.network_name, labels)
            container_id = self.engine.create(plan_)
            made = self.engine.inspect(container_id)
        verify(plan_, made)
        if made.get("PidFile"):  # where the runtime writes the init's pid once started
            self._pidfiles[sandbox_id] = (container_id, made["PidFile"])
        return container_id

    def _ensure_image(self, image: str) -> None:
        if is_snapshot_image(image):  # this engine's own: never pulled
            self._ensure_snapshot(image)
            return
        policy = self.settings.pull
        if policy != "always":
            with self._engine():
                if self.engine.image_exists(image):
                    return
            if policy == "never":
                raise NotFoundError(
                    f"image {image!r} is not on {self.engine.title} and the pull policy is 'never'",
                    fix=f"pull it first, or set backends.{self.name}.pull = 'missing'",
                )
        try:
            with self._engine():
                self.engine.pull(image)
        except (ResourceLimitError, BackendUnavailableError):
            raise  # the engine's storage is full, or it went away: not a missing image
        except SandboxError as e:
            raise NotFoundError(
                f"image {image!r} could not be pulled (pull policy {policy!r}): {e.message}"
            ) from e

    def _create_network(self, name: str, labels: dict[str, str]) -> None:
        self._sweep_networks()
        try:
            with self._engine():
                self.engine.create_network(name, labels)
        except ResourceLimitError:
            # Every subnet is taken: those of sandboxes that ended may be what holds them.
            self._sweep_networks(force=True)
            with self._engine():
                self.engine.create_network(name, labels)

    def _sweep_networks(self, *, force: bool = False) -> None:
        """Remove the networks of sandboxes whose lifetime ended (their containers removed
        themselves, leaving them): once per backend object, or again when ``force``d."""
        with self._sweep_lock:
            if self._swept and not force:
                return
            self._swept = True
        now = time.time()
        with self._engine():
            networks = self.engine.networks()
        for name, labels in networks:
            if naming.expired(labels, now):
                # Refused while a container is still on it: it is then not left over.
                with contextlib.suppress(SandboxError), self._engine():
                    self.engine.remove_network(name)

    def destroy(self, sandbox_id: str) -> None:
        self._views.pop(sandbox_id, None)
        self._pidfiles.pop(sandbox_id, None)
        spec = self._specs.pop(sandbox_id, None)
        self._remove_container(sandbox_id)
        lifetimes.remove(self.name, sandbox_id)  # after the container: its PID 1 reads it
        snapshots.drop_baseline(self.name, sandbox_id)
        # Its own network, after the container; asked of the engine when this process
        # does not know the sandbox (gc, a leftover), never for a sandbox of none.
        if spec is None or spec.network.mode == "bridge":
            self._remove_network(sandbox_id)

    def _remove_container(self, sandbox_id: str) -> None:
        name = naming.container_name(sandbox_id)
        try:
            with self._engine(sandbox_id):
                self.engine.remove(name)
        except NotFoundError:
            return  # gone already (its lifetime ended, or removed from outside)
        except ConflictError:
            pass  # the engine is removing it already (its lifetime just ended)
        else:
            return
        deadline = time.monotonic() + 30
        while self._exists(name, sandbox_id):
            if time.monotonic() > deadline:
                raise ConflictError(
                    "the engine did not finish removing the sandbox",
                    backend=self.name,
                    sandbox_id=sandbox_id,
                    fix="close it again later, or run `corral gc`",
                )
            time.sleep(0.05)

    def _exists(self, name: str, sandbox_id: str) -> bool:
        try:
            with self._engine(sandbox_id):
                self.engine.inspect(name)
        except NotFoundError:
            return False
        return True

    def _remove_network(self, sandbox_id: str) -> None:
        """Again for a few seconds while the engine says it is busy: the container's
        endpoint can outlive the container by a moment when the engine removed it by
        itself (its lifetime ended while it was being destroyed)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                with self._engine(sandbox_id):
                    self.engine.remove_network(naming.network_name(sandbox_id))
                return
            except NotFoundError:
                return  # no network of its own, or removed already
            except ConflictError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def list(self) -> list[SandboxInfo]:
        with self._engine():
            found = self.engine.containers()
            networks = self.engine.networks()
        listed = [
            lifetimes.with_moved_expires(
                naming.info_from_labels(
                    self.name, c.labels["corral.sandbox"], c.labels, c.state, c.image
                )
            )
            for c in found
            if "corral.sandbox" in c.labels
        ]
        lifetimes.sweep(self.name, {info.id for info in listed})
        return listed + naming.leftover_networks(self.name, networks, listed)

    def inspect(self, sandbox_id: str) -> tuple[SandboxInfo, SandboxSpec]:
        with self._engine(sandbox_id):
            state = self.engine.inspect(naming.container_name(sandbox_id))
        labels = state["Config"]["Labels"] or {}
        if labels.get("corral.backend") != self.name:
            raise NotFoundError("not a corral sandbox", backend=self.name, sandbox_id=sandbox_id)
        image = state.get("ImageName") or state["Config"].get("Image")
        info = lifetimes.with_moved_expires(
            naming.info_from_labels(self.name, sandbox_id, labels, state["State"]["Status"], image)
        )
        spec = self._specs[sandbox_id] = naming.spec_from_labels(labels)
        return info, spec

    def alive(self, sandbox_id: str) -> bool:
        # From the host's view of the container when the engine is local: microseconds,
        # where an inspect call takes milliseconds (tens on Podman).
        try:
            view = self._view(sandbox_id)
        except SandboxError:
            return False
        return view.running() if view is not None else super().alive(sandbox_id)

    def pause(self, sandbox_id: str) -> None:
        with self._engine(sandbox_id):
            self.engine.pause(naming.container_name(sandbox_id))

    def resume(self, sandbox_id: str) -> None:
        with self._engine(sandbox_id):
            self.engine.unpause(naming.container_name(sandbox_id))

    # -- long-lived sandboxes: processes, terminals, lifetime, ports -------------------

    def _refuse_paused(self, sandbox_id: str, what: str, ask_engine: bool = True) -> None:
        """ConflictError when the sandbox is paused: the engines take an archive call on
        a paused container, and the caller must learn it is paused, not see a hang.
        From the host's view (the freezer's state, microseconds), else the engine's
        unless not ``ask_engine`` (an exec: the engines refuse it themselves, saying
        the container is paused)."""
        view = self._view(sandbox_id)
        if view is not None:
            paused = view.paused()
        elif not ask_engine:
            return
        else:
            with self._engine(sandbox_id):
                state = self.engine.inspect(naming.container_name(sandbox_id))
            paused = state["State"].get("Status") == "paused"
        if paused:
            raise ConflictError(
                f"the sandbox is paused: cannot {what}",
                backend=self.name,
                sandbox_id=sandbox_id,
                fix="resume it first (Sandbox.resume), or create it with auto_resume=True",
            )

    def _running_exec(self, sandbox_id: str, name: str) -> _RunningExec:
        """The running exec named ``name`` (``ExecRequest.name``), once started. Waited
        for a moment: the thread that runs it may not have begun yet (a spawn returns
        while its exec is being made)."""
        deadline = time.monotonic() + _REGISTERED_WITHIN
        while (running := self._running.get((sandbox_id, name))) is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if running is not None:
            running.started.wait(self.settings.timeout)
        if running is None or not running.exec_id or not running.started.is_set():
            raise NotFoundError(
                f"no command named {name!r} runs in the sandbox (from this program)",
                backend=self.name,
                sandbox_id=sandbox_id,
            )
        return running

    def exec_signal(self, sandbox_id: str, name: str, signum: int) -> None:
        """To the command itself: the exec's pid (a host pid on a local engine), checked
        to be a process of the container carrying the exec's marker, through a pidfd.
        A remote engine's pids are not this host's, and an exec of ``kill`` would need
        the image to have one and could not tell the command from a process that took
        its pid: PROCESSES holds with a local engine only."""
        running = self._running_exec(sandbox_id, name)
        view = self._view(sandbox_id)
        if view is None:
            raise CapabilityError(
                f"cannot signal a command: {self.engine.title} is not on this host",
                backend=self.name,
                sandbox_id=sandbox_id,
            )
        # Until runc has executed the command, its pid is runc's helper (without the
        # marker) or not reported yet: asked again for a moment.
        deadline = time.monotonic() + 5
        while True:
            with self._engine(sandbox_id):
                state = self.engine.exec_inspect(running.exec_id)
            pid = int(state.get("Pid") or 0)
            if pid and view.signal_marked(pid, running.marker, signum):
                return
            ended = state.get("Running") is False and state.get("ExitCode") is not None
            if ended or time.monotonic() > deadline:
                raise NotFoundError(
                    f"the command named {name!r} has ended",
                    backend=self.name,
                    sandbox_id=sandbox_id,
                )
            time.sleep(0.01)

    def exec_resize(self, sandbox_id: str, name: str, rows: int, cols: int) -> None:
        running = self._running_exec(sandbox_id, name)
        if not running.tty:
            raise ConflictError(
                f"the command named {name!r} has no terminal to resize",
                backend=self.name,
                sandbox_id=sandbox_id,
            )
        with self._engine(sandbox_id):
            self.engine.exec_resize(running.exec_id, rows, cols)

    def extend(self, sandbox_id: str, expires: float) -> None:
        """Move the end in the sandbox's host folder (``lifetimes.py``): the record that
        list, inspect and gc read, and PID 1's timer, bound read-only."""
        info, spec = self.inspect(sandbox_id)
        folder = lifetimes.folder_of(info.labels, self.name, sandbox_id)
        if folder is None or not folder.is_dir():
            why = (
                "it runs a command of its own as PID 1 (sandbox.command)"
                if spec.command is not None
                else f"it was made without a host folder for its lifetime ({self.engine.title}"
                " is not on this host, or it was made by another host)"
            )
            raise CapabilityError(
                f"this sandbox's lifetime cannot be moved: {why}",
                backend=self.name,
                sandbox_id=sandbox_id,
            )
        try:
            lifetimes.move(folder, float(info.labels["corral.expires"]), expires)
        except OSError as e:
            raise ConflictError(
                f"the sandbox's lifetime folder {folder} cannot be written ({e.strerror}): "
                "only the user whose program made the sandbox can move its end",
                backend=self.name,
                sandbox_id=sandbox_id,
            ) from e

    def port(self, sandbox_id: str, port: int) -> tuple[str, int]:
        """Where the engine published ``port`` (on 127.0.0.1, as the plan asked)."""
        with self._engine(sandbox_id):
            state = self.engine.inspect(naming.container_name(sandbox_id))
        published = ((state.get("NetworkSettings") or {}).get("Ports") or {}).get(f"{port}/tcp")
        for binding in published or []:
            if binding.get("HostIp") in ("127.0.0.1", "") and binding.get("HostPort"):
                return "127.0.0.1", int(binding["HostPort"])
        raise NotFoundError(
            f"port {port} of the sandbox is not published (sandbox.ports lists the ones that are)",
            backend=self.name,
            sandbox_id=sandbox_id,
        )

    def health(self, sandbox_id: str) -> Health:
        name = naming.container_name(sandbox_id)
        with self._engine(sandbox_id):
            report = self.engine.health(name, self.engine.inspect(name))
        if not report:
            return Health(status="none")
        log = report.get("Log") or []
        return Health(
            status=report.get("Status", "none"),
            failing_streak=report.get("FailingStreak", 0),
            last_output=(log[-1].get("Output", "") if log else ""),
        )

    # -- the host's view --------------------------------------------------------------

    def _view(self, sandbox_id: str) -> HostView | None:
        if sandbox_id not in self._views:
            view = self._view_by_pidfile(sandbox_id)
            if view is None:
                with self._engine(sandbox_id):
                    state = self.engine.inspect(naming.container_name(sandbox_id))
                view = HostView.find(state["Id"], int(state["State"].get("Pid") or 0))
            if view is not None:
                view.spare_keepalive()
            self._views[sandbox_id] = view
        return self._views[sandbox_id]

    def _view_by_pidfile(self, sandbox_id: str) -> HostView | None:
        """The view of a sandbox this program made, from the runtime's pid file on this
        host: one inspect call fewer per sandbox, which under load takes most of a
        second on Podman. None when the file is not here (a remote engine) or names a
        process outside the container's cgroups."""
        made = self._pidfiles.pop(sandbox_id, None)
        if made is None:
            return None
        container_id, pidfile = made
        try:
            pid = int(Path(pidfile).read_text())
        except (OSError, ValueError):
            return None
        view = HostView.find(container_id, pid)
        if view is None or not view.folders:
            return None
        if not all(container_id in str(folder) for folder in view.folders.values()):
            return None
        return view if pid in view.pids() else None

    # -- exec -------------------------------------------------------------------------

    def exec(self, sandbox_id: str, request: ExecRequest, sink: OutputSink) -> ExecStatus:
        """Run one exec to its end: stream, stdin, timeout, sweep, OOM.

        The engines have no API to stop an exec, so on timeout its processes are killed
        from the host: each exec carries a marker variable, and every process in the
        container that carries it dies, ``setsid`` escapees included. The same sweep
        runs when the command ends, so nothing it left in the background outlives it.

        A named exec (a spawned process's) is its name's marker, and is kept by name
        while it runs for ``exec_signal`` and ``exec_resize``; ``request.input`` is
        copied to its stdin as it comes; a ``tty`` exec's stream is the terminal's.
        """
        view = self._view(sandbox_id)
        self._refuse_paused(sandbox_id, "run a command", ask_engine=False)
        marker = request.name or uuid.uuid4().hex
        oom_before = view.oom_kills() if view else 0
        if request.user:
            request = attrs.evolve(request, user=numeric_user(request.user))
        env = {**request.env, sweep.MARKER: marker}
        if request.tty:
            env.setdefault("TERM", "xterm-256color")
        key = (sandbox_id, request.name) if request.name else None
        running = _RunningExec(marker, request.tty)
        if key is not None:
            self._running[key] = running  # a signal asked meanwhile waits for the start
        try:
            with self._engine(sandbox_id):
                exec_id = self.engine.exec_create(naming.container_name(sandbox_id), request, env)
                stream = self.engine.exec_start(exec_id, tty=request.tty)
            running.exec_id = exec_id
            running.started.set()
            return self._exec_stream(sandbox_id, request, sink, view, running, stream, oom_before)
        finally:
            running.started.set()  # a waiter for a failed start goes on (without an id)
            if key is not None and self._running.get(key) is running:
                del self._running[key]

    def _exec_stream(
        self,
        sandbox_id: str,
        request: ExecRequest,
        sink: OutputSink,
        view: HostView | None,
        running: _RunningExec,
        stream: Stream,
        oom_before: int,
    ) -> ExecStatus:
        exec_id, marker = running.exec_id, running.marker
        deadline = None if request.timeout is None else time.monotonic() + request.timeout

        def stop() -> None:
            with contextlib.suppress(SandboxError), self._engine(sandbox_id):
                pid = int(self.engine.exec_inspect(exec_id).get("Pid") or 0)
                if view is not None:
                    view.kill_marked(marker, also=[pid] if pid else [])

        ended = threading.Event()
        try:
            try:
                feeder: threading.Thread | None
                if request.input is not None:
                    feeder = feed_input(stream.socket, request.input, ended, tty=request.tty)
                else:
                    feeder = feed_stdin(stream.socket, request.stdin)
                timed_out = read_frames(
                    stream.socket, sink, deadline, stop, stream.buffered, raw=request.tty
                )
                ended.set()
                if feeder is not None:
                    if request.input is not None:
                        # A write blocked on a command that no longer reads wakes now.
                        with contextlib.suppress(OSError):
                            stream.socket.shutdown(socket.SHUT_RDWR)
                    feeder.join(timeout=5)
            finally:
                ended.set()
                stream.close()
            code = self._exec_exit_code(exec_id, sandbox_id)
        finally:
            # An exec owns its descendants, also when it failed: a stream the engine broke
            # (a restart) or an exit code it cannot report must not leave the command
            # running.
            if view is not None:
                view.kill_marked(marker)
        code = exit_code_for_start_failure(code, sink.value("stderr") + sink.value("stdout"))
        # Exit 137 alone means "SIGKILL from somewhere"; OOM needs the cgroup's own count,
        # taken as a delta around this exec (the container's own flag is sticky, T35).
        oom_events = max(0, view.oom_kills() - oom_before) if view is not None else 0
        return ExecStatus(
            exit_code=code,
            timed_out=timed_out,
            oom_killed=code == 137 and not timed_out and oom_events > 0,
            signal=code - 128 if code > 128 else None,
            oom_events=oom_events,
        )

    def _exec_exit_code(self, exec_id: str, sandbox_id: str) -> int:
        deadline = time.monotonic() + 10
        while True:
            with self._engine(sandbox_id):
                state = self.engine.exec_inspect(exec_id)
            if not state.get("Running") and state.get("ExitCode") is not None:
                return int(state["ExitCode"])
            if time.monotonic() > deadline:
                raise InternalError(
                    f"{self.engine.title} did not report the exec's end",
                    backend=self.name,
                    sandbox_id=sandbox_id,
                )
            time.sleep(0.01)

    def run_once(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        labels: dict[str, str],
        request: ExecRequest,
        sink: OutputSink,
    ) -> ExecStatus:
        """The command as the container's own process: no exec. A wait asked before the
        start reports its end, also when the engine removes the container at once."""
        plan_ = main_process_plan(
            spec,
            request,
            labels,
            local=self.engine.socket_path is not None,
            image=self.settings.default_image,
            workspace_size=self.settings.workspace_size,
        )
        if plan_ is None or (is_snapshot_image(plan_.image) and not self.engine.copies_up_tmpfs):
            # (A snapshot's tmpfs files, where the engine loses them, are put in by create.)
            return super().run_once(sandbox_id, spec, labels, request, sink)
        socket_path = self.engine.socket_path
        assert socket_path is not None  # main_process_plan asks for a local engine
        removed = False
        waiter: EngineWait | None = None
        stream: Stream | None = None
        try:
            container_id = self._make(sandbox_id, spec, labels, plan_)
            with self._engine(sandbox_id):  # its refusal names the backend and sandbox
                try:
                    waiter = EngineWait(
                        socket_path, self.engine.wait_path(container_id), self.settings.timeout
                    )
                except OSError as e:
                    raise self.engine.unavailable(e, sandbox_id) from e
            with self._engine(sandbox_id):
                stream = self.engine.attach(container_id)
                ended = self.engine.outcome(container_id, sandbox_id)
                self.engine.ready(plan_, container_id)
                self.engine.start(container_id)

            def kill() -> None:  # the whole container: every process the command started
                with contextlib.suppress(SandboxError), self._engine(sandbox_id):
                    self.engine.kill(container_id)

            deadline = None if request.timeout is None else time.monotonic() + request.timeout
            try:
                timed_out = read_frames(stream.socket, sink, deadline, kill, stream.buffered)
            finally:
                stream.close()
            with self._engine(sandbox_id):
                outcome = ended(waiter)
            removed = outcome.removed
        finally:
            if waiter is not None:
                waiter.close()
            if stream is not None:
                stream.close()
            if not removed:
                self.destroy(sandbox_id)
        code = exit_code_for_start_failure(
            outcome.exit_code, sink.value("stderr") + sink.value("stdout")
        )
        return ExecStatus(
            exit_code=code,
            timed_out=timed_out,
            # The container is this one command: its own OOM record is the command's.
            oom_killed=outcome.oom_events > 0 and code == 137 and not timed_out,
            signal=code - 128 if code > 128 else None,
            oom_events=outcome.oom_events,
        )

    # -- files and usage ----------------------------------------------------------------

    def put_archive(self, sandbox_id: str, path: str, archive: IO[bytes]) -> None:
        self._refuse_paused(sandbox_id, "write files")
        try:
            with self._engine(sandbox_id):
                self.engine.put_archive(naming.container_name(sandbox_id), path, archive)
        except PathSecurityError as e:
            # The engine's words need not name the folder (Docker: "mounted volume is
            # marked read-only").
            raise PathSecurityError(
                f"{path!r} is read-only in the sandbox ({e.message})",
                backend=self.name,
                sandbox_id=sandbox_id,
                fix=e.fix,
            ) from e

    def get_archive(self, sandbox_id: str, path: str) -> Iterator[bytes]:
        self._refuse_paused(sandbox_id, "read files")
        with self._engine(sandbox_id):
            yield from self.engine.get_archive(naming.container_name(sandbox_id), path)

    def usage(self, sandbox_id: str) -> ResourceUsage:
        view = self._view(sandbox_id)
        if view is not None and view.init_pid not in view.pids():
            # The container ended since its view was taken (killed or removed from
            # outside): its cgroup is gone, and the engine says why.
            self._views.pop(sandbox_id, None)
            view = None
        if sandbox_id not in self._specs:
            self._specs[sandbox_id] = self.inspect(sandbox_id)[1]
        limit = self._specs[sandbox_id].limits.memory
        if view is not None:
            return view.usage(limit)
        with self._engine(sandbox_id):
            return self.engine.stats(naming.container_name(sandbox_id), limit)

    def close(self) -> None:
        self.engine.close()

    # -- snapshots and changes (issue 15) ----------------------------------------------

    def snapshot(
        self, sandbox_id: str, snapshot_id: str, labels: dict[str, str], memory: bool
    ) -> SnapshotInfo:
        """The sandbox's files as the image ``corral-snapshot:<snapshot_id>``: its
        writable layer (an engine commit) and the files of its workspace and /tmp
        (tmpfs volumes, which a commit leaves out) copied in through the archive API,
        links as links (never followed: T59). The sandbox is paused while both are read,
        so that they are of one moment (one paused already stays so; another thread's
        calls meanwhile meet a paused sandbox); where the engine cannot read a paused
        sandbox's tmpfs (Podman), for the commit only, and a paused sandbox is refused
        (ConflictError: resume it first). The image carries the source's
        configuration (environment, user, labels) as an engine commit does; a sandbox
        made from it sets its own over it. A tmpfs the spec asks for, binds and volumes
        are not kept; running processes are not (``memory``: CapabilityError at once)."""
        if memory:
            raise CapabilityError(
                f"the {self.name} backend cannot capture running processes "
                "(MEMORY_SNAPSHOTS): its snapshots keep the sandbox's files",
                backend=self.name,
                sandbox_id=sandbox_id,
                fix="take the snapshot with memory=False",
            )
        name = naming.container_name(sandbox_id)
        with self._engine(sandbox_id):
            state = self.engine.inspect(name)
            taken = self.engine.image_exists(snapshots.image_of(snapshot_id))
        source = state["Config"]["Labels"] or {}
        if source.get("corral.backend") != self.name:
            raise NotFoundError("not a corral sandbox", backend=self.name, sandbox_id=sandbox_id)
        if taken:
            raise ConflictError(
                f"snapshot {snapshot_id!r} exists already", backend=self.name, sandbox_id=sandbox_id
            )
        image_labels = snapshots.snapshot_labels(
            labels, source, backend=self.name, sandbox_id=sandbox_id, snapshot_id=snapshot_id
        )
        trees = snapshots.copied_trees(
            naming.spec_from_labels(source), source, self.settings.workspace_size
        )
        made: builtins.list[tuple[str, str]] = []  # ("image" | "container", ref)
        archives: builtins.list[tuple[str, IO[bytes]]] = []
        try:
            with self._engine(sandbox_id):
                layer = self._capture(name, state, image_labels, trees, archives)
                made.append(("image", layer))
                holder = self.engine.create_holder(
                    layer, snapshots.holder_name(snapshot_id), snapshots.holder_labels(snapshot_id)
                )
                made.append(("container", holder))
                for tree, archive in archives:
                    self.engine.put_archive(holder, snapshots.parent_of(tree), archive)
                final_labels = {**image_labels, snapshots.HOLDER_LABEL: ""}  # not the holder's
                self.engine.commit(holder, final_labels, snapshots.SNAPSHOT_REPO, snapshot_id)
        except BaseException:
            self._discard(made)
            raise
        finally:
            for _, archive in archives:
                archive.close()
        # The layer's own image: what the snapshot needs of it stays (Docker refuses
        # while the snapshot is above it, and removes it with it). The holder too, unless
        # sandboxes made from the snapshot get their tmpfs files from it (Docker).
        self._discard([m for m in made if m[0] == "image" or self.engine.copies_up_tmpfs])
        return self._snapshot_info(snapshot_id)

    def _capture(
        self,
        name: str,
        state: dict[str, Any],
        labels: dict[str, str],
        trees: builtins.list[str],
        archives: builtins.list[tuple[str, IO[bytes]]],
    ) -> str:
        """Commit the writable layer (its image's id) and add each tree's archive to
        ``archives`` (the caller closes them), the container paused meanwhile, or for
        the commit only where the engine cannot read a paused container's tmpfs
        (Podman: it reads the storage under them then, and a paused sandbox is refused
        rather than read so)."""
        paused = bool(state["State"].get("Paused"))
        if paused and not self.engine.archive_while_paused:
            raise ConflictError(
                f"the sandbox is paused, and {self.engine.title} cannot read its workspace "
                "and /tmp while it is",
                fix="resume it, then take the snapshot",
            )
        frozen = not paused
        if frozen:
            self.engine.pause(name)
        try:
            layer = self.engine.commit(name, labels)
            try:
                if frozen and not self.engine.archive_while_paused:
                    self.engine.unpause(name)
                    frozen = False
                for tree in trees:
                    chunks = self.engine.get_archive(name, tree)
                    archives.append((tree, snapshots.spooled_archive(chunks)))
            except BaseException:
                self._discard([("image", layer)])
                raise
        finally:
            if frozen:
                self.engine.unpause(name)
        return layer

    def _discard(self, made: builtins.list[tuple[str, str]]) -> None:
        """Remove what a snapshot made, newest first, as far as the engine lets."""
        for kind, ref in reversed(made):
            with contextlib.suppress(SandboxError), self._engine():
                if kind == "container":
                    self.engine.remove(ref)
                else:
                    self.engine.remove_image(ref)

    def _fill_from_snapshot(self, sandbox_id: str, plan_: ContainerPlan) -> None:
        """Put a snapshot's workspace and /tmp files into the new sandbox's tmpfs volumes,
        where the engine's copy-up loses them (Docker): from the snapshot's holder (a
        container of its files, never started), engine to engine; from a holder made
        for the purpose if that one was removed from outside (a container prune)."""
        snapshot_id = snapshot_id_of(plan_.image)
        holder = snapshots.holder_name(snapshot_id)
        made = None
        if not self._exists(holder, sandbox_id):
            with self._engine(sandbox_id):
                made = self.engine.create_holder(
                    plan_.image, f"{holder}-{uuid.uuid4().hex[:8]}", snapshots.holder_labels("")
                )
            holder = made
        try:
            target = naming.container_name(sandbox_id)
            for tree in [t.target for t in plan_.tmpfs_volumes if t.copy_up]:
                with contextlib.suppress(NotFoundError), self._engine(sandbox_id):
                    # NotFoundError: the snapshot has no such folder (nothing to copy).
                    self.engine.copy_archive(holder, snapshots.contents_of(tree), target, tree)
        finally:
            if made is not None:
                self._discard([("container", made)])

    def _snapshot_info(self, snapshot_id: str) -> SnapshotInfo:
        with self._engine():
            found = self.engine.snapshot_images(f"{snapshots.SNAPSHOT_LABEL}={snapshot_id}")
        info = snapshots.listing(self.name, found).get(snapshot_id)
        if info is None:
            raise InternalError(f"the snapshot {snapshot_id!r} was made but is not listed")
        return info

    def _ensure_snapshot(self, image: str) -> None:
        """A snapshot's image is this engine's own, never pulled: it is here or gone."""
        with self._engine():
            if self.engine.image_exists(image):
                return
        raise NotFoundError(
            f"snapshot {snapshot_id_of(image)!r} is not on {self.engine.title} (removed, "
            "or taken on another engine)",
            backend=self.name,
            fix="take it again; corral.snapshots() lists the snapshots there are",
        )

    def snapshots(self) -> builtins.list[SnapshotInfo]:
        with self._engine():
            images = self.engine.snapshot_images(snapshots.SNAPSHOT_LABEL)
        found = snapshots.listing(self.name, images).values()
        return sorted(found, key=lambda s: (s.created, s.id))

    def remove_snapshot(self, snapshot_id: str) -> None:
        """Remove the snapshot's image, and what a snapshot cut short left of it (its
        holder container, untagged images). Idempotent; ConflictError while a sandbox
        made from it is there."""
        try:
            with self._engine():
                # The image first: refused while a sandbox uses it, the holder kept then.
                self.engine.remove_image(snapshots.image_of(snapshot_id))
                self.engine.remove(snapshots.holder_name(snapshot_id))
                left = self.engine.snapshot_images(f"{snapshots.SNAPSHOT_LABEL}={snapshot_id}")
        except ConflictError as e:
            raise ConflictError(
                f"snapshot {snapshot_id!r} is in use: {e.message}",
                backend=self.name,
                fix="close the sandboxes made from it first",
            ) from e
        for image in left:
            with contextlib.suppress(ConflictError), self._engine():
                self.engine.remove_image(image.id)

    def changes(self, sandbox_id: str) -> builtins.list[Change]:
        """What was added, changed and deleted since the sandbox was made, sorted by path.

        Under every writable mount (the workspace, /tmp, a spec's tmpfs, read-write binds
        and volumes) by a metadata walk from the host compared with the baseline taken
        at create: type, mode, owner, size, modification and change times, inode; a
        folder whose entries changed is itself changed (as ``docker diff`` says). With a
        writable root, also the writable layer, from the engine's diff less what it said
        at create (the engine's own mount points). Never listed: corral's own files
        (``/.corral-*``, the movable lifetime's timer, and ``/tmp/.corral-*``, the
        repository plugin's helper and credentials; a sandbox's own files named so are
        hidden too: this is a report, not a boundary), and folders deeper than
        ``snapshots.MAX_DEPTH`` are not walked into. File contents are never read.
        """
        view = self._live_view(sandbox_id)
        baseline = snapshots.load_baseline(self.name, sandbox_id)
        if baseline is None:
            raise NotFoundError(
                "no record of what the sandbox held when made is on this host",
                backend=self.name,
                sandbox_id=sandbox_id,
                fix="list changes on the host that made the sandbox",
            )
        try:
            walked = snapshots.walk(view.init_pid, baseline.trees)
        except OSError as e:
            raise NotFoundError(
                f"the sandbox ended ({e.strerror})", backend=self.name, sandbox_id=sandbox_id
            ) from e
        found = snapshots.compare(baseline.entries, walked)
        if baseline.layer is not None:
            with self._engine(sandbox_id):
                layer = self.engine.changes(naming.container_name(sandbox_id))
            found += snapshots.layer_changes(layer, baseline.layer, baseline.mounts)
        if view.init_pid not in view.pids():  # ended meanwhile: its pid may be another's
            raise NotFoundError("the sandbox ended", backend=self.name, sandbox_id=sandbox_id)
        return sorted({c.path: c for c in found}.values(), key=lambda c: c.path)

    def _live_view(self, sandbox_id: str) -> HostView:
        view = self._view(sandbox_id)
        if view is not None and view.init_pid not in view.pids():
            self._views.pop(sandbox_id, None)  # ended: the engine says whether it is gone
            view = self._view(sandbox_id)
        if view is None:
            raise CapabilityError(
                f"{self.engine.title} at {self.url} is not on this host: changes are read "
                "from the host, out of the sandbox's reach",
                backend=self.name,
                sandbox_id=sandbox_id,
                fix="use an engine on this host (a unix:// socket)",
            )
        return view

    def _record_baseline(self, sandbox_id: str, plan_: ContainerPlan) -> None:
        """What ``changes`` compares with, taken as the sandbox starts, kept on this host
        (where the sandbox cannot alter it). Without one (a remote engine; a failure
        here, logged) ``changes`` refuses, and the sandbox is otherwise fine."""
        try:
            view = self._view(sandbox_id)
            if view is None:
                return
            trees = snapshots.writable_trees(plan_)
            layer = None
            if not plan_.read_only:
                with self._engine(sandbox_id):
                    layer = self.engine.changes(plan_.name)
            entries = snapshots.walk(view.init_pid, trees)
            baseline = snapshots.Baseline(trees, snapshots.mount_targets(plan_), entries, layer)
            snapshots.save_baseline(self.name, sandbox_id, baseline)
        except (OSError, SandboxError) as e:
            log.warning("sandbox %s: no baseline for its changes (%s)", sandbox_id, e)
            return
        if snapshots.sweep_due(self.name):
            self._sweep_baselines()

    def _sweep_baselines(self) -> None:
        """Drop the baselines of sandboxes that ended on their own (the engine removed
        their containers at their lifetime's end: no destroy dropped them)."""
        stale = snapshots.stale_baselines(self.name)
        if not stale:
            return
        with contextlib.suppress(SandboxError), self._engine():
            alive = {c.labels.get("corral.sandbox") for c in self.engine.containers()}
            for sandbox_id in stale:
                if sandbox_id not in alive:
                    snapshots.drop_baseline(self.name, sandbox_id)
