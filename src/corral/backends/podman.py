"""The Podman backend: containers through Podman's REST service and the ``podman`` package.

Installed with ``pip install corral[podman]``; the client is imported only when the
backend is first used. Containers are created from a libpod spec that corral writes
itself (podman-py's docker-style keywords cannot express tmpfs ownership, masked paths
or a log driver), and execs stream over a hijacked connection, as on Docker.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import quote

import attrs

from ..core.backend import Availability, Backend, BackendInfo, Capability, ExecStatus
from ..core.errors import (
    BackendUnavailableError,
    CapabilityError,
    ConfigError,
    ConflictError,
    InternalError,
    NotFoundError,
    PathSecurityError,
    PolicyError,
    ResourceLimitError,
    SandboxError,
)
from ..core.errors import TimeoutError as CorralTimeoutError
from ..core.hookspecs import hookimpl
from ..core.output import OutputSink
from ..core.results import Health, ResourceUsage, SandboxInfo
from ..core.spec import ExecRequest, SandboxSpec, choice_field, duration_field, size_field
from . import containers, engine_versions, podman_seccomp, sweep
from .containers import HostView

__all__ = ["PodmanBackend", "PodmanSettings"]

_ROOTFUL_SOCKET = "/run/podman/podman.sock"
_LIBPOD = "/v4.0.0/libpod"  # the hijacked exec start is sent by hand; 4.x and 5.x accept it


def _default_url() -> str:
    if os.environ.get("CONTAINER_HOST"):
        return os.environ["CONTAINER_HOST"]
    if os.geteuid() == 0 or os.path.exists(_ROOTFUL_SOCKET):
        return f"unix://{_ROOTFUL_SOCKET}"
    runtime = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.geteuid()}")
    return f"unix://{runtime}/podman/podman.sock"


@attrs.frozen
class PodmanSettings:
    """``[backends.podman]``."""

    url: str | None = None  # default: CONTAINER_HOST, the rootful socket, the user's
    timeout: float = duration_field("60s")
    pull: Literal["never", "missing", "always"] = choice_field("missing", containers.PULL_POLICIES)
    default_image: str | None = None
    workspace_size: int = size_field("1GiB", minimum=1024**2)
    # "auto" gives each sandbox its own user namespace (rootful Podman): root in the
    # sandbox is then nobody on the host.
    userns: str | None = choice_field(None, (None, "auto", "host"))

    def service_url(self) -> str:
        return self.url or _default_url()


class PodmanBackend(Backend):
    """Sandboxes as locked-down containers through Podman's REST service."""

    name = "podman"
    Settings = PodmanSettings
    capability_conditions = (
        (containers.CAPABILITIES | Capability.SECCOMP, "always"),
        (Capability.APPARMOR | Capability.SELINUX, "when the host has it"),
    )

    def __init__(self, settings: PodmanSettings) -> None:
        super().__init__(settings)
        self._client: Any = None
        self._lock = threading.Lock()
        self._views: dict[str, HostView | None] = {}
        self._pidfiles: dict[str, tuple[str, str]] = {}  # sandbox: container id, pid file
        self._verdict: engine_versions.Verdict | None = None
        self._profile: str | None = None
        self._specs: dict[str, SandboxSpec] = {}
        self._security: dict[str, Any] | None = None
        self._swept = False  # the networks of ended sandboxes, swept at the first bridged create

    # -- the client ---------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.settings.service_url()

    def _unavailable(self, why: object, sandbox_id: str | None = None) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"the Podman service at {self.url} does not answer ({why}); start it with "
            f"`podman system service --time=0 {self.url}` (rootless: `systemctl --user "
            "enable --now podman.socket`) or set backends.podman.url / CONTAINER_HOST",
            backend=self.name,
            sandbox_id=sandbox_id,
        )

    def api(self) -> Any:
        """podman-py's low-level client (a pooled HTTP session), made on first use."""
        if self._client is not None:
            return self._client.api
        with self._lock:
            if self._client is None:
                try:
                    import podman
                except ImportError:
                    raise BackendUnavailableError(
                        "the podman package is not installed; fix: pip install 'corral[podman]'",
                        backend=self.name,
                    ) from None
                path = self.url.removeprefix("unix://")
                if self.url.startswith("unix://") and not os.path.exists(path):
                    raise self._unavailable(f"there is no socket at {path}")
                self._client = podman.PodmanClient(
                    base_url=self.url,
                    timeout=self.settings.timeout,
                    max_pool_size=containers.CONNECTION_POOL_SIZE,
                )
        return self._client.api

    def _call(self, method: str, path: str, sandbox_id: str | None = None, **kwargs: Any) -> Any:
        """One libpod call; a failed status becomes corral's error for it."""
        with self._engine(sandbox_id):
            response = getattr(self.api(), method)(path, **kwargs)
        if response.status_code >= 400:
            error = self._status_error(response, sandbox_id)
            # Closed, and not left in this frame: the error's traceback keeps the frame,
            # and with it the connection, open until a garbage collection otherwise.
            response.close()
            del response
            raise error
        return response

    def _json(self, method: str, path: str, sandbox_id: str | None = None, **kwargs: Any) -> Any:
        """One libpod call's decoded body, its response closed. (A response left in a
        frame that a later error's traceback keeps holds its connection pool open.)"""
        response = self._call(method, path, sandbox_id, **kwargs)
        try:
            return response.json()
        finally:
            response.close()

    def _status_error(self, response: Any, sandbox_id: str | None) -> SandboxError:
        return self._error_for(response.status_code, response.text, sandbox_id)

    def _error_for(self, status: int, body: str, sandbox_id: str | None) -> SandboxError:
        """corral's error for a failed status, from the service's answer (JSON or text)."""
        try:
            text = json.loads(body).get("message") or body
        except (ValueError, AttributeError):
            text = body
        where = {"backend": self.name, "sandbox_id": sandbox_id}
        # A container removed while the call ran can also come back as a 500 saying so.
        if status == 404 or "no such container" in text:
            return NotFoundError(f"not found: {text}", **where)
        if status == 409:
            return ConflictError(
                f"the service refused: {text}", retryable=not containers.not_running(text), **where
            )
        if "no space left" in text.lower():
            return ResourceLimitError(containers.out_of_space(text), **where)
        if "value too large for defined data type" in text:
            return CapabilityError(
                f"Podman cannot copy files into a tmpfs of a sandbox with its own user "
                f"namespace (userns=auto): {text}; use the workspace or a volume",
                **where,
            )
        if "read-only" in text or "read only" in text:
            return PathSecurityError(f"{text}; write under the workspace or a volume", **where)
        return InternalError(f"Podman failed: {text}", retryable=status >= 500, **where)

    @contextlib.contextmanager
    def _engine(self, sandbox_id: str | None = None) -> Iterator[None]:
        """Translate the client's exceptions into corral's, chained, at this boundary."""
        import podman.errors
        import requests.exceptions

        try:
            yield
        except SandboxError:
            raise
        except (
            requests.exceptions.RequestException,
            podman.errors.PodmanError,
            OSError,
        ) as e:
            containers.release_frames(e)
            # podman-py wraps a read timeout in its own APIError: the cause tells.
            if isinstance(e, requests.exceptions.Timeout) or isinstance(
                e.__cause__, requests.exceptions.Timeout
            ):
                self._drop_connections()
                raise CorralTimeoutError(
                    f"the Podman service at {self.url} did not answer in time",
                    backend=self.name,
                    sandbox_id=sandbox_id,
                ) from e
            raise self._unavailable(e, sandbox_id) from e

    def _drop_connections(self) -> None:
        """Start over with new connections after a timeout: podman-py puts the one that
        timed out back in its pool, where the late answer would reach the next request
        sent on it (a clean-up's remove, say) as if it were its own."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- what this service can do ------------------------------------------------------

    def check(self) -> Availability:
        try:
            self._call("get", "/_ping")
        except BackendUnavailableError as e:
            fix = (
                "pip install 'corral[podman]'"
                if "not installed" in e.message
                else (f"podman system service --time=0 {self.url} &")
            )
            return Availability(False, e.message.split("; ")[0], fix)
        except SandboxError as e:
            return Availability(False, str(e), "check the service")
        verdict = self._version_verdict()
        if verdict.refused:
            return Availability(False, f"refused: {verdict.refused}", "upgrade Podman")
        return Availability(True, f"Podman service at {self.url}")

    def _version_verdict(self) -> engine_versions.Verdict:
        """The version gate's verdict on this engine, asked once (warnings logged once)."""
        if self._verdict is None:
            info = self._json("get", "/version")
            self._verdict = engine_versions.judge_report("podman", info)
        return self._verdict

    def capabilities(self) -> Capability:
        C = Capability
        caps = containers.CAPABILITIES | C.SECCOMP
        security = self._host_security()
        if security.get("apparmorEnabled"):
            caps |= C.APPARMOR
        if security.get("selinuxEnabled"):
            caps |= C.SELINUX
        return caps

    def _host_security(self) -> dict[str, Any]:
        # /info takes about 200 ms on Podman: ask once per backend instance.
        if self._security is None:
            self._security = self._call("get", "/info").json().get("host", {}).get("security", {})
        return self._security

    # -- lifecycle -----------------------------------------------------------------

    def _ensure_image(self, image: str) -> None:
        policy = self.settings.pull
        if policy != "always":
            exists = self._call_status("get", f"/images/{quote(image, safe='')}/exists")
            if exists == 204:
                return
            if policy == "never":
                raise NotFoundError(
                    f"image {image!r} is not in Podman's storage and the pull policy is 'never'",
                    backend=self.name,
                )
        try:
            pulled = self._call("post", "/images/pull", params={"reference": image, "quiet": True})
        except ResourceLimitError:
            raise  # the engine's storage is full: not a missing image
        except SandboxError as e:
            raise NotFoundError(
                f"image {image!r} could not be pulled (pull policy {policy!r}): {e.message}",
                backend=self.name,
            ) from e
        # A pull that fails once begun still answers 200, with the error in its stream.
        for line in pulled.text.splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                if error := json.loads(line).get("error"):
                    if "no space left" in str(error).lower():
                        raise ResourceLimitError(
                            containers.out_of_space(str(error)), backend=self.name
                        )
                    raise NotFoundError(
                        f"image {image!r} could not be pulled (pull policy {policy!r}): {error}",
                        backend=self.name,
                    )

    def _call_status(self, method: str, path: str) -> int:
        with self._engine():
            return getattr(self.api(), method)(path).status_code

    def _libpod_spec(self, plan: containers.ContainerPlan) -> dict[str, Any]:
        tmpfs = plan.tmpfs_volumes
        volumes: list[dict[str, Any]] = []
        if self.settings.userns == "auto":
            # Podman cannot copy files into a tmpfs that lives in the sandbox's own user
            # namespace (EOVERFLOW), but can into a volume: the workspace becomes an
            # anonymous volume owned by the sandbox user, removed with the container.
            # It is not size-capped; the tmpfs folders keep their caps.
            tmpfs = [t for t in tmpfs if t.target != plan.workdir]
            volumes.append({"Name": "", "Dest": plan.workdir, "Options": ["U"]})
        mounts = [
            {
                "destination": t.target,
                "type": "tmpfs",
                "source": "tmpfs",
                # U: owned by the sandbox user, as the Docker backend's volumes are
                "options": [f"size={t.size}", f"mode={t.mode:o}", "U", "nosuid", "nodev"]
                + ([] if t.exec else ["noexec"]),
            }
            for t in tmpfs
        ]
        mounts += [
            {
                "destination": b.target,
                "type": "bind",
                "source": b.source,
                "options": ["rbind", "ro" if b.read_only else "rw", "rprivate"],
            }
            for b in plan.binds
        ]
        volumes += [
            {"Name": v.name, "Dest": v.target, "Options": ["ro" if v.read_only else "rw"]}
            for v in plan.volumes
        ]
        limits: dict[str, Any] = {
            "memory": {"limit": plan.memory, "swap": plan.memory},
            "pids": {"limit": plan.pids},
        }
        if plan.nano_cpus is not None:
            period = 100_000
            limits["cpu"] = {"quota": plan.nano_cpus * period // 10**9, "period": period}
        spec: dict[str, Any] = {
            "name": plan.name,
            "image": plan.image,
            "command": plan.command,
            "user": plan.user,
            "work_dir": plan.workdir,
            "env": plan.env,
            "labels": plan.labels,
            "read_only_filesystem": plan.read_only,
            "cap_drop": ["ALL"],
            "cap_add": plan.cap_add,
            "no_new_privileges": "no-new-privileges" in plan.security_opt,
            "netns": {"nsmode": "none" if plan.network == "none" else "bridge"},
            # A bridged sandbox joins its own network only (not Podman's default one).
            **({"Networks": {plan.network_name: {}}} if plan.network_name else {}),
            "dns_server": plan.dns,
            "resource_limits": limits,
            "r_limits": [{"type": n, "soft": s, "hard": h} for n, (s, h) in plan.ulimits.items()],
            "mounts": mounts,
            "volumes": volumes,
            "init": True,
            "remove": True,  # PID 1 ends with the lifetime; Podman then removes it
            "log_configuration": {"driver": "none"},
            "oom_score_adj": sweep.EXEC_OOM_SCORE_ADJ,
            "mask": plan.masked_paths,
        }
        for option in plan.security_opt:
            key, _, value = option.partition("=")
            if key == "seccomp" and not value.startswith("{"):  # unconfined
                spec["seccomp_profile_path"] = value
            elif key == "apparmor":
                spec["apparmor_profile"] = value
            elif key == "label":
                spec.setdefault("selinux_opts", []).append(value)
        if plan.healthcheck:
            h = plan.healthcheck
            spec["healthconfig"] = {
                "Test": h["test"],
                "Interval": h["interval"],
                "Timeout": h["timeout"],
                "Retries": h["retries"],
                "StartPeriod": h["start_period"],
            }
        if self.settings.userns == "auto":
            # What `podman run --userns=auto` sends: the mode and the request for ids.
            spec["userns"] = {"nsmode": "auto"}
            spec["idmappings"] = {"AutoUserNs": True}
        elif self.settings.userns:
            spec["userns"] = {"nsmode": self.settings.userns}
        return spec

    def _default_profile(self) -> str | None:
        """corral's stricter default seccomp profile, for a service on this host."""
        if self._profile is None:
            local = self.url.startswith("unix://")
            self._profile = (podman_seccomp.sandbox_profile() if local else None) or ""
        return self._profile or None

    def create(self, sandbox_id: str, spec: SandboxSpec, labels: dict[str, str]) -> None:
        plan = containers.plan(
            spec,
            labels,
            image=self.settings.default_image,
            workspace_size=self.settings.workspace_size,
        )
        container_id = self._make(sandbox_id, spec, labels, plan)
        self._call("post", f"/containers/{container_id}/start", sandbox_id).close()
        if plan.network_name:
            self._check_isolated(plan.network_name, sandbox_id)

    def _make(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        labels: dict[str, str],
        plan: containers.ContainerPlan,
    ) -> str:
        """Create the container of ``plan`` (and its network), not started, and verify
        it; its id."""
        libpod = self._libpod_spec(plan)
        if any(o.startswith("seccomp={") for o in plan.security_opt):
            # The service reads a profile from its own disk, by path: ours when local.
            if not self.url.startswith("unix://"):
                raise ConfigError(
                    "sandbox.security.seccomp",
                    f"the Podman service at {self.url} reads profiles from its own disk, "
                    "which corral cannot reach; use a local service",
                )
            libpod["seccomp_profile_path"] = str(Path(spec.security.seccomp or "").resolve())
        elif not any(o.startswith("seccomp=") for o in plan.security_opt):
            profile = self._default_profile()
            if profile is not None:
                libpod["seccomp_profile_path"] = profile
        self._ensure_image(plan.image)
        self._specs[sandbox_id] = spec  # so destroy, after a failure too, finds all
        if plan.network_name:
            self._create_network(plan.network_name, labels)
        spec_json = json.dumps(libpod)
        container_id = self._json("post", "/containers/create", sandbox_id, data=spec_json)["Id"]
        made = self._json("get", f"/containers/{container_id}/json", sandbox_id)
        containers.verify(plan, made)
        if made.get("PidFile"):  # where the runtime writes the init's pid, once started
            self._pidfiles[sandbox_id] = (str(container_id), made["PidFile"])
        return str(container_id)

    def _create_network(self, name: str, labels: dict[str, str]) -> None:
        """A bridged sandbox's own network, isolated from every other isolated network
        (so from every other sandbox's): ``isolate`` in netavark and CNI alike. No DNS
        server of its own (aardvark-dns): there is no other container to find by name."""
        self._sweep_networks()
        body = {
            "name": name,
            "driver": "bridge",
            "labels": containers.network_labels(labels),
            "options": {"isolate": "true"},
            "dns_enabled": False,
        }
        sandbox_id = labels.get("corral.sandbox")
        try:
            made = self._json("post", "/networks/create", sandbox_id, data=json.dumps(body))
        except InternalError as e:
            if "subnet" not in e.message:
                raise
            raise ResourceLimitError(
                f"Podman has no subnet left for a bridged sandbox's network ({e.message}); "
                "remove unused networks, or widen default_subnet_pools in containers.conf",
                retryable=True,  # once other bridged sandboxes are gone
                backend=self.name,
                sandbox_id=sandbox_id,
            ) from e
        self._check_isolated(name, sandbox_id, made)

    def _check_isolated(
        self, name: str, sandbox_id: str | None, network: dict[str, Any] | None = None
    ) -> None:
        """Refuse a network Podman does not (or no longer) isolate. Asked again once the
        container started: Podman 4.3 drops ``isolate`` from its copy of a network that
        a Docker-API client inspects or lists, and the container started meanwhile gets
        no isolation rules (its copy is read again only when a network is added)."""
        if network is None:
            network = self._json("get", f"/networks/{name}/json", sandbox_id)
        if (network.get("options") or {}).get("isolate") != "true":
            raise PolicyError(
                f"Podman did not isolate network {name} (its options are "
                f"{network.get('options')!r}): a Docker-API client that inspects or lists "
                "networks on this service while a sandbox starts makes Podman 4.3 drop the "
                "option; Podman before 4.1 does not have it",
                backend=self.name,
                sandbox_id=sandbox_id,
            )

    def _sweep_networks(self) -> None:
        """Remove the networks of sandboxes whose lifetime ended (their containers removed
        themselves, leaving them), once per backend object."""
        if self._swept:
            return
        self._swept = True
        now = time.time()
        filters = json.dumps({"label": ["corral.managed=true", f"corral.backend={self.name}"]})
        for network in self._json("get", "/networks/json", params={"filters": filters}) or []:
            if containers.expired(network.get("labels"), now):
                # Refused while a container is still on it: it is then not left over.
                with contextlib.suppress(SandboxError):
                    self._call("delete", f"/networks/{quote(network['name'], safe='')}").close()

    def _remove_network(self, sandbox_id: str) -> None:
        name = containers.network_name(sandbox_id)

        def busy(e: Exception) -> bool:
            return isinstance(e, InternalError) and "network is being used" in e.message

        with contextlib.suppress(NotFoundError):  # no network of its own, or removed already
            containers.remove_network(
                lambda: self._call("delete", f"/networks/{name}", sandbox_id).close(), busy
            )

    def _inspect(self, sandbox_id: str) -> dict[str, Any]:
        name = containers.container_name(sandbox_id)
        return self._call("get", f"/containers/{name}/json", sandbox_id).json()

    def _view(self, sandbox_id: str) -> HostView | None:
        if sandbox_id not in self._views:
            view = self._view_by_pidfile(sandbox_id)
            if view is None:
                state = self._inspect(sandbox_id)
                view = HostView.find(state["Id"], int(state["State"].get("Pid") or 0))
            if view is not None:
                view.spare_keepalive()
            self._views[sandbox_id] = view
        return self._views[sandbox_id]

    def _view_by_pidfile(self, sandbox_id: str) -> HostView | None:
        """The view of a sandbox this program made, from the runtime's pid file on this
        host: one inspect call fewer per sandbox, which under load takes most of a
        second. None when the file is not here (a remote service) or names a process
        outside the container's cgroups."""
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

    def destroy(self, sandbox_id: str) -> None:
        self._views.pop(sandbox_id, None)
        self._pidfiles.pop(sandbox_id, None)
        spec = self._specs.pop(sandbox_id, None)
        self._remove_container(sandbox_id)
        # Its own network, after the container; asked of the service when this process
        # does not know the sandbox (gc, a leftover), never for a sandbox of none.
        if spec is None or spec.network.mode == "bridge":
            self._remove_network(sandbox_id)

    def _remove_container(self, sandbox_id: str) -> None:
        name = containers.container_name(sandbox_id)
        try:
            # timeout=0: no stop grace (podman-py's own remove waits 10 s by default)
            self._call(
                "delete",
                f"/containers/{name}",
                sandbox_id,
                params={"force": True, "volumes": True, "timeout": 0},  # libpod: not "v"
            )
        except NotFoundError:
            pass  # gone already (its lifetime ended, or removed from outside)
        except (ConflictError, InternalError):
            # the service is removing it already (its lifetime just ended)
            containers.wait_until_gone(lambda: self._exists(sandbox_id), self.name, sandbox_id)

    def _exists(self, sandbox_id: str) -> bool:
        try:
            self._inspect(sandbox_id)
        except NotFoundError:
            return False
        return True

    def list(self) -> list[SandboxInfo]:
        filters = json.dumps({"label": ["corral.managed=true", f"corral.backend={self.name}"]})
        found = self._json("get", "/containers/json", params={"all": True, "filters": filters})
        networks = self._json("get", "/networks/json", params={"filters": filters})
        listed = [
            containers.info_from_labels(
                self.name, c["Labels"]["corral.sandbox"], c["Labels"], c["State"], c["Image"]
            )
            for c in found or []
            if "corral.sandbox" in (c.get("Labels") or {})
        ]
        return listed + containers.leftover_networks(
            self.name, ((n["name"], n.get("labels") or {}) for n in networks or []), listed
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
        state = self._inspect(sandbox_id)
        labels = state["Config"]["Labels"] or {}
        if labels.get("corral.backend") != self.name:
            raise NotFoundError("not a corral sandbox", backend=self.name, sandbox_id=sandbox_id)
        info = containers.info_from_labels(
            self.name, sandbox_id, labels, state["State"]["Status"], state.get("ImageName")
        )
        spec = self._specs[sandbox_id] = containers.spec_from_labels(labels)
        return info, spec

    def pause(self, sandbox_id: str) -> None:
        self._call("post", f"/containers/{containers.container_name(sandbox_id)}/pause", sandbox_id)

    def resume(self, sandbox_id: str) -> None:
        self._call(
            "post", f"/containers/{containers.container_name(sandbox_id)}/unpause", sandbox_id
        )

    def health(self, sandbox_id: str) -> Health:
        # Podman schedules healthchecks with systemd timers, which a service without
        # systemd lacks; running the check when asked works everywhere.
        name = containers.container_name(sandbox_id)
        if not self._inspect(sandbox_id)["Config"].get("Healthcheck"):
            return Health(status="none")
        return containers.health_from(
            self._call("get", f"/containers/{name}/healthcheck", sandbox_id).json()
        )

    # -- exec ----------------------------------------------------------------------

    def exec(self, sandbox_id: str, request: ExecRequest, sink: OutputSink) -> ExecStatus:
        name = containers.container_name(sandbox_id)

        def start(environment: dict[str, str]) -> containers.ExecSession:
            body = {
                "Cmd": list(request.argv),
                "Env": [f"{k}={v}" for k, v in environment.items()],
                "AttachStdin": request.stdin is not None,
                "AttachStdout": True,
                "AttachStderr": True,
            }
            if request.workdir:
                body["WorkingDir"] = request.workdir
            if request.user:
                body["User"] = request.user
            exec_id = self._call(
                "post", f"/containers/{name}/exec", sandbox_id, data=json.dumps(body)
            ).json()["Id"]
            raw = self._upgrade(
                f"{_LIBPOD}/exec/{exec_id}/start", b'{"Detach":false,"Tty":false}', sandbox_id
            )
            return containers.ExecSession(
                socket=raw,
                pid=lambda: int(self._exec_state(exec_id, sandbox_id).get("Pid") or 0),
                exit_code=lambda: self._exit_code(exec_id, sandbox_id),
                close=raw.close,
            )

        return containers.run_exec(start, request, sink, self._view(sandbox_id))

    def _upgrade(self, path: str, body: bytes, sandbox_id: str) -> socket.socket:
        """POST ``path`` (an exec start, an attach) on a connection of its own, upgraded
        to the raw stream."""
        if not self.url.startswith("unix://"):
            raise ConfigError(
                "backends.podman.url", "exec streaming needs a unix:// service socket"
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.settings.timeout)
            sock.connect(self.url.removeprefix("unix://"))
            head = (
                f"POST {path} HTTP/1.1\r\nHost: podman\r\n"
                "Content-Type: application/json\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body)
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = sock.recv(1)
                if not chunk:
                    raise InternalError("Podman closed the stream before it began")
                reply += chunk
            status = reply.split(b"\r\n", 1)[0]
            if b" 101 " not in status and b" 200 " not in status:
                raise self._stream_refused(sock, reply, sandbox_id)
            sock.settimeout(None)
            return sock
        except OSError as e:
            sock.close()
            raise self._unavailable(e, sandbox_id) from e
        except BaseException:
            sock.close()
            raise

    def run_once(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        labels: dict[str, str],
        request: ExecRequest,
        sink: OutputSink,
    ) -> ExecStatus:
        """The command as the container's own process: no exec (and no conmon for one).
        Its end is read by inspect, before Podman's own clean-up removes the container;
        a wait asked before the start reports it should that clean-up be first."""
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
        name = plan.name
        waiter: containers.EngineWait | None = None
        try:
            self._make(sandbox_id, spec, labels, plan)
            try:
                waiter = containers.EngineWait(
                    self.url.removeprefix("unix://"),
                    f"/v1.41/containers/{name}/wait?condition=next-exit",
                    self.settings.timeout,
                )
            except OSError as e:
                raise self._unavailable(e, sandbox_id) from e
            raw = self._upgrade(
                f"{_LIBPOD}/containers/{name}/attach?stream=true&stdout=true&stderr=true",
                b"",
                sandbox_id,
            )
            # Attaching set the container up (its cgroups exist, its init waits): the
            # host's view of it counts OOM kills, which Podman's own OOMKilled misses
            # where conmon writes its "oom" file elsewhere than Podman reads it.
            state = self._inspect(sandbox_id)
            view = HostView.find(state["Id"], int(state["State"].get("Pid") or 0))

            def start() -> None:
                self._call("post", f"/containers/{name}/start", sandbox_id).close()

            def kill() -> None:
                with contextlib.suppress(SandboxError):
                    self._call(
                        "post", f"/containers/{name}/kill", sandbox_id, params={"signal": "KILL"}
                    ).close()

            def outcome() -> tuple[int, int]:
                assert waiter is not None
                # Read at once: Podman's clean-up removes the cgroup soon after the exit.
                kills = view.oom_kills() if view is not None else 0
                code, engine_oom = self._ended(sandbox_id, waiter)
                return code, max(kills, int(engine_oom))

            return containers.run_main(
                containers.MainProcess(socket=raw, start=start, kill=kill, outcome=outcome),
                request,
                sink,
            )
        finally:
            if waiter is not None:
                waiter.close()
            self.destroy(sandbox_id)

    def _ended(self, sandbox_id: str, waiter: containers.EngineWait) -> tuple[int, bool]:
        """(exit code, OOM-killed) of a container whose command's stream has ended."""
        deadline = time.monotonic() + self.settings.timeout
        while time.monotonic() < deadline:
            try:
                state = self._inspect(sandbox_id)["State"]
            except NotFoundError:
                break  # removed by Podman's clean-up already: the wait has the code
            if state.get("Status") in ("stopped", "exited"):
                return int(state.get("ExitCode") or 0), bool(state.get("OOMKilled"))
            time.sleep(0.005)
        return waiter.exit_code(), False

    def _stream_refused(self, sock: socket.socket, head: bytes, sandbox_id: str) -> SandboxError:
        """The error for a stream (an exec start, an attach) the service refused, from the
        body of its answer (a full disk is a 500 whose message says so)."""
        status_line, _, headers = head.decode("latin-1").partition("\r\n")
        parts = status_line.split()
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 500
        length = 0
        for line in headers.split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length" and value.strip().isdigit():
                length = min(int(value), 64 * 1024)
        body = b""
        with contextlib.suppress(OSError):
            while len(body) < length and (chunk := sock.recv(length - len(body))):
                body += chunk
        text = body.decode(errors="replace").strip() or status_line
        return self._error_for(code, text, sandbox_id)

    def _exec_state(self, exec_id: str, sandbox_id: str) -> dict[str, Any]:
        try:
            return self._call("get", f"/exec/{exec_id}/json", sandbox_id).json()
        except NotFoundError:
            raise InternalError(
                "Podman removed the exec session before its exit code was read; raise "
                "exit_command_delay in containers.conf to a few seconds at least",
                backend=self.name,
                sandbox_id=sandbox_id,
            ) from None

    def _exit_code(self, exec_id: str, sandbox_id: str) -> int:
        deadline = time.monotonic() + 10
        while True:
            state = self._exec_state(exec_id, sandbox_id)
            if not state.get("Running") and state.get("ExitCode") is not None:
                return int(state["ExitCode"])
            if time.monotonic() > deadline:
                raise InternalError(
                    "Podman did not report the exec's end", backend=self.name, sandbox_id=sandbox_id
                )
            time.sleep(0.01)

    # -- files and usage -------------------------------------------------------------

    def put_archive(self, sandbox_id: str, path: str, archive: IO[bytes]) -> None:
        name = containers.container_name(sandbox_id)
        self._call(
            "put",
            f"/containers/{name}/archive",
            sandbox_id,
            params={"path": path},
            data=archive.read(),
        )

    def get_archive(self, sandbox_id: str, path: str) -> Iterator[bytes]:
        name = containers.container_name(sandbox_id)
        response = self._call(
            "get", f"/containers/{name}/archive", sandbox_id, params={"path": path}, stream=True
        )
        with self._engine(sandbox_id), contextlib.closing(response):
            # Podman resolves a final symlink where Docker hands back the link itself;
            # refuse it, as the other backends do, rather than read through it.
            target = _stat_header(response).get("linkTarget") or path
            if target.rstrip("/") != path.rstrip("/"):
                raise PathSecurityError(
                    f"{path!r} is a symlink (to {target!r}); corral does not follow it",
                    backend=self.name,
                    sandbox_id=sandbox_id,
                )
            yield from response.iter_content(1024 * 1024)

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
        name = containers.container_name(sandbox_id)
        stats = self._call(
            "get", "/containers/stats", sandbox_id, params={"containers": name, "stream": False}
        ).json()
        if not stats.get("Stats"):
            self._inspect(sandbox_id)  # no stats for a container that is gone: NotFoundError
        entry = (stats.get("Stats") or [{}])[0]
        return ResourceUsage(
            cpu_seconds=(entry.get("CPUNano") or 0) / 1e9,
            memory_bytes=entry.get("MemUsage"),
            memory_limit_bytes=limit,
            pids=entry.get("PIDs"),
            net_rx_bytes=entry.get("NetInput"),
            net_tx_bytes=entry.get("NetOutput"),
            block_read_bytes=entry.get("BlockInput"),
            block_write_bytes=entry.get("BlockOutput"),
            timestamp=time.time(),
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _stat_header(response: Any) -> dict[str, Any]:
    """The path's stat that the archive API sends in a header (base64 JSON)."""
    raw = response.headers.get("X-Docker-Container-Path-Stat")
    if not raw:
        return {}
    try:
        return json.loads(base64.b64decode(raw))
    except ValueError:
        return {}


@hookimpl
def corral_backends() -> list[BackendInfo]:
    return [
        BackendInfo(
            name="podman",
            backend=PodmanBackend,
            description="locked-down containers through Podman's REST service",
        )
    ]
