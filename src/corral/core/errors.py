"""The error family: every failure corral reports is a SandboxError with a category."""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs `import corral` milliseconds
if TYPE_CHECKING:
    from typing import ClassVar

__all__ = [
    "ArchiveError",
    "BackendUnavailableError",
    "CapabilityError",
    "CapacityError",
    "ConfigError",
    "ConflictError",
    "InternalError",
    "NotFoundError",
    "PathSecurityError",
    "PluginError",
    "PolicyError",
    "ResourceLimitError",
    "SandboxClosedError",
    "SandboxError",
    "TimeoutError",
]


class SandboxError(Exception):
    """Base of every error corral raises.

    Attributes:
        category: one of config, unavailable, not_found, capability, timeout,
            resource_limit, policy, conflict, internal.
        retryable: whether trying the same call again later may succeed.
        backend: the backend's name, where known.
        sandbox_id: the sandbox's id, where known.
        fix: what the user can do about it, where known (``pip install
            'corral[docker]'``); shown after the message, and read by ``corral doctor``
            and ``corral backends`` as it is, never parsed back from the message.
    """

    category: ClassVar[str] = "internal"
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        backend: str | None = None,
        sandbox_id: str | None = None,
        retryable: bool | None = None,
        fix: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.backend = backend
        self.sandbox_id = sandbox_id
        self.retryable = self.default_retryable if retryable is None else retryable
        self.fix = fix

    def __str__(self) -> str:
        where = [
            f"{k}={v}" for k, v in (("backend", self.backend), ("sandbox", self.sandbox_id)) if v
        ]
        text = f"{self.message} ({', '.join(where)})" if where else self.message
        return f"{text}; fix: {self.fix}" if self.fix else text


class ConfigError(SandboxError, ValueError):
    """A bad value or an unknown key, found before anything was created.

    ``path`` names the field (``sandbox.limits.memory``); ``reason`` says what is wrong.
    Several problems found at once are all listed in ``problems``.
    """

    category = "config"

    def __init__(
        self,
        path: str,
        reason: str,
        *,
        backend: str | None = None,
        sandbox_id: str | None = None,
        retryable: bool | None = None,
        fix: str | None = None,
    ) -> None:
        self.path = path
        self.reason = reason
        self.problems: list[tuple[str, str]] = [(path, reason)]
        super().__init__(
            f"{path}: {reason}" if path else reason,
            backend=backend,
            sandbox_id=sandbox_id,
            retryable=retryable,
            fix=fix,
        )

    @classmethod
    def many(cls, problems: list[tuple[str, str]]) -> ConfigError:
        """One error that lists several ``(path, reason)`` problems, one per line."""
        first = cls(*problems[0])
        first.problems = list(problems)
        first.message = "\n".join(f"{p}: {r}" if p else r for p, r in problems)
        first.args = (first.message,)
        return first

    def prefixed(self, prefix: str) -> ConfigError:
        """The same problems, with every path under ``prefix``."""
        return ConfigError.many([(_join(prefix, p), r) for p, r in self.problems])


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


class PluginError(SandboxError):
    """A plugin that cannot be loaded or that breaks the hook contract."""

    category = "config"


class PolicyError(SandboxError):
    """A request refused on purpose: an unsafe option not opted into, or a policy plugin."""

    category = "policy"


class PathSecurityError(PolicyError, ValueError):
    """A path that would leave the sandbox: ``..``, an absolute escape, a symlink, a NUL."""


class ArchiveError(PathSecurityError):
    """An archive member that is not a plain file or folder, or that would escape."""


class CapabilityError(SandboxError):
    """The backend cannot enforce what the spec asks for; nothing was created."""

    category = "capability"


class BackendUnavailableError(SandboxError):
    """The backend cannot run here now; the message says why and how to fix it."""

    category = "unavailable"
    default_retryable = True


class NotFoundError(SandboxError):
    """A sandbox, image or path that does not exist."""

    category = "not_found"


class SandboxClosedError(SandboxError):
    """A sandbox handle used after ``close()``; raised without asking the backend."""

    category = "conflict"


class ConflictError(SandboxError):
    """The request clashes with the sandbox's state (not running, name taken, busy)."""

    category = "conflict"
    default_retryable = True


class TimeoutError(SandboxError):
    """An operation of corral's (not a command's) took longer than allowed."""

    category = "timeout"
    default_retryable = True


class ResourceLimitError(SandboxError):
    """A cap was reached: archive size or member count, capacity, disk space."""

    category = "resource_limit"


class CapacityError(ResourceLimitError):
    """This process already holds ``max_sandboxes`` open sandboxes on the backend (and
    none closed within ``capacity_wait``); nothing was created. Retryable: a close frees
    a slot."""

    default_retryable = True


class InternalError(SandboxError):
    """A failure inside corral or a backend that no other category describes."""

    category = "internal"


def rebuilt(kind: str, fields: dict[str, object]) -> SandboxError:
    """A SandboxError made again from its class's name and its fields (``vars``), as
    another process raised it: the same class where corral has it, InternalError for a
    plugin's own. Plain pickling loses the fields of errors whose constructor takes
    other arguments than the message (ConfigError's field)."""
    cls = globals().get(kind)
    if not (isinstance(cls, type) and issubclass(cls, SandboxError)):
        cls = InternalError
    error = cls.__new__(cls)
    Exception.__init__(error, fields.get("message", ""))
    error.__dict__.update(fields)
    return error
