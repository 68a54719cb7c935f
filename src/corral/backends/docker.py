"""The Docker backend: containers on a Docker Engine through the ``docker`` package.

Installed with ``pip install corral[docker]``; the client is imported only when the
backend is first used. What Docker and Podman share lives in ``containers.py``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import IO, Any, Literal

import attrs

from ..core.backend import Availability, Backend, BackendInfo, Capability, ExecStatus
from ..core.errors import (
    BackendUnavailableError,
    ConflictError,
    InternalError,
    NotFoundError,
    PathSecurityError,
    ResourceLimitError,
    SandboxError,
)
from ..core.errors import TimeoutError as CorralTimeoutError
from ..core.hookspecs import hookimpl
from ..core.output import OutputSink
from ..core.results import Health, ResourceUsage, SandboxInfo
from ..core.spec import ExecRequest, SandboxSpec, choice_field, duration_field, size_field
from . import containers, engine_versions, sweep
from .containers import HostView

__all__ = ["DockerBackend", "DockerSettings"]

_DEFAULT_URL = "unix:///var/run/docker.sock"
_MANAGED = ["corral.managed=true", "corral.backend=docker"]


@attrs.frozen
class DockerSettings:
    """``[backends.docker]``."""

    url: str | None = None  # default: DOCKER_HOST, else the standard socket
    tls_verify: bool = False
    cert_path: str | None = None
    timeout: float = duration_field("60s")
    pull: Literal["never", "missing", "always"] = choice_field("missing", containers.PULL_POLICIES)
    default_image: str | None = None
    workspace_size: int = size_field("1GiB", minimum=1024**2)

    def engine_url(self) -> str:
        return self.url or os.environ.get("DOCKER_HOST") or _DEFAULT_URL


class DockerBackend(Backend):
    """Sandboxes as locked-down containers on a Docker Engine."""

    name = "docker"
    Settings = DockerSettings
    capability_conditions = (
        (containers.CAPABILITIES, "always"),
        (
            Capability.SECCOMP | Capability.APPARMOR | Capability.SELINUX,
            "when the engine offers it",
        ),
    )

    def __init__(self, settings: DockerSettings) -> None:
        super().__init__(settings)
        self._api: Any = None
        self._lock = threading.Lock()
        self._views: dict[str, HostView | None] = {}
        self._verdict: engine_versions.Verdict | None = None
        self._specs: dict[str, SandboxSpec] = {}
        self._security_options: list[str] | None = None
        self._swept = False  # the networks of ended sandboxes, swept at the first bridged create

    # -- the client ---------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.settings.engine_url()

    def _unavailable(self, why: object, sandbox_id: str | None = None) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"the Docker engine at {self.url} does not answer ({why}); start it (for example "
            "`dockerd &` or `systemctl start docker`) or set backends.docker.url / DOCKER_HOST",
            backend=self.name,
            sandbox_id=sandbox_id,
        )

    def api(self) -> Any:
        """The shared low-level client (thread-safe, pooled), made on first use."""
        if self._api is not None:
            return self._api
        with self._lock:
            if self._api is None:
                try:
                    import docker
                except ImportError:
                    raise BackendUnavailableError(
                        "the docker package is not installed; fix: pip install 'corral[docker]'",
                        backend=self.name,
                    ) from None
                tls: Any = False
                if self.settings.tls_verify or self.settings.cert_path:
                    tls = docker.tls.TLSConfig(
                        client_cert=_cert_pair(self.settings.cert_path),
                        ca_cert=_cert(self.settings.cert_path, "ca.pem"),
                        verify=self.settings.tls_verify,
                    )
                local_socket = self.url.removeprefix("unix://")
                if self.url.startswith("unix://") and not os.path.exists(local_socket):
                    raise self._unavailable(f"there is no socket at {local_socket}")
                options = {"base_url": self.url, "tls": tls, "timeout": self.settings.timeout}
                # Ask the engine for its API version, as version="auto" would, but on a
                # client that is closed even when the engine does not answer. (Pinning
                # docker-py's own default breaks older engines with 400 Bad Request.)
                probe = docker.APIClient(version="1.24", **options)
                try:
                    version = probe.version(api_version=False)["ApiVersion"]
                except Exception as e:  # docker's and requests' connection errors alike
                    raise self._unavailable(e) from e
                finally:
                    probe.close()
                self._api = docker.APIClient(
                    version=version, max_pool_size=containers.CONNECTION_POOL_SIZE, **options
                )
        return self._api

    @contextlib.contextmanager
    def _engine(self, sandbox_id: str | None = None) -> Iterator[None]:
        """Translate the client's exceptions into corral's, chained, at this boundary."""
        import docker.errors
        import requests.exceptions

        where = {"backend": self.name, "sandbox_id": sandbox_id}
        try:
            yield
        except SandboxError:
            raise
        except docker.errors.ImageNotFound as e:
            raise NotFoundError(
                f"image not found ({e.explanation}); pull policy is {self.settings.pull!r}", **where
            ) from e
        except docker.errors.NotFound as e:
            raise NotFoundError(f"not found: {e.explanation}", **where) from e
        except docker.errors.APIError as e:
            text = str(e.explanation or e)
            if e.status_code == 409:
                raise ConflictError(
                    f"the engine refused: {text}",
                    retryable=not containers.not_running(text),
                    **where,
                ) from e
            if "no space left" in text.lower():
                raise ResourceLimitError(containers.out_of_space(text), **where) from e
            if "read-only" in text:
                raise PathSecurityError(
                    f"{text}; write under the workspace or a volume", **where
                ) from e
            raise InternalError(
                f"the engine failed: {text}", retryable=(e.status_code or 500) >= 500, **where
            ) from e
        except requests.exceptions.Timeout as e:
            raise CorralTimeoutError(
                f"the Docker engine at {self.url} did not answer in time", **where
            ) from e
        except (requests.exceptions.ConnectionError, docker.errors.DockerException) as e:
            containers.release_frames(e)
            raise self._unavailable(e, sandbox_id) from e

    # -- what this engine can do --------------------------------------------------

    def check(self) -> Availability:
        try:
            with self._engine():
                self.api().ping()
        except BackendUnavailableError as e:
            fix = (
                "pip install 'corral[docker]'" if "not installed" in e.message else "start dockerd"
            )
            return Availability(False, e.message.split("; fix")[0], fix)
        except SandboxError as e:
            return Availability(False, str(e), "check the engine")
        verdict = self._version_verdict()
        if verdict.refused:
            return Availability(False, f"refused: {verdict.refused}", "upgrade the engine")
        return Availability(True, f"Docker Engine at {self.url}")

    def _version_verdict(self) -> engine_versions.Verdict:
        """The version gate's verdict on this engine, asked once (warnings logged once)."""
        if self._verdict is None:
            with self._engine():
                info = self.api().version()
            self._verdict = engine_versions.judge_report("docker", info)
        return self._verdict

    def capabilities(self) -> Capability:
        C = Capability
        caps = containers.CAPABILITIES
        options = self._engine_security()
        if "seccomp" in options:
            caps |= C.SECCOMP
        if "apparmor" in options:
            caps |= C.APPARMOR
        if "selinux" in options:
            caps |= C.SELINUX
        return caps

    def _engine_security(self) -> list[str]:
        if self._security_options is None:
            with self._engine():
                found = self.api().info().get("SecurityOptions") or []
            self._security_options = [o.split(",")[0].removeprefix("name=") for o in found]
        return self._security_options

    def capability_hint(self, missing: Capability) -> str:
        if missing & (Capability.SECCOMP | Capability.APPARMOR | Capability.SELINUX):
            return (
                f"this engine offers: {', '.join(self._engine_security()) or 'no security modules'}"
            )
        return ""

    # -- lifecycle ----------------------------------------------------------------

    def _ensure_image(self, image: str) -> None:
        api = self.api()
        policy = self.settings.pull
        import docker.errors

        if policy != "always":
            try:
                api.inspect_image(image)
                return
            except docker.errors.ImageNotFound:
                if policy == "never":
                    raise NotFoundError(
                        f"image {image!r} is not on the engine and the pull policy is 'never'",
                        backend=self.name,
                    ) from None
        try:
            api.pull(image)
        except docker.errors.APIError as e:
            if "no space left" in str(e.explanation).lower():
                raise ResourceLimitError(
                    containers.out_of_space(str(e.explanation)), backend=self.name
                ) from e
            raise NotFoundError(
                f"image {image!r} could not be pulled (pull policy {policy!r}): {e.explanation}",
                backend=self.name,
            ) from e

    def _create_kwargs(self, plan: containers.ContainerPlan) -> dict[str, Any]:
        from docker.types import DriverConfig, Healthcheck, Mount, Ulimit

        api = self.api()
        volume_labels = {"corral.managed": "true", "corral.sandbox": plan.labels["corral.sandbox"]}
        mounts = [
            Mount(
                t.target,
                None,
                type="volume",
                labels=volume_labels,
                driver_config=DriverConfig("local", t.driver_options()),
            )
            for t in plan.tmpfs_volumes
        ]
        mounts += [
            Mount(b.target, b.source, type="bind", read_only=b.read_only, propagation="rprivate")
            for b in plan.binds
        ]
        mounts += [
            Mount(v.target, v.name, type="volume", read_only=v.read_only) for v in plan.volumes
        ]
        host_config = api.create_host_config(
            read_only=plan.read_only,
            cap_drop=["ALL"],
            cap_add=plan.cap_add or None,
            security_opt=plan.security_opt,
            dns=plan.dns or None,
            mem_limit=plan.memory,
            memswap_limit=plan.memory,
            pids_limit=plan.pids,
            nano_cpus=plan.nano_cpus,
            ulimits=[Ulimit(name=n, soft=s, hard=h) for n, (s, h) in plan.ulimits.items()],
            mounts=mounts,
            init=True,
            auto_remove=True,  # PID 1 ends with the lifetime; the engine then removes it
            log_config={"type": "none"},
            oom_score_adj=sweep.EXEC_OOM_SCORE_ADJ,
            network_mode=plan.network_name,  # a bridged sandbox's own network
        )
        host_config["MaskedPaths"] = plan.masked_paths
        return {
            "image": plan.image,
            "command": plan.command,
            "user": plan.user,
            "working_dir": plan.workdir,
            "environment": plan.env,
            "labels": plan.labels,
            "name": plan.name,
            "host_config": host_config,
            # Without a network namespace set up by the engine's network stack: loopback
            # only, and half the start time of network_mode="none".
            "network_disabled": plan.network == "none",
            "healthcheck": Healthcheck(**plan.healthcheck) if plan.healthcheck else None,
            "detach": True,
        }

    def create(self, sandbox_id: str, spec: SandboxSpec, labels: dict[str, str]) -> None:
        plan = containers.plan(
            spec,
            labels,
            image=self.settings.default_image,
            workspace_size=self.settings.workspace_size,
        )
        with self._engine(sandbox_id):
            api = self.api()
            self._ensure_image(plan.image)
            self._specs[sandbox_id] = spec  # so destroy, after a failure too, finds all
            if plan.network_name:
                self._create_network(plan.network_name, labels)
            created = api.create_container(**self._create_kwargs(plan))
            containers.verify(plan, api.inspect_container(created["Id"]))
            api.start(created["Id"])

    def _create_network(self, name: str, labels: dict[str, str]) -> None:
        """A bridged sandbox's own network: no other container on it, and no route to
        any other Docker network (dockerd's isolation rules), unlike docker0."""
        import docker.errors

        def create() -> None:
            self.api().create_network(
                name,
                driver="bridge",
                # Inter-container traffic off: not even a container joined later talks to it.
                options={"com.docker.network.bridge.enable_icc": "false"},
                labels=containers.network_labels(labels),
                check_duplicate=True,
            )

        self._sweep_networks()
        try:
            create()
        except docker.errors.APIError as e:
            if "address pool" not in str(e.explanation or e):
                raise
            # Every subnet is taken (30 networks, with dockerd's default pools): those
            # of sandboxes that ended may be what holds them.
            self._sweep_networks(force=True)
            try:
                create()
            except docker.errors.APIError as again:
                if "address pool" not in str(again.explanation or again):
                    raise
                raise ResourceLimitError(
                    f"the Docker engine has no subnet left for a bridged sandbox's network "
                    f"({again.explanation}); remove unused networks, or give dockerd smaller "
                    'ones: "default-address-pools": [{"base": "10.123.0.0/16", "size": 28}] '
                    "in daemon.json",
                    retryable=True,  # once other bridged sandboxes are gone
                    backend=self.name,
                    sandbox_id=labels.get("corral.sandbox"),
                ) from again

    def _sweep_networks(self, *, force: bool = False) -> None:
        """Remove the networks of sandboxes whose lifetime ended (their containers removed
        themselves, leaving them): once per backend object, or again when ``force``d."""
        import docker.errors

        if self._swept and not force:
            return
        self._swept = True
        now = time.time()
        for network in self.api().networks(filters={"label": _MANAGED}):
            if containers.expired(network.get("Labels"), now):
                # Refused while a container is still on it: it is then not left over.
                with contextlib.suppress(docker.errors.APIError):
                    self.api().remove_network(network["Id"])

    def _remove_network(self, sandbox_id: str) -> None:
        import docker.errors

        def busy(e: Exception) -> bool:
            return isinstance(e, docker.errors.APIError) and "active endpoints" in str(e)

        # NotFound: a sandbox of no network of its own, or removed already
        with contextlib.suppress(docker.errors.NotFound):
            containers.remove_network(
                lambda: self.api().remove_network(containers.network_name(sandbox_id)), busy
            )

    def _view(self, sandbox_id: str) -> HostView | None:
        if sandbox_id not in self._views:
            with self._engine(sandbox_id):
                state = self.api().inspect_container(containers.container_name(sandbox_id))
            view = HostView.find(state["Id"], int(state["State"].get("Pid") or 0))
            if view is not None:
                view.spare_keepalive()
            self._views[sandbox_id] = view
        return self._views[sandbox_id]

    def destroy(self, sandbox_id: str) -> None:
        self._views.pop(sandbox_id, None)
        spec = self._specs.pop(sandbox_id, None)
        with self._engine(sandbox_id):
            self._remove_container(sandbox_id)
            # Its own network, after the container; asked of the engine when this process
            # does not know the sandbox (gc, a leftover), never for a sandbox of none.
            if spec is None or spec.network.mode == "bridge":
                self._remove_network(sandbox_id)

    def _remove_container(self, sandbox_id: str) -> None:
        import docker.errors

        try:
            # No stop grace: a sandbox being thrown away is killed at once.
            self.api().remove_container(containers.container_name(sandbox_id), force=True, v=True)
        except docker.errors.NotFound:
            pass  # gone already (its lifetime ended, or removed from outside)
        except docker.errors.APIError as e:
            if e.status_code != 409:
                raise
            # 409: the engine is already removing it (its lifetime just ended)
            containers.wait_until_gone(lambda: self._exists(sandbox_id), self.name, sandbox_id)

    def _exists(self, sandbox_id: str) -> bool:
        import docker.errors

        try:
            self.api().inspect_container(containers.container_name(sandbox_id))
        except docker.errors.NotFound:
            return False
        return True

    def list(self) -> list[SandboxInfo]:
        with self._engine():
            found = self.api().containers(all=True, filters={"label": _MANAGED})
            networks = self.api().networks(filters={"label": _MANAGED})
        listed = [
            containers.info_from_labels(
                self.name, c["Labels"]["corral.sandbox"], c["Labels"], c["State"], c["Image"]
            )
            for c in found
            if "corral.sandbox" in (c.get("Labels") or {})
        ]
        return listed + containers.leftover_networks(
            self.name, ((n["Name"], n.get("Labels") or {}) for n in networks), listed
        )

    def alive(self, sandbox_id: str) -> bool:
        # From the host's view of the container when the engine is local: microseconds,
        # where an inspect call takes milliseconds (tens on Podman).
        try:
            view = self._view(sandbox_id)
        except SandboxError:
            return False
        return view.running() if view is not None else super().alive(sandbox_id)

    def inspect(self, sandbox_id: str) -> tuple[SandboxInfo, SandboxSpec]:
        with self._engine(sandbox_id):
            state = self.api().inspect_container(containers.container_name(sandbox_id))
        labels = state["Config"]["Labels"] or {}
        if labels.get("corral.backend") != self.name:
            raise NotFoundError("not a corral sandbox", backend=self.name, sandbox_id=sandbox_id)
        info = containers.info_from_labels(
            self.name, sandbox_id, labels, state["State"]["Status"], state["Config"]["Image"]
        )
        spec = self._specs[sandbox_id] = containers.spec_from_labels(labels)
        return info, spec

    def pause(self, sandbox_id: str) -> None:
        with self._engine(sandbox_id):
            self.api().pause(containers.container_name(sandbox_id))

    def resume(self, sandbox_id: str) -> None:
        with self._engine(sandbox_id):
            self.api().unpause(containers.container_name(sandbox_id))

    def health(self, sandbox_id: str) -> Health:
        with self._engine(sandbox_id):
            state = self.api().inspect_container(containers.container_name(sandbox_id))["State"]
        return containers.health_from(state.get("Health"))

    # -- exec ---------------------------------------------------------------------

    def exec(self, sandbox_id: str, request: ExecRequest, sink: OutputSink) -> ExecStatus:
        name = containers.container_name(sandbox_id)

        def start(environment: dict[str, str]) -> containers.ExecSession:
            with self._engine(sandbox_id):
                api = self.api()
                exec_id = api.exec_create(
                    name,
                    list(request.argv),
                    stdout=True,
                    stderr=True,
                    stdin=request.stdin is not None,
                    environment=environment,
                    workdir=request.workdir,
                    user=request.user or "",
                )["Id"]
                stream = api.exec_start(exec_id, socket=True)
            raw: socket.socket = getattr(stream, "_sock", stream)

            def close() -> None:
                for closable in (stream, raw):  # the wrapper does not close its socket
                    with contextlib.suppress(OSError):
                        closable.close()

            return containers.ExecSession(
                socket=raw,
                pid=lambda: self._exec_pid(exec_id),
                exit_code=lambda: self._exit_code(exec_id, sandbox_id),
                close=close,
                buffered=_read_ahead(stream, raw),
            )

        return containers.run_exec(start, request, sink, self._view(sandbox_id))

    def run_once(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        labels: dict[str, str],
        request: ExecRequest,
        sink: OutputSink,
    ) -> ExecStatus:
        """The command as the container's own process: no exec, and the engine removes
        the container as it ends (auto-remove), which the wait asked before the start
        reports."""
        plan = containers.main_process_plan(
            spec,
            request,
            labels,
            url=self.url,
            image=self.settings.default_image,
            workspace_size=self.settings.workspace_size,
        )
        if plan is None:
            return super().run_once(sandbox_id, spec, labels, request, sink)
        gone = False
        attached: Any = None
        waiter: containers.EngineWait | None = None
        try:
            with self._engine(sandbox_id):
                api = self.api()
                self._ensure_image(plan.image)
                since = time.time()
                container_id = api.create_container(**self._create_kwargs(plan))["Id"]
                containers.verify(plan, api.inspect_container(container_id))
                attached = api.attach_socket(
                    container_id, params={"stdout": 1, "stderr": 1, "stream": 1}
                )
            raw: socket.socket = getattr(attached, "_sock", attached)
            try:
                waiter = containers.EngineWait(
                    self.url.removeprefix("unix://"),
                    f"/v{api.api_version}/containers/{container_id}/wait?condition=removed",
                    self.settings.timeout,
                )
            except OSError as e:
                raise self._unavailable(e, sandbox_id) from e

            def start() -> None:
                with self._engine(sandbox_id):
                    api.start(container_id)

            def kill() -> None:
                with contextlib.suppress(SandboxError), self._engine(sandbox_id):
                    api.kill(container_id)

            def outcome() -> tuple[int, int]:
                nonlocal gone
                assert waiter is not None
                code = waiter.exit_code()
                gone = True
                return code, self._oom_events(container_id, since)

            return containers.run_main(
                containers.MainProcess(
                    socket=raw,
                    start=start,
                    kill=kill,
                    outcome=outcome,
                    buffered=_read_ahead(attached, raw),
                ),
                request,
                sink,
            )
        finally:
            if waiter is not None:
                waiter.close()
            if attached is not None:
                with contextlib.suppress(OSError):
                    attached.close()
            if not gone:
                self.destroy(sandbox_id)

    def _oom_events(self, container_id: str, since: float) -> int:
        """The OOM kills the engine recorded in the (removed) container: its events
        say so, where its state and cgroup are gone with it."""
        with self._engine():
            # "until" must not lie ahead: the engine would stream events until then.
            events = self.api().events(
                since=f"{since - 1:.9f}",
                until=f"{time.time():.9f}",
                filters={"container": container_id, "event": "oom"},
                decode=True,
            )
            try:
                return sum(1 for _ in events)
            finally:
                events.close()

    def _exec_pid(self, exec_id: str) -> int:
        with self._engine():
            return int(self.api().exec_inspect(exec_id).get("Pid") or 0)

    def _exit_code(self, exec_id: str, sandbox_id: str) -> int:
        deadline = time.monotonic() + 10
        while True:
            with self._engine(sandbox_id):
                state = self.api().exec_inspect(exec_id)
            if not state.get("Running") and state.get("ExitCode") is not None:
                return int(state["ExitCode"])
            if time.monotonic() > deadline:
                raise InternalError(
                    "the engine did not report the exec's end",
                    backend=self.name,
                    sandbox_id=sandbox_id,
                )
            time.sleep(0.01)

    # -- files and usage ----------------------------------------------------------

    def put_archive(self, sandbox_id: str, path: str, archive: IO[bytes]) -> None:
        with self._engine(sandbox_id):
            self.api().put_archive(containers.container_name(sandbox_id), path, archive.read())

    def get_archive(self, sandbox_id: str, path: str) -> Iterator[bytes]:
        with self._engine(sandbox_id):
            stream, _ = self.api().get_archive(
                containers.container_name(sandbox_id), path, chunk_size=1024 * 1024
            )
            yield from stream

    def usage(self, sandbox_id: str) -> ResourceUsage:
        view = self._view(sandbox_id)
        if view is not None and view.init_pid not in view.pids():
            # The container ended since its view was taken (killed or removed from
            # outside): its cgroup is gone, and the engine says why.
            self._views.pop(sandbox_id, None)
            view = None
        if view is not None:
            if sandbox_id not in self._specs:
                self._specs[sandbox_id] = self.inspect(sandbox_id)[1]
            return view.usage(self._specs[sandbox_id].limits.memory)
        with self._engine(sandbox_id):
            stats = self.api().stats(
                containers.container_name(sandbox_id), stream=False, one_shot=True
            )
        return _usage_from_stats(stats)

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None


