"""The Podman backend: an engine adapter for ``ContainerBackend``, through Podman's REST
service and the ``podman`` package (``pip install 'corral[podman]'``), imported only when
the backend is first used. Containers are created from a libpod spec that corral writes
itself (podman-py's docker-style keywords cannot express tmpfs ownership, masked paths
or a log driver), and streams are upgraded by hand (``containers/http.py``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from itertools import chain
from typing import IO, Any
from urllib.parse import quote

import attrs

from ..core.backend import BackendInfo, Capability
from ..core.errors import (
    CapabilityError,
    ConfigError,
    ConflictError,
    InternalError,
    PathSecurityError,
    PolicyError,
    ResourceLimitError,
    SandboxError,
)
from ..core.errors import TimeoutError as CorralTimeoutError
from ..core.hookspecs import hookimpl
from ..core.results import ResourceUsage
from ..core.spec import ExecRequest, choice_field
from . import podman_seccomp, sweep
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
    http,
)
from .containers.errors import error_for, release_frames
from .containers.hostview import HostView, chmod_inside
from .containers.naming import network_labels
from .containers.plan import LOCAL_CAPABILITIES, TIMER_TARGET, reaper_command

__all__ = ["PodmanBackend", "PodmanSettings"]

_ROOTFUL_SOCKET = "/run/podman/podman.sock"
_LIBPOD = "/v4.0.0/libpod"  # the hijacked streams are sent by hand; 4.x and 5.x accept it
_MANAGED = json.dumps({"label": ["corral.managed=true", "corral.backend=podman"]})
# Inits Podman can run as a container's PID 1 when its own (catatonit) is missing: Debian's
# podman only recommends one, and where docker.io came first its tini satisfied that.
# Only static ones: the engine runs it inside the image, which may have no libc (a
# dynamic tini there exits at once, "exec /run/podman-init: no such file or directory").
_HOST_INITS = (
    "/usr/libexec/podman/catatonit",
    "/usr/bin/catatonit",
    "/usr/bin/tini-static",
    "/usr/bin/docker-init",
    "/usr/bin/dumb-init",
)
_NO_INIT = "container-init binary not found"


def _default_url() -> str:
    if os.environ.get("CONTAINER_HOST"):
        return os.environ["CONTAINER_HOST"]
    if os.geteuid() == 0 or os.path.exists(_ROOTFUL_SOCKET):
        return f"unix://{_ROOTFUL_SOCKET}"
    runtime = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.geteuid()}")
    return f"unix://{runtime}/podman/podman.sock"


@attrs.frozen
class PodmanSettings(ContainerSettings):
    """``[backends.podman]``."""

    url: str | None = None  # default: CONTAINER_HOST, the rootful socket, the user's
    # "auto" gives each sandbox its own user namespace (rootful Podman): root in the
    # sandbox is then nobody on the host.
    userns: str | None = choice_field(None, (None, "auto", "host"))

    def service_url(self) -> str:
        return self.url or _default_url()


# Podman's own words for what the shared table cannot tell by status.
_RULES = (
    Rule(
        CapabilityError,
        lambda status, text: "value too large for defined data type" in text,
        lambda text: (
            "Podman cannot copy files into a tmpfs of a sandbox with its own user namespace "
            f"(userns=auto): {text}; use the workspace or a volume"
        ),
    ),
    Rule(
        ConflictError,
        lambda status, text: "network is being used" in text,  # removed again, shortly
        lambda text: f"the service refused: {text}",
        lambda status, text: True,
    ),
    Rule(
        ResourceLimitError,
        lambda status, text: "subnet" in text and status >= 500,
        lambda text: (
            f"Podman has no subnet left for a bridged sandbox's network ({text}); remove "
            "unused networks, or widen default_subnet_pools in containers.conf"
        ),
        lambda status, text: True,  # once other bridged sandboxes are gone
    ),
)


class _Failed(Exception):
    """A libpod call answered with an error status (translated by ``translate``)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status}: {text}")
        self.status = status
        self.text = text


