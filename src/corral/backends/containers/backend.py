"""ContainerBackend: the whole container lifecycle, once, for every engine.

Plan, verify, create and start, exec and the one-call run, usage and alive, destroy,
networks and gc live here; an ``Engine`` adapter speaks one engine's API.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, ClassVar, Literal

import attrs

from ...core.backend import Availability, Backend, Capability, ExecStatus
from ...core.errors import (
    BackendUnavailableError,
    ConflictError,
    InternalError,
    NotFoundError,
    PathSecurityError,
    ResourceLimitError,
    SandboxError,
)
from ...core.output import OutputSink
from ...core.results import Health, ResourceUsage, SandboxInfo
from ...core.spec import ExecRequest, SandboxSpec, choice_field, duration_field, size_field
from .. import engine_versions, sweep
from . import naming
from .engine import Engine, Stream
from .frames import exit_code_for_start_failure, feed_stdin, read_frames
from .hostview import HostView
from .http import EngineWait
from .plan import (
    CAPABILITIES,
    PULL_POLICIES,
    ContainerPlan,
    main_process_plan,
    numeric_user,
    plan,
)
from .verify import verify

__all__ = ["ContainerBackend", "ContainerSettings"]


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
        return CAPABILITIES | self._security

    def capability_hint(self, missing: Capability) -> str:
        with self._engine():
            return self.engine.capability_hint(missing)

    def diagnose(self) -> list[str]:
        with self._engine():
            return self.engine.diagnose()

    # -- lifecycle ------------------------------------------------------------------

    def _plan(self, spec: SandboxSpec, labels: dict[str, str]) -> ContainerPlan:
        return plan(
            spec,
            labels,
            image=self.settings.default_image,
            workspace_size=self.settings.workspace_size,
        )

    def create(self, sandbox_id: str, spec: SandboxSpec, labels: dict[str, str]) -> None:
        plan_ = self._plan(spec, labels)
        container_id = self._make(sandbox_id, spec, labels, plan_)
        with self._engine(sandbox_id):
            self.engine.start(container_id)
            self.engine.ready(plan_, container_id)

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
            naming.info_from_labels(
                self.name, c.labels["corral.sandbox"], c.labels, c.state, c.image
            )
            for c in found
            if "corral.sandbox" in c.labels
        ]
        return listed + naming.leftover_networks(self.name, networks, listed)

    def inspect(self, sandbox_id: str) -> tuple[SandboxInfo, SandboxSpec]:
        with self._engine(sandbox_id):
            state = self.engine.inspect(naming.container_name(sandbox_id))
        labels = state["Config"]["Labels"] or {}
        if labels.get("corral.backend") != self.name:
            raise NotFoundError("not a corral sandbox", backend=self.name, sandbox_id=sandbox_id)
        image = state.get("ImageName") or state["Config"].get("Image")
        info = naming.info_from_labels(
            self.name, sandbox_id, labels, state["State"]["Status"], image
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
        """
        view = self._view(sandbox_id)
        marker = uuid.uuid4().hex
        oom_before = view.oom_kills() if view else 0
        if request.user:
            request = attrs.evolve(request, user=numeric_user(request.user))
        with self._engine(sandbox_id):
            exec_id = self.engine.exec_create(
                naming.container_name(sandbox_id), request, {**request.env, sweep.MARKER: marker}
            )
            stream = self.engine.exec_start(exec_id)
        deadline = None if request.timeout is None else time.monotonic() + request.timeout

        def stop() -> None:
            with contextlib.suppress(SandboxError), self._engine(sandbox_id):
                pid = int(self.engine.exec_inspect(exec_id).get("Pid") or 0)
                if view is not None:
                    view.kill_marked(marker, also=[pid] if pid else [])

        try:
            try:
                feeder = feed_stdin(stream.socket, request.stdin)
                timed_out = read_frames(stream.socket, sink, deadline, stop, stream.buffered)
                if feeder is not None:
                    feeder.join(timeout=5)
            finally:
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
        if plan_ is None:
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