def _read_ahead(stream: Any, raw: socket.socket) -> bytes:
    """The exec stream's first bytes, if the HTTP parser read them with the upgrade's
    headers (a slow or remote engine sends both at once); the raw socket no longer has
    them. Read without waiting: only what is buffered already."""
    try:
        reader = stream._response.raw._fp.fp  # docker-py keeps the response on the socket
    except AttributeError:
        return b""
    raw.setblocking(False)
    try:
        return reader.read1(1 << 20) or b""
    except (OSError, ValueError):
        return b""
    finally:
        raw.setblocking(True)


def _usage_from_stats(stats: dict[str, Any]) -> ResourceUsage:
    memory = stats.get("memory_stats") or {}
    cpu = (stats.get("cpu_stats") or {}).get("cpu_usage", {}).get("total_usage")
    nets = stats.get("networks") or {}
    blk = (stats.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []
    return ResourceUsage(
        cpu_seconds=None if cpu is None else cpu / 1e9,
        memory_bytes=memory.get("usage"),
        memory_peak_bytes=memory.get("max_usage"),
        memory_limit_bytes=memory.get("limit"),
        pids=(stats.get("pids_stats") or {}).get("current"),
        net_rx_bytes=sum(n.get("rx_bytes", 0) for n in nets.values()) if nets else None,
        net_tx_bytes=sum(n.get("tx_bytes", 0) for n in nets.values()) if nets else None,
        block_read_bytes=sum(b["value"] for b in blk if b.get("op") == "Read") if blk else None,
        block_write_bytes=sum(b["value"] for b in blk if b.get("op") == "Write") if blk else None,
        timestamp=time.time(),
    )


def _cert(folder: str | None, name: str) -> str | None:
    return os.path.join(folder, name) if folder else None


def _cert_pair(folder: str | None) -> tuple[str, str] | None:
    if not folder:
        return None
    return os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")


@hookimpl
def corral_backends() -> list[BackendInfo]:
    return [
        BackendInfo(
            name="docker",
            backend=DockerBackend,
            description="locked-down containers on a Docker Engine",
        )
    ]