class PodmanEngine(Engine):
    """Podman's libpod REST API, through podman-py's HTTP session and by hand."""

    name = "podman"
    title = "the Podman service"

    def __init__(self, settings: PodmanSettings) -> None:
        super().__init__(settings)
        self._client: Any = None
        self._lock = threading.Lock()
        self._profile: str | None = None
        # How containers get their PID 1 (see _create): None until the first create.
        self.init: str | None = None

    @property
    def url(self) -> str:
        return self.settings.service_url()

    def start_fix(self) -> str:
        return (
            f"start it: `podman system service --time=0 {self.url} &` (rootless: "
            "`systemctl --user enable --now podman.socket`), or set backends.podman.url / "
            "CONTAINER_HOST"
        )

    def api(self) -> Any:
        """podman-py's low-level client (a pooled HTTP session), made on first use."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        import podman
                    except ImportError:
                        raise self.missing_client() from None
                    if self.socket_path is not None and not os.path.exists(self.socket_path):
                        raise self.unavailable(f"there is no socket at {self.socket_path}")
                    self._client = podman.PodmanClient(
                        base_url=self.url,
                        timeout=self.settings.timeout,
                        max_pool_size=CONNECTION_POOL_SIZE,
                    )
        return self._client.api

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One libpod call; a failed status raises ``_Failed``, its response closed (a
        response left in a frame that the error's traceback keeps holds its connection
        open until a garbage collection)."""
        response = getattr(self.api(), method)(path, **kwargs)
        if response.status_code >= 400:
            failed = _Failed(response.status_code, http.message_of(response.text))
            response.close()
            del response
            raise failed
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._call(method, path, **kwargs)
        try:
            return response.json()
        finally:
            response.close()

    def _text(self, method: str, path: str, **kwargs: Any) -> list[str]:
        """One libpod call's body as lines, its response closed and let go (an error
        raised from a frame that holds it would keep its connection open)."""
        response = self._call(method, path, **kwargs)
        try:
            return list(response.text.splitlines())
        finally:
            response.close()

    def _done(self, method: str, path: str, **kwargs: Any) -> None:
        self._call(method, path, **kwargs).close()

    def client_errors(self) -> tuple[type[BaseException], ...]:
        try:
            import podman.errors
            import requests.exceptions
        except ImportError:
            raise self.missing_client() from None
        return (
            _Failed,
            http.Refused,
            requests.exceptions.RequestException,
            podman.errors.PodmanError,
            OSError,
        )

    def error_of(self, error: BaseException, sandbox_id: str | None) -> SandboxError:
        import requests.exceptions

        if isinstance(error, (_Failed, http.Refused)):
            return error_for(
                error.status, error.text, backend=self.name, sandbox_id=sandbox_id, rules=_RULES
            )
        release_frames(error)
        # podman-py wraps a read timeout in its own APIError: the cause tells.
        if isinstance(error, requests.exceptions.Timeout) or isinstance(
            error.__cause__, requests.exceptions.Timeout
        ):
            self._drop_connections()
            return CorralTimeoutError(f"{self.title} at {self.url} did not answer in time")
        return self.unavailable(error, sandbox_id)

    def _drop_connections(self) -> None:
        """Start over with new connections after a timeout: podman-py puts the one that
        timed out back in its pool, where the late answer would reach the next request
        sent on it (a clean-up's remove, say) as if it were its own."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def ping(self) -> None:
        self._done("get", "/_ping")

    def version(self) -> dict[str, Any]:
        return dict(self._json("get", "/version"))

    def security(self) -> Capability:
        # /info takes about 200 ms on Podman: asked once per backend instance.
        security = self._json("get", "/info").get("host", {}).get("security", {})
        caps = Capability.SECCOMP
        if security.get("apparmorEnabled"):
            caps |= Capability.APPARMOR
        if security.get("selinuxEnabled"):
            caps |= Capability.SELINUX
        return caps

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- images -------------------------------------------------------------------

    def image_exists(self, image: str) -> bool:
        status = int(self.api().get(f"/images/{quote(image, safe='')}/exists").status_code)
        return status == 204

    def pull(self, image: str) -> None:
        lines = self._text("post", "/images/pull", params={"reference": image, "quiet": True})
        # A pull that fails once begun still answers 200, with the error in its stream.
        for line in lines:
            with contextlib.suppress(ValueError, AttributeError):
                if error := json.loads(line).get("error"):
                    raise error_for(500, str(error), backend=self.name, sandbox_id=None)

    # -- containers ---------------------------------------------------------------

    def create(self, plan: ContainerPlan) -> str:
        return self._create_with_init(self.libpod_spec(plan), plan.command)

    def _create_with_init(self, spec: dict[str, Any], command: list[str]) -> str:
        """Create with the init this service has: its own (catatonit), else a static one
        of this host's (the service may see fewer than corral does: tried in turn), else
        corral's own PID 1. Found at the first create, and kept."""
        # Lazily: a host's inits are read only when the service's own is missing.
        inits = [self.init] if self.init else chain(["engine"], filter(_static, _HOST_INITS))
        for init in chain(inits, ["own"]):
            if init == "engine":
                request = spec
            elif init == "own":
                request = {**spec, "init": False, "command": reaper_command(command)}
            else:
                request = {**spec, "init_path": init}
            try:
                made = self._json("post", "/containers/create", data=json.dumps(request))
            except _Failed as e:
                if _NO_INIT not in e.text or init == "own":
                    raise
                continue
            self.init = init
            return str(made["Id"])
        raise AssertionError("unreachable: corral's own PID 1 needs no init binary")

    def diagnose(self) -> list[str]:
        if self.init is None:
            self._probe_init()
        words = {
            None: "not known until the first sandbox (no image here to probe with)",
            "engine": "catatonit (the engine's)",
            "own": "corral's own PID 1 (the service has no init binary; install catatonit)",
        }
        return [f"init: {words.get(self.init, self.init)}"]

    def _probe_init(self) -> None:
        """Find the init by creating (never starting) a container that ends at once."""
        images = self._json("get", "/images/json") or []
        image = self.settings.default_image or next(
            (tag for i in images for tag in i.get("Names") or i.get("RepoTags") or []), None
        )
        if image is None:
            return
        name = f"corral-probe-{uuid.uuid4().hex[:12]}"
        labels = {"corral.managed": "true", "corral.backend": self.name, "corral.probe": "init"}
        spec = {"name": name, "image": image, "command": ["true"], "init": True, "labels": labels}
        self._create_with_init(spec, ["true"])
        self.remove(name)

    def libpod_spec(self, plan: ContainerPlan) -> dict[str, Any]:
        """The libpod create request for ``plan``."""
        tmpfs = plan.tmpfs_volumes
        volumes: list[dict[str, Any]] = []
        if self.settings.userns == "auto" and any(t.target == plan.workdir for t in tmpfs):
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
                + ([] if t.exec else ["noexec"])
                # Copied up, the folder keeps the image's mode, not the one asked for.
                + ([] if t.copy_up else ["notmpcopyup"]),
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
        if plan.lifetime_folder is not None:
            mounts.append(
                {
                    "destination": TIMER_TARGET,
                    "type": "bind",
                    "source": os.path.join(plan.lifetime_folder, "timer"),
                    "options": ["rbind", "ro", "rprivate"],
                }
            )
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
            # On the host's loopback only, each on a port the engine picks (host_port 0).
            "portmappings": [
                {"container_port": port, "host_ip": "127.0.0.1", "protocol": "tcp"}
                for port in plan.ports
            ],
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
        profile = self._seccomp_profile(plan)
        if profile is not None:
            spec["seccomp_profile_path"] = profile
        for option in plan.security_opt:
            key, _, value = option.partition("=")
            if key == "apparmor":
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

    def _seccomp_profile(self, plan: ContainerPlan) -> str | None:
        """The profile the service reads from its own disk, by path: the spec's (only a
        local service can read it), else corral's stricter default for a local service."""
        if plan.seccomp is not None:
            if plan.seccomp != "unconfined" and self.socket_path is None:
                raise ConfigError(
                    "sandbox.security.seccomp",
                    f"the Podman service at {self.url} reads profiles from its own disk, "
                    "which corral cannot reach; use a local service",
                )
            return plan.seccomp
        if self._profile is None:
            local = self.socket_path is not None
            self._profile = (podman_seccomp.sandbox_profile() if local else None) or ""
        return self._profile or None

    def inspect(self, name: str) -> dict[str, Any]:
        return dict(self._json("get", f"/containers/{name}/json"))

    def start(self, container_id: str) -> None:
        try:
            self._done("post", f"/containers/{container_id}/start")
        except _Failed as e:
            if self.init == "own" and "executable file not found" in e.text:
                raise CapabilityError(
                    f"the Podman service has no init binary, and corral's own PID 1 needs "
                    f"a shell (sh) in the image: {e.text}",
                    fix="install catatonit (or tini-static) on the engine's host",
                ) from e
            raise

    def kill(self, container_id: str) -> None:
        self._done("post", f"/containers/{container_id}/kill", params={"signal": "KILL"})

    def remove(self, name: str) -> None:
        try:
            # timeout=0: no stop grace (podman-py's own remove waits 10 s by default)
            self._done(
                "delete",
                f"/containers/{name}",
                params={"force": True, "volumes": True, "timeout": 0},  # libpod: not "v"
            )
        except _Failed as e:
            if e.status == 404 or "no such container" in e.text:
                return  # gone already
            # The service is removing it already (its lifetime just ended).
            raise ConflictError(f"the service is removing it: {e.text}", retryable=True) from e

    def pause(self, name: str) -> None:
        self._done("post", f"/containers/{name}/pause")

    def unpause(self, name: str) -> None:
        self._done("post", f"/containers/{name}/unpause")

    def exec_resize(self, exec_id: str, rows: int, cols: int) -> None:
        self._done("post", f"/exec/{exec_id}/resize", params={"h": rows, "w": cols})

    def containers(self) -> list[Listed]:
        found = self._json("get", "/containers/json", params={"all": True, "filters": _MANAGED})
        return [Listed(c.get("Labels") or {}, c["State"], c["Image"]) for c in found or []]

    def health(self, name: str, state: dict[str, Any]) -> dict[str, Any] | None:
        # Podman schedules healthchecks with systemd timers, which a service without
        # systemd lacks; running the check when asked works everywhere.
        if not state["Config"].get("Healthcheck"):
            return None
        return dict(self._json("get", f"/containers/{name}/healthcheck"))

    # -- networks -----------------------------------------------------------------

    def create_network(self, name: str, labels: dict[str, str]) -> None:
        """Isolated from every other isolated network (so from every other sandbox's):
        ``isolate`` in netavark and CNI alike. No DNS server of its own (aardvark-dns):
        there is no other container to find by name."""
        body = {
            "name": name,
            "driver": "bridge",
            "labels": network_labels(labels),
            "options": {"isolate": "true"},
            "dns_enabled": False,
        }
        made = self._json("post", "/networks/create", data=json.dumps(body))
        self._check_isolated(name, made)

    def ready(self, plan: ContainerPlan, container_id: str) -> None:
        if plan.network_name:
            # Asked again once the container started: Podman 4.3 drops ``isolate`` from
            # its copy of a network that a Docker-API client inspects or lists, and the
            # container started meanwhile gets no isolation rules.
            name = plan.network_name
            self._check_isolated(name, self._json("get", f"/networks/{name}/json"))
        asked = [t for t in plan.tmpfs_volumes if not t.copy_up]
        if asked and self.socket_path is not None:
            # runc gives a tmpfs the mode of the folder it covers (the image's /tmp is
            # 1777, whatever the spec asked): set the asked one from the host.
            pid = int(self.inspect(container_id)["State"].get("Pid") or 0)
            for tmpfs in asked:
                try:
                    chmod_inside(pid, tmpfs.target, tmpfs.mode)
                except OSError as e:  # a link in the image's path, or the container gone
                    raise PathSecurityError(
                        f"the tmpfs at {tmpfs.target!r} could not be given mode "
                        f"{tmpfs.mode:o} ({e.strerror}); corral follows no link of the "
                        "image's to reach it",
                        fix="mount it where the image has a plain folder, or drop its mode",
                    ) from e

    def _check_isolated(self, name: str, network: dict[str, Any]) -> None:
        if (network.get("options") or {}).get("isolate") != "true":
            raise PolicyError(
                f"Podman did not isolate network {name} (its options are "
                f"{network.get('options')!r}): a Docker-API client that inspects or lists "
                "networks on this service while a sandbox starts makes Podman 4.3 drop the "
                "option; Podman before 4.1 does not have it",
                fix="use Podman 4.1 or later, and no Docker-API client that lists networks "
                "on this service while sandboxes start",
            )

    def networks(self) -> list[tuple[str, dict[str, str]]]:
        found = self._json("get", "/networks/json", params={"filters": _MANAGED})
        return [(n["name"], n.get("labels") or {}) for n in found or []]

    def remove_network(self, name: str) -> None:
        self._done("delete", f"/networks/{quote(name, safe='')}")

    # -- exec ---------------------------------------------------------------------

    def exec_create(self, name: str, request: ExecRequest, env: dict[str, str]) -> str:
        body: dict[str, Any] = {
            "Cmd": list(request.argv),
            "Env": [f"{k}={v}" for k, v in env.items()],
            "AttachStdin": request.stdin is not None or request.input is not None,
            "AttachStdout": True,
            "AttachStderr": True,
            "Tty": request.tty,
        }
        if request.workdir:
            body["WorkingDir"] = request.workdir
        if request.user:
            body["User"] = request.user
        return str(self._json("post", f"/containers/{name}/exec", data=json.dumps(body))["Id"])

    def exec_start(self, exec_id: str, tty: bool = False) -> Stream:
        body = json.dumps({"Detach": False, "Tty": tty}).encode()
        return Stream(self._upgrade(f"{_LIBPOD}/exec/{exec_id}/start", body))

    def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        try:
            return dict(self._json("get", f"/exec/{exec_id}/json"))
        except _Failed as e:
            if e.status != 404:
                raise
            raise InternalError(
                "Podman removed the exec session before its exit code was read",
                fix="raise exit_command_delay in containers.conf to a few seconds at least",
            ) from None

    def _upgrade(self, path: str, body: bytes) -> Any:
        if self.socket_path is None:
            raise ConfigError(
                "backends.podman.url", "exec streaming needs a unix:// service socket"
            )
        return http.upgrade(self.socket_path, path, body, self.settings.timeout)

    # -- the command as the container's own process ---------------------------------

    def attach(self, container_id: str) -> Stream:
        return Stream(
            self._upgrade(
                f"{_LIBPOD}/containers/{container_id}/attach?stream=true&stdout=true&stderr=true",
                b"",
            )
        )

    def wait_path(self, container_id: str) -> str:
        return f"/v1.41/containers/{container_id}/wait?condition=next-exit"

    def outcome(self, container_id: str, sandbox_id: str) -> Callable[[http.EngineWait], Ended]:
        # Attaching set the container up (its cgroups exist, its init waits): the host's
        # view of it counts OOM kills, which Podman's own OOMKilled misses where conmon
        # writes its "oom" file elsewhere than Podman reads it.
        state = self.inspect(container_id)
        view = HostView.find(state["Id"], int(state["State"].get("Pid") or 0))

        def ended(wait: http.EngineWait) -> Ended:
            # Read at once: Podman's clean-up removes the cgroup soon after the exit.
            kills = view.oom_kills() if view is not None else 0
            code, engine_oom = self._exit(container_id, wait)
            return Ended(code, max(kills, int(engine_oom)), removed=False)

        return ended

    def _exit(self, container_id: str, wait: http.EngineWait) -> tuple[int, bool]:
        """(exit code, OOM-killed) of a container whose command's stream has ended, read
        by inspect before Podman's own clean-up removes it (the wait is slower)."""
        deadline = time.monotonic() + self.settings.timeout
        while time.monotonic() < deadline:
            try:
                state = self.inspect(container_id)["State"]
            except _Failed:
                break  # removed by Podman's clean-up already: the wait has the code
            if state.get("Status") in ("stopped", "exited"):
                return int(state.get("ExitCode") or 0), bool(state.get("OOMKilled"))
            time.sleep(0.005)
        return wait.exit_code(), False

    # -- files and usage ----------------------------------------------------------

    def put_archive(self, name: str, path: str, archive: IO[bytes]) -> None:
        self._done("put", f"/containers/{name}/archive", params={"path": path}, data=archive.read())

    def get_archive(self, name: str, path: str) -> Iterator[bytes]:
        response = self._call(
            "get", f"/containers/{name}/archive", params={"path": path}, stream=True
        )
        with contextlib.closing(response):
            # Podman resolves a final symlink where Docker hands back the link itself;
            # refuse it, as the other backends do, rather than read through it.
            target = _stat_header(response).get("linkTarget") or path
            if target.rstrip("/") != path.rstrip("/"):
                raise PathSecurityError(
                    f"{path!r} is a symlink (to {target!r}); corral does not follow it"
                )
            chunks = response.iter_content(1024 * 1024)
            # A tar with no member at all (its end, two zero blocks) is never what an
            # existing path gives: Podman's copier left out what it could not read.
            head = b""
            for chunk in chunks:
                head += chunk
                if len(head) > 1024:
                    break
            if not head.strip(b"\0"):
                raise self._left_out(path)
            yield head
            yield from chunks

    def _left_out(self, path: str) -> SandboxError:
        if self.settings.userns == "auto":
            return CapabilityError(
                f"{path!r} cannot be read through Podman's archive API in a sandbox with "
                "its own user namespace (userns=auto): its copier leaves out files whose "
                "host owner the sandbox does not map (a bind mount's, say)",
                fix=f"read it with exec (cat {path}), or leave backends.podman.userns unset",
            )
        return InternalError(f"Podman sent {path!r} as an archive with nothing in it")

    def stats(self, name: str, memory_limit: int) -> ResourceUsage:
        stats = self._json("get", "/containers/stats", params={"containers": name, "stream": False})
        if not stats.get("Stats"):
            self.inspect(name)  # no stats for a container that is gone: NotFoundError
        entry = (stats.get("Stats") or [{}])[0]
        return ResourceUsage(
            cpu_seconds=(entry.get("CPUNano") or 0) / 1e9,
            memory_bytes=entry.get("MemUsage"),
            memory_limit_bytes=memory_limit,
            pids=entry.get("PIDs"),
            net_rx_bytes=entry.get("NetInput"),
            net_tx_bytes=entry.get("NetOutput"),
            block_read_bytes=entry.get("BlockInput"),
            block_write_bytes=entry.get("BlockOutput"),
            timestamp=time.time(),
        )

    # -- snapshots and changes (issue 15) ------------------------------------------

    archive_while_paused = False

    def commit(
        self, name: str, labels: dict[str, str], repo: str | None = None, tag: str | None = None
    ) -> str:
        # libpod's commit takes labels as Dockerfile instructions only (its Docker-API
        # twin drops them): each quoted as JSON, which the instruction parser reads.
        params: dict[str, Any] = {
            "container": name,
            "pause": False,
            "changes": [f"LABEL {json.dumps(k)}={json.dumps(v)}" for k, v in labels.items()],
        }
        if repo:
            params.update(repo=repo, tag=tag or "latest")
        return str(self._json("post", "/commit", params=params)["Id"])

    def create_holder(self, image: str, name: str, labels: dict[str, str]) -> str:
        body = {
            "name": name,
            "image": image,
            "labels": labels,
            "command": ["corral-snapshot"],
            "netns": {"nsmode": "none"},
        }
        return str(self._json("post", "/containers/create", data=json.dumps(body))["Id"])

    def snapshot_images(self, label: str) -> list[Any]:
        from .containers.snapshots import ListedImage

        # One label only: Podman 4.3 matches no image for two (the caller checks the rest).
        wanted = json.dumps({"label": [label]})
        for attempt in range(5):
            try:
                found = self._json("get", "/images/json", params={"filters": wanted})
                break
            except _Failed as e:
                # Podman fails the whole listing when an image goes while it is listed
                # (another program's removal): asked again, the image is simply gone.
                if "image not known" not in e.text or attempt == 4:
                    raise
                time.sleep(0.05)
        return [
            ListedImage(
                i["Id"],
                tuple(i.get("Names") or i.get("RepoTags") or ()),
                i.get("Labels") or {},
                i.get("Size"),
            )
            for i in found or []
        ]

    def remove_image(self, ref: str) -> None:
        try:
            self._done("delete", f"/images/{quote(ref, safe='')}")
        except _Failed as e:
            if e.status != 404:
                raise

    def changes(self, name: str) -> list[tuple[str, int]]:
        found = self._json("get", f"/containers/{name}/changes")
        return [(c["Path"], int(c["Kind"])) for c in found or []]


