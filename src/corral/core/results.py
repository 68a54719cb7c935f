"""What comes back from a sandbox: exec results, output chunks, usage, health, listings."""

from __future__ import annotations

from typing import Literal

import attrs

__all__ = [
    "LEFTOVER",
    "LEFTOVER_GRACE",
    "LOST",
    "Change",
    "ExecResult",
    "Health",
    "NodeInfo",
    "OutputChunk",
    "ProcessInfo",
    "ProcessRead",
    "ResourceUsage",
    "SandboxInfo",
    "SnapshotInfo",
]

#: The status of a sandbox of which only a part is left: a bridged sandbox's network,
#: say, after its container removed itself at the end of its lifetime. ``gc`` removes
#: it once expired, or once a minute old (younger, it may be a sandbox being created).
LEFTOVER = "leftover"
# How long gc leaves a leftover alone: it may be a create in flight in another process
# (a network made just before its container, a local folder before its metadata).
LEFTOVER_GRACE = 60.0
#: The status of a sandbox whose cluster node is gone: its calls fail (retryable), and
#: ``gc`` releases what the cluster still holds for it.
LOST = "lost"


def _decode(data: bytes) -> str:
    # Untrusted programs print anything; text never raises, bytes stay exact.
    return data.decode("utf-8", errors="replace")


@attrs.frozen
class ExecResult:
    """How a command ended and what it printed.

    ``stdout`` and ``stderr`` are the exact bytes (up to the output cap); ``text`` and
    ``stderr_text`` decode them as UTF-8, replacing bad bytes with U+FFFD.

    ``oom_killed`` means the command itself was killed for memory (exit 137 and an OOM
    kill counted in the sandbox's memory cgroup during the exec). ``oom_events`` counts
    the OOM kills during the exec, of the command or of any process it started: a child
    killed while the command went on and exited 0 gives ``exit_code=0``,
    ``oom_events=1`` and ``oom_killed=False``. Both are per exec: an earlier exec's OOM
    never shows in a later one's result. Both stay 0/False where the backend cannot
    read the cgroup (a remote engine).
    """

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    duration: float = 0.0
    timed_out: bool = False
    oom_killed: bool = False
    truncated: bool = False
    signal: int | None = None
    oom_events: int = 0
    #: Which limit stopped the command when ``timed_out``: ``"timeout"`` (the call's),
    #: ``"idle_timeout"`` (no output for that long), ``"lifetime"`` (the sandbox's end)
    #: or ``"cputime"`` (``limits.cputime``); None otherwise.
    timed_out_by: str | None = None

    @property
    def text(self) -> str:
        return _decode(self.stdout)

    @property
    def stderr_text(self) -> str:
        return _decode(self.stderr)

    @property
    def ok(self) -> bool:
        """True when the command exited 0 on its own."""
        return self.exit_code == 0 and not self.timed_out


@attrs.frozen
class OutputChunk:
    """A piece of output as it arrived, for streaming."""

    stream: Literal["stdout", "stderr"]
    data: bytes

    @property
    def text(self) -> str:
        """The chunk decoded on its own; use an incremental decoder for exact text."""
        return _decode(self.data)


@attrs.frozen
class ResourceUsage:
    """A sample of what a sandbox uses; None where the backend cannot know."""

    cpu_seconds: float | None = None
    memory_bytes: int | None = None
    memory_peak_bytes: int | None = None
    memory_limit_bytes: int | None = None
    pids: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None
    block_read_bytes: int | None = None
    block_write_bytes: int | None = None
    timestamp: float = 0.0


@attrs.frozen
class Health:
    """``healthy``, ``unhealthy`` or ``starting`` per the spec's healthcheck, else ``none``."""

    status: Literal["healthy", "unhealthy", "starting", "none"]
    failing_streak: int = 0
    last_output: str = ""


@attrs.frozen
class NodeInfo:
    """The machine of a cluster a sandbox runs on: the node's id and its address."""

    id: str
    address: str

    def __str__(self) -> str:
        return f"{self.id[:12]}@{self.address}"


@attrs.frozen
class SandboxInfo:
    """One sandbox as a backend lists it (by corral's labels).

    ``status`` is the backend's word for its state (``running``, ``exited``...), or
    ``leftover`` when only a part of it remains for ``gc`` to remove, or ``lost`` when
    the cluster node it ran on is gone. ``node`` is where it runs on a cluster backend
    (``ray``); None on the single-host backends.
    """

    id: str
    backend: str
    status: str
    created: float
    expires: float
    image: str | None = None
    labels: dict[str, str] = attrs.field(factory=dict)
    node: NodeInfo | None = None


@attrs.frozen
class ProcessInfo:
    """A spawned process as the backend keeps it: running, or ended with its result."""

    id: str
    argv: tuple[str, ...]
    tty: bool
    started: float
    running: bool
    exit_code: int | None = None


@attrs.frozen
class ProcessRead:
    """One read of a process's output: the chunks from the offset asked, the offset to
    ask next, and the result once the process ended and every chunk was read."""

    chunks: tuple[OutputChunk, ...]
    offset: int
    result: ExecResult | None = None


@attrs.frozen
class Change:
    """A path under the sandbox's writable folders that was ``added``, ``changed`` or
    ``deleted`` since the sandbox was made (from its image or snapshot)."""

    path: str
    kind: Literal["added", "changed", "deleted"]


@attrs.frozen
class SnapshotInfo:
    """A captured sandbox. ``corral.create(image=snapshot)`` starts from it; ``gc``
    removes it once ``expires`` passed. ``image`` is the name a backend's create takes."""

    id: str
    backend: str
    image: str
    sandbox_id: str
    created: float
    expires: float
    memory: bool = False
    size: int | None = None
    labels: dict[str, str] = attrs.field(factory=dict)
