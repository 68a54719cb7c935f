"""The engine protocol: what an adapter (``docker.py``, ``podman.py``) implements for
``ContainerBackend``, which owns everything else.

An adapter speaks its engine's API and nothing more: it turns a ``ContainerPlan`` into
the engine's create request, and its client's exceptions into corral's (``translate``).
Names are container names (``naming.container_name``) or the ids the engine returns;
``NotFoundError`` means gone. Every method is called inside ``translate``, so a method
may let its client's exceptions through.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from typing import IO, Any, ClassVar

import attrs

from ...core.backend import Capability
from ...core.errors import BackendUnavailableError, SandboxError
from ...core.results import ResourceUsage
from ...core.spec import ExecRequest
from .plan import ContainerPlan


@attrs.frozen
class Stream:
    """An attached, multiplexed stream (an exec's or a container's own process's)."""

    socket: Any  # socket.socket
    buffered: bytes = b""  # stream bytes the client read along with the upgrade's headers
    extra: Any = None  # what else must be closed with it (the client's wrapper)

    def close(self) -> None:
        for closable in (self.extra, self.socket):
            if closable is not None:
                with contextlib.suppress(OSError):
                    closable.close()


@attrs.frozen
class Listed:
    """A container as the engine lists it."""

    labels: dict[str, str]
    state: str
    image: str | None


@attrs.frozen
class Ended:
    """How a container's own process ended (``corral.run``)."""

    exit_code: int
    oom_events: int
    removed: bool  # the engine removed the container already


class Engine(abc.ABC):
    """One container engine's API, as ``ContainerBackend`` uses it."""

    #: The backend's name and the distribution extra that installs the client.
    name: ClassVar[str]
    #: What the engine is called in messages ("the Docker engine").
    title: ClassVar[str]

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    # -- the client ---------------------------------------------------------------

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """Where the engine listens (``unix:///...`` for a local one)."""

    @property
    def socket_path(self) -> str | None:
        """The engine's unix socket on this host; None for a remote engine."""
        return self.url.removeprefix("unix://") if self.url.startswith("unix://") else None

    @abc.abstractmethod
    def start_fix(self) -> str:
        """How to start the engine, for an unavailable error."""

    def unavailable(self, why: object, sandbox_id: str | None = None) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"{self.title} at {self.url} does not answer ({why})",
            backend=self.name,
            sandbox_id=sandbox_id,
            fix=self.start_fix(),
        )

    def missing_client(self) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"the {self.name} package (the client library) is not installed",
            backend=self.name,
            fix=f"pip install 'corral[{self.name}]'",
        )

    @contextlib.contextmanager
    def translate(self, sandbox_id: str | None) -> Iterator[None]:
        """The error boundary: the client's exceptions as corral's, chained."""
        client_errors = self.client_errors()
        try:
            yield
        except SandboxError:
            raise
        except client_errors as e:
            raise self.error_of(e, sandbox_id) from e

    @abc.abstractmethod
    def client_errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions the client raises (``missing_client()`` when not installed)."""

    @abc.abstractmethod
    def error_of(self, error: BaseException, sandbox_id: str | None) -> SandboxError:
        """The error table: corral's error for one of the client's (see ``errors.py``)."""

    @abc.abstractmethod
    def ping(self) -> None: ...

    @abc.abstractmethod
    def version(self) -> dict[str, Any]:
        """The engine's version report (``GET /version``), for the version gate."""

    def security(self) -> Capability:
        """The security modules the engine offers, as capabilities."""
        return Capability(0)

    def capability_hint(self, missing: Capability) -> str:
        return ""

    def describe(self) -> str:
        """What ``corral doctor`` says of the engine once it answers."""
        return f"{self.title} at {self.url}"

    def diagnose(self) -> list[str]:
        """Facts for ``corral doctor`` (see ``Backend.diagnose``)."""
        return []

    def close(self) -> None:  # noqa: B027 - an adapter without a client holds nothing
        """Close the client and its connections."""

    # -- images -------------------------------------------------------------------

    @abc.abstractmethod
    def image_exists(self, image: str) -> bool: ...

    @abc.abstractmethod
    def pull(self, image: str) -> None:
        """Pull ``image``; NotFoundError, or ResourceLimitError for a full disk."""

    # -- containers ---------------------------------------------------------------

    @abc.abstractmethod
    def create(self, plan: ContainerPlan) -> str:
        """Create (not start) the container of ``plan``; its id."""

    @abc.abstractmethod
    def inspect(self, name: str) -> dict[str, Any]:
        """The engine's inspect report, in the Docker API's shape."""

    @abc.abstractmethod
    def start(self, container_id: str) -> None: ...

    @abc.abstractmethod
    def kill(self, container_id: str) -> None: ...

    @abc.abstractmethod
    def remove(self, name: str) -> None:
        """Remove at once, without a stop grace, with its anonymous volumes. Gone already
        is fine; ConflictError when the engine is removing it already."""

    @abc.abstractmethod
    def pause(self, name: str) -> None: ...

    @abc.abstractmethod
    def unpause(self, name: str) -> None: ...

    @abc.abstractmethod
    def exec_resize(self, exec_id: str, rows: int, cols: int) -> None:
        """Set the terminal size of a running tty exec."""

    @abc.abstractmethod
    def containers(self) -> list[Listed]:
        """Every container of this backend's carrying corral's labels."""

    @abc.abstractmethod
    def health(self, name: str, state: dict[str, Any]) -> dict[str, Any] | None:
        """The healthcheck report (Status, FailingStreak, Log) of an inspected container."""

    # -- networks -----------------------------------------------------------------

    @abc.abstractmethod
    def create_network(self, name: str, labels: dict[str, str]) -> None:
        """A bridged sandbox's own network, isolated from every other; ResourceLimitError
        (retryable) when the engine has no subnet left."""

    @abc.abstractmethod
    def networks(self) -> list[tuple[str, dict[str, str]]]:
        """``(name, labels)`` of every network of this backend's."""

    @abc.abstractmethod
    def remove_network(self, name: str) -> None:
        """NotFoundError when gone; ConflictError while a container is still on it."""

    def ready(self, plan: ContainerPlan, container_id: str) -> None:  # noqa: B027
        """What the engine needs once the container of ``plan`` is set up: started, or
        for ``corral.run`` attached (its mounts made) just before its start."""

    # -- exec ---------------------------------------------------------------------

    @abc.abstractmethod
    def exec_create(self, name: str, request: ExecRequest, env: dict[str, str]) -> str:
        """Create an exec of ``request`` with environment ``env``; its id. Stdin is
        attached for ``request.stdin`` or ``request.input``, and a terminal given for
        ``request.tty``."""

    @abc.abstractmethod
    def exec_start(self, exec_id: str, tty: bool = False) -> Stream:
        """The exec's attached stream: multiplexed, or raw for a ``tty`` exec."""

    @abc.abstractmethod
    def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        """The exec's state: ``Pid``, ``Running``, ``ExitCode``."""

    # -- the command as the container's own process (corral.run) ------------------

    @abc.abstractmethod
    def attach(self, container_id: str) -> Stream:
        """The created container's output stream, attached before it starts."""

    @abc.abstractmethod
    def wait_path(self, container_id: str) -> str:
        """The API path of a wait for the container's end, asked before it starts."""

    @abc.abstractmethod
    def outcome(self, container_id: str, sandbox_id: str) -> Any:
        """Called after ``attach``, before the start: returns ``ended(wait)`` to call
        once the stream has ended, giving ``Ended`` (``wait()`` blocks for the code)."""

    # -- files and usage ----------------------------------------------------------

    @abc.abstractmethod
    def put_archive(self, name: str, path: str, archive: IO[bytes]) -> None: ...

    @abc.abstractmethod
    def get_archive(self, name: str, path: str) -> Iterator[bytes]: ...

    @abc.abstractmethod
    def stats(self, name: str, memory_limit: int) -> ResourceUsage:
        """Usage from the engine's stats API (for an engine not on this host)."""

    # -- snapshots and changes (issue 15) ------------------------------------------

    #: Whether the archive API reads a paused container's tmpfs mounts (Docker's does;
    #: Podman's reads the container's storage under them then, missing their files).
    archive_while_paused: ClassVar[bool] = True
    #: Whether a tmpfs volume of the plan's gets the image's files there (copy_up):
    #: Docker copies them into its volume at create, then unmounts it, losing them.
    copies_up_tmpfs: ClassVar[bool] = True

    @abc.abstractmethod
    def commit(
        self, name: str, labels: dict[str, str], repo: str | None = None, tag: str | None = None
    ) -> str:
        """The container's writable layer as an image carrying ``labels`` (untagged
        without ``repo``), without pausing it (the caller does); the image's id."""

    @abc.abstractmethod
    def create_holder(self, image: str, name: str, labels: dict[str, str]) -> str:
        """A container of ``image`` that is never started, to put files into and commit;
        its id."""

    @abc.abstractmethod
    def snapshot_images(self, label: str) -> list[Any]:
        """Every image of this backend's carrying ``label`` (``snapshots.ListedImage``)."""

    @abc.abstractmethod
    def remove_image(self, ref: str) -> None:
        """Untag or remove the image. Gone already is fine; ConflictError while a
        container uses it."""

    def copy_archive(self, source: str, path: str, target: str, target_path: str) -> None:
        """The tar of ``path`` in container ``source`` unpacked at ``target_path`` in
        ``target``, engine to engine (here through a temporary file of this host's)."""
        from .snapshots import spooled_archive

        with spooled_archive(self.get_archive(source, path)) as archive:
            self.put_archive(target, target_path, archive)

    @abc.abstractmethod
    def changes(self, name: str) -> list[tuple[str, int]]:
        """The engine's diff of the container's writable layer: (path, kind), kind 0
        changed, 1 added, 2 deleted."""