def _static(path: str) -> bool:
    """Whether ``path`` is a static ELF executable (no program interpreter)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:5] != b"\x7fELF\x02":  # 64-bit ELF
                return False
            order = "<" if head[5] == 1 else ">"
            phoff, phsize, phnum = (
                struct.unpack_from(order + "Q", head, 0x20)[0],
                *struct.unpack_from(order + "HH", head, 0x36),
            )
            f.seek(phoff)
            table = f.read(phsize * phnum)
    except (OSError, struct.error):
        return False
    pt_interp = 3
    return all(
        struct.unpack_from(order + "I", table, i * phsize)[0] != pt_interp for i in range(phnum)
    )


def _stat_header(response: Any) -> dict[str, Any]:
    """The path's stat that the archive API sends in a header (base64 JSON)."""
    raw = response.headers.get("X-Docker-Container-Path-Stat")
    if not raw:
        return {}
    try:
        return dict(json.loads(base64.b64decode(raw)))
    except ValueError:
        return {}


class PodmanBackend(ContainerBackend):
    """Sandboxes as locked-down containers through Podman's REST service."""

    name = "podman"
    Settings = PodmanSettings
    Engine = PodmanEngine
    capability_conditions = (
        (CAPABILITIES | Capability.SECCOMP, "always"),
        (LOCAL_CAPABILITIES, "with a service on this host (a unix:// socket)"),
        (Capability.APPARMOR | Capability.SELINUX, "when the host has it"),
    )


@hookimpl
def corral_backends() -> list[BackendInfo]:
    return [
        BackendInfo(
            name="podman",
            backend=PodmanBackend,
            description="locked-down containers through Podman's REST service",
        )
    ]
