"""The Docker backend: an engine adapter for ``ContainerBackend``, through the ``docker``
package (``pip install 'corral[docker]'``), imported only when the backend is first used.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import attrs

from ..core.backend import BackendInfo, Capability
from ..core.errors import ConflictError, NotFoundError, ResourceLimitError, SandboxError
from ..core.errors import TimeoutError as CorralTimeoutError
from ..core.hookspecs import hookimpl
from ..core.results import ResourceUsage
from ..core.spec import ExecRequest
from . import sweep
from .containers import (
    CAPABILITIES,
    CONNECTION_POOL_SIZE,
    ContainerBackend,
    ContainerPlan,
    ContainerSettings,
    Ended,
    Engine,
    Listed,
    Rule,
    Stream,
)
from .containers.errors import error_for, release_frames
from .containers.http import EngineWait
from .containers.plan import LOCAL_CAPABILITIES, TIMER_TARGET

__all__ = ["DockerBackend", "DockerSettings"]

_DEFAULT_URL = "unix:///var/run/docker.sock"
_MANAGED = ["corral.managed=true", "corral.backend=docker"]
_SECURITY_MODULES = {
    "seccomp": Capability.SECCOMP,
    "apparmor": Capability.APPARMOR,
    "selinux": Capability.SELINUX,
}


@attrs.frozen
class DockerSettings(ContainerSettings):
    """``[backends.docker]``."""

    url: str | None = None  # default: DOCKER_HOST, else the standard socket
    tls_verify: bool = False
    cert_path: str | None = None

    def engine_url(self) -> str:
        return self.url or os.environ.get("DOCKER_HOST") or _DEFAULT_URL


# Docker's own words for what the shared table cannot tell by status.
_RULES = (
    Rule(
        ResourceLimitError,
        lambda status, text: "address pool" in text,
        lambda text: (
            f"the Docker engine has no subnet left for a bridged sandbox's network ({text}); "
            "remove unused networks, or give dockerd smaller ones: "
            '"default-address-pools": [{"base": "10.123.0.0/16", "size": 28}] in daemon.json'
        ),
        lambda status, text: True,  # once other bridged sandboxes are gone
    ),
)


class DockerEngine(Engine):
    """The Docker Engine API through docker-py's low-level client."""

    name = "docker"
    title = "the Docker engine"

    def __init__(self, settings: DockerSettings) -> None:
        super().__init__(settings)
        self._api: Any = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.settings.engine_url()

    def start_fix(self) -> str:
        return (
            "start it (for example `dockerd &` or `systemctl start docker`), or set "
            "backends.docker.url / DOCKER_HOST"
        )

    def api(self) -> Any:
        """The shared low-level client (thread-safe, pooled), made on first use."""
        if self._api is None:
            with self._lock:
                if self._api is None:
                    self._api = self._connect()
        return self._api

    def _connect(self) -> Any:
        try:
            import docker
        except ImportError:
            raise self.missing_client() from None
        tls: Any = False
        if self.settings.tls_verify or self.settings.cert_path:
            folder = self.settings.cert_path
            tls = docker.tls.TLSConfig(
                client_cert=(
                    (os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem"))
                    if folder
                    else None
                ),
                ca_cert=os.path.join(folder, "ca.pem") if folder else None,
                verify=self.settings.tls_verify,
            )
        if self.socket_path is not None and not os.path.exists(self.socket_path):
            raise self.unavailable(f"there is no socket at {self.socket_path}")
        options = {"base_url": self.url, "tls": tls, "timeout": self.settings.timeout}
        # Ask the engine for its API version, as version="auto" would, but on a client
        # that is closed even when the engine does not answer. (Pinning docker-py's own
        # default breaks older engines with 400 Bad Request.)
        probe = docker.APIClient(version="1.24", **options)
        try:
            version = probe.version(api_version=False)["ApiVersion"]
        except Exception as e:  # docker's and requests' connection errors alike
            release_frames(e)
            raise self.unavailable(e) from e
        finally:
            probe.close()
        return docker.APIClient(version=version, max_pool_size=CONNECTION_POOL_SIZE, **options)

    def client_errors(self) -> tuple[type[BaseException], ...]:
        try:
            import docker.errors
            import requests.exceptions
        except ImportError:
            raise self.missing_client() from None
        return (docker.errors.DockerException, requests.exceptions.RequestException)

    def error_of(self, error: BaseException, sandbox_id: str | None) -> SandboxError:
        import docker.errors
        import requests.exceptions

        if isinstance(error, docker.errors.ImageNotFound):
            return NotFoundError(
                f"image not found ({error.explanation}); pull policy is {self.settings.pull!r}"
            )
        if isinstance(error, docker.errors.APIError):
            text = str(error.explanation or error)
            status = error.status_code or 500
            return error_for(status, text, backend=self.name, sandbox_id=sandbox_id, rules=_RULES)
        if isinstance(error, requests.exceptions.Timeout):
            return CorralTimeoutError(f"{self.title} at {self.url} did not answer in time")
        release_frames(error)
        return self.unavailable(error, sandbox_id)

    def ping(self) -> None:
        self.api().ping()

    def version(self) -> dict[str, Any]:
        return dict(self.api().version())

    def _security_modules(self) -> list[str]:
        found = self.api().info().get("SecurityOptions") or []
        return [o.split(",")[0].removeprefix("name=") for o in found]

    def security(self) -> Capability:
        caps = Capability(0)
        for module in self._security_modules():
            caps |= _SECURITY_MODULES.get(module, Capability(0))
        return caps

    def capability_hint(self, missing: Capability) -> str:
        if missing & (Capability.SECCOMP | Capability.APPARMOR | Capability.SELINUX):
            offered = ", ".join(self._security_modules()) or "no security modules"
            return f"this engine offers: {offered}"
        return ""

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None

    # -- images -------------------------------------------------------------------

    def image_exists(self, image: str) -> bool:
        import docker.errors

        try:
            self.api().inspect_image(image)
        except docker.errors.ImageNotFound:
            return False
        return True

    def pull(self, image: str) -> None:
        self.api().pull(image)

    # -- containers ---------------------------------------------------------------

    def create(self, plan: ContainerPlan) -> str:
        return str(self.api().create_container(**self.create_kwargs(plan))["Id"])

    def create_kwargs(self, plan: ContainerPlan) -> dict[str, Any]:
        """docker-py's ``create_container`` arguments for ``plan``."""
        from docker.types import DriverConfig, Healthcheck, Mount, Ulimit

        volume_labels = {"corral.managed": "true", "corral.sandbox": plan.labels["corral.sandbox"]}
        mounts = [
            Mount(
                t.target,
                None,
                type="volume",
                labels=volume_labels,
                no_copy=not t.copy_up,
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
        if plan.lifetime_folder is not None:
            mounts.append(
                Mount(
                    TIMER_TARGET,
                    os.path.join(plan.lifetime_folder, "timer"),
                    type="bind",
                    read_only=True,
                    propagation="rprivate",
                )
            )
        host_config = self.api().create_host_config(
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
            # On the host's loopback only, each on a port the engine picks.
            port_bindings={port: ("127.0.0.1",) for port in plan.ports} or None,
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
            "ports": list(plan.ports) or None,
            "detach": True,
        }

    def inspect(self, name: str) -> dict[str, Any]:
        return dict(self.api().inspect_container(name))

    def start(self, container_id: str) -> None:
        self.api().start(container_id)

    def kill(self, container_id: str) -> None:
        self.api().kill(container_id)

    def remove(self, name: str) -> None:
        import docker.errors

        with contextlib.suppress(docker.errors.NotFound):  # gone already
            self.api().remove_container(name, force=True, v=True)

    def pause(self, name: str) -> None:
        self.api().pause(name)

    def unpause(self, name: str) -> None:
        self.api().unpause(name)

    def exec_resize(self, exec_id: str, rows: int, cols: int) -> None:
        self.api().exec_resize(exec_id, height=rows, width=cols)

    def containers(self) -> list[Listed]:
        found = self.api().containers(all=True, filters={"label": _MANAGED})
        return [Listed(c.get("Labels") or {}, c["State"], c["Image"]) for c in found]

    def health(self, name: str, state: dict[str, Any]) -> dict[str, Any] | None:
        return state["State"].get("Health")

    # -- networks -----------------------------------------------------------------

    def create_network(self, name: str, labels: dict[str, str]) -> None:
        """No other container on it, and no route to any other Docker network (dockerd's
        isolation rules), unlike docker0."""
        from .containers.naming import network_labels

        self.api().create_network(
            name,
            driver="bridge",
            # Inter-container traffic off: not even a container joined later talks to it.
            options={"com.docker.network.bridge.enable_icc": "false"},
            labels=network_labels(labels),
            check_duplicate=True,
        )

    def networks(self) -> list[tuple[str, dict[str, str]]]:
        return [
            (n["Name"], n.get("Labels") or {})
            for n in self.api().networks(filters={"label": _MANAGED})
        ]

    def remove_network(self, name: str) -> None:
        import docker.errors

        try:
            self.api().remove_network(name)
        except docker.errors.APIError as e:
            if "active endpoints" in str(e):
                raise _busy(name) from e
            raise

    # -- exec ---------------------------------------------------------------------

    def exec_create(self, name: str, request: ExecRequest, env: dict[str, str]) -> str:
        return str(
            self.api().exec_create(
                name,
                list(request.argv),
                stdout=True,
                stderr=True,
                stdin=request.stdin is not None or request.input is not None,
                tty=request.tty,
                environment=env,
                workdir=request.workdir,
                user=request.user or "",
            )["Id"]
        )

    def exec_start(self, exec_id: str, tty: bool = False) -> Stream:
        return _stream(self.api().exec_start(exec_id, tty=tty, socket=True))

    def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        return dict(self.api().exec_inspect(exec_id))

    # -- the command as the container's own process ---------------------------------

    def attach(self, container_id: str) -> Stream:
        return _stream(
            self.api().attach_socket(container_id, params={"stdout": 1, "stderr": 1, "stream": 1})
        )

    def wait_path(self, container_id: str) -> str:
        # The container removes itself as it ends (auto-remove): its removal is the end.
        return f"/v{self.api().api_version}/containers/{container_id}/wait?condition=removed"

    def outcome(self, container_id: str, sandbox_id: str) -> Callable[[EngineWait], Ended]:
        since = time.time()

        def ended(wait: EngineWait) -> Ended:
            code = wait.exit_code()
            return Ended(code, self._oom_events(container_id, since), removed=True)

        return ended

    def _oom_events(self, container_id: str, since: float) -> int:
        """The OOM kills the engine recorded in the (removed) container: its events say
        so, where its state and cgroup are gone with it."""
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

    # -- files and usage ----------------------------------------------------------

    def put_archive(self, name: str, path: str, archive: IO[bytes]) -> None:
        self.api().put_archive(name, path, archive.read())

    def get_archive(self, name: str, path: str) -> Iterator[bytes]:
        stream, _ = self.api().get_archive(name, path, chunk_size=1024 * 1024)
        yield from stream

    def stats(self, name: str, memory_limit: int) -> ResourceUsage:
        stats = self.api().stats(name, stream=False, one_shot=True)
        memory = stats.get("memory_stats") or {}
        cpu = (stats.get("cpu_stats") or {}).get("cpu_usage", {}).get("total_usage")
        nets = stats.get("networks") or {}
        blk = (stats.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []
        return ResourceUsage(
            cpu_seconds=None if cpu is None else cpu / 1e9,
            memory_bytes=memory.get("usage"),
            memory_peak_bytes=memory.get("max_usage"),
            memory_limit_bytes=memory.get("limit") or memory_limit,
            pids=(stats.get("pids_stats") or {}).get("current"),
            net_rx_bytes=sum(n.get("rx_bytes", 0) for n in nets.values()) if nets else None,
            net_tx_bytes=sum(n.get("tx_bytes", 0) for n in nets.values()) if nets else None,
            block_read_bytes=(
                sum(b["value"] for b in blk if b.get("op") == "Read") if blk else None
            ),
            block_write_bytes=(
                sum(b["value"] for b in blk if b.get("op") == "Write") if blk else None
            ),
            timestamp=time.time(),
        )

    # -- snapshots and changes (issue 15) ------------------------------------------

    copies_up_tmpfs = False

    def commit(
        self, name: str, labels: dict[str, str], repo: str | None = None, tag: str | None = None
    ) -> str:
        conf = {"Labels": labels}
        return str(self.api().commit(name, repo, tag, conf=conf, pause=False)["Id"])

    def create_holder(self, image: str, name: str, labels: dict[str, str]) -> str:
        made = self.api().create_container(
            image, ["corral-snapshot"], name=name, labels=labels, network_disabled=True
        )
        return str(made["Id"])

    def snapshot_images(self, label: str) -> list[Any]:
        from .containers.snapshots import ListedImage

        found = self.api().images(filters={"label": [*_MANAGED, label]})
        return [
            ListedImage(i["Id"], tuple(i.get("RepoTags") or ()), i.get("Labels") or {}, i["Size"])
            for i in found or []
        ]

    def remove_image(self, ref: str) -> None:
        import docker.errors

        # By tag: only the tag goes while a newer snapshot is made on top of the image
        # (the engine removes it with the last image above it).
        with contextlib.suppress(docker.errors.NotFound):
            self.api().remove_image(ref)

    def copy_archive(self, source: str, path: str, target: str, target_path: str) -> None:
        # Streamed from one call into the other (a chunked upload): measured 0.9 s where
        # a temporary file took 1.1 s for 100 MiB.
        stream, _ = self.api().get_archive(source, path, chunk_size=1024 * 1024)
        try:
            self.api().put_archive(target, target_path, stream)
        finally:
            with contextlib.suppress(AttributeError):
                stream.close()

    def changes(self, name: str) -> list[tuple[str, int]]:
        return [(c["Path"], int(c["Kind"])) for c in self.api().diff(name) or []]


def _busy(network: str) -> SandboxError:
    return ConflictError(f"network {network} still has a container on it", retryable=True)


def _stream(wrapper: Any) -> Stream:
    """docker-py's hijacked socket as a Stream: the raw socket, and the first bytes the
    HTTP parser read along with the upgrade's headers (a slow or remote engine sends both
    at once), which the raw socket no longer has."""
    raw: socket.socket = getattr(wrapper, "_sock", wrapper)
    buffered = b""
    with contextlib.suppress(AttributeError):
        reader = wrapper._response.raw._fp.fp  # docker-py keeps the response on the socket
        raw.setblocking(False)  # only what is buffered already
        try:
            buffered = reader.read1(1 << 20) or b""
        except (OSError, ValueError):
            pass
        finally:
            raw.setblocking(True)
    # The wrapper does not close its socket: both are closed with the stream.
    return Stream(raw, buffered, extra=wrapper if wrapper is not raw else None)


class DockerBackend(ContainerBackend):
    """Sandboxes as locked-down containers on a Docker Engine."""

    name = "docker"
    Settings = DockerSettings
    Engine = DockerEngine
    capability_conditions = (
        (CAPABILITIES, "always"),
        (LOCAL_CAPABILITIES, "with an engine on this host (a unix:// socket)"),
        (
            Capability.SECCOMP | Capability.APPARMOR | Capability.SELINUX,
            "when the engine offers it",
        ),
    )


@hookimpl
def corral_backends() -> list[BackendInfo]:
    return [
        BackendInfo(
            name="docker",
            backend=DockerBackend,
            description="locked-down containers on a Docker Engine",
        )
    ]
