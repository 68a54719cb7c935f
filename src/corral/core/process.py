"""A process running in the background of a sandbox (``Sandbox.spawn``)."""

from __future__ import annotations

import signal as signals
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from .errors import ConfigError, TimeoutError
from .results import ExecResult, OutputChunk, ProcessInfo

if TYPE_CHECKING:
    from .sandbox import Sandbox

__all__ = ["Process"]

_WAIT_STEP = 5.0  # seconds one read waits at most; a caller's wait is made of these
_TO_THE_END = 1 << 62  # an offset past any output: a read that waits for the end only


class Process:
    """A command started by ``Sandbox.spawn``: it runs while the caller goes on, and
    outlives the caller's program (``corral.attach(...).process(id)`` finds it again).

    Its output is kept (up to ``max_output`` per stream) whether or not anyone reads it,
    so a process nobody reads never blocks. It ends with the sandbox, at its timeout or
    idle timeout, at the sandbox's lifetime, or on ``kill()``: its whole tree with it.
    """

    def __init__(self, sandbox: Sandbox, info: ProcessInfo) -> None:
        self.sandbox = sandbox
        self.info = info
        self._result: ExecResult | None = None

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def argv(self) -> tuple[str, ...]:
        return self.info.argv

    @property
    def tty(self) -> bool:
        return self.info.tty

    def __repr__(self) -> str:
        return f"<Process {self.id} {' '.join(self.argv)!r} in sandbox {self.sandbox.id}>"

    # -- input --------------------------------------------------------------------------

    def write(self, data: bytes | str) -> None:
        """Send ``data`` (text as UTF-8) to the process's standard input. Waits while
        the process leaves a full pipe unread (ConflictError after 30 s)."""
        if isinstance(data, str):
            data = data.encode()
        self._control("write", data=data)

    def close_stdin(self) -> None:
        """End the process's standard input (it reads end of file)."""
        self._control("close_stdin")

    def resize(self, rows: int, cols: int) -> None:
        """Set the size of the process's terminal (spawned with ``tty=True``)."""
        self._control("resize", rows=int(rows), cols=int(cols))

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the command itself (not to a shell around it)."""
        self._control("signal", signum=int(signum))

    def kill(self) -> None:
        """Kill the process and everything it started. The result is not a timeout."""
        self._control("kill")

    def terminate(self) -> None:
        """SIGTERM to the command, which may clean up; ``kill()`` if it must go."""
        self.signal(signals.SIGTERM)

    def _control(self, op: str, **args: object) -> None:
        self.sandbox._running_for(f"process.{op}")
        self.sandbox.backend.process_control(self.sandbox.id, self.id, op, **args)

    # -- output and end -----------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the process still runs (asks the sandbox's keeper)."""
        if self._result is not None:
            return False
        read = self.sandbox.backend.process_read(self.sandbox.id, self.id, _TO_THE_END, 0)
        if read.result is not None:
            self._result = read.result
        return read.result is None

    def output(
        self, since: Literal["start", "now"] = "start", *, timeout: float | None = None
    ) -> Iterator[OutputChunk]:
        """The process's output as it comes, until it ends: all of it (``start``, up to
        the cap), or what it prints after this call (``now``). Leaving the loop leaves
        the process running. ``timeout``: raise TimeoutError when it is still running
        then.
        """
        self.sandbox._check_open()
        offset = 0
        if since == "now":  # taken at the call, not at the first iteration
            offset = self.sandbox.backend.process_read(self.sandbox.id, self.id, -1, 0).offset
        elif since != "start":
            raise ConfigError("since", f"{since!r} is not 'start' or 'now'")
        return self._chunks(offset, timeout)

    def _chunks(self, offset: int, timeout: float | None) -> Iterator[OutputChunk]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = _WAIT_STEP if deadline is None else min(_WAIT_STEP, deadline - time.monotonic())
            if wait <= 0:
                raise self._still_running(timeout)
            read = self.sandbox.backend.process_read(self.sandbox.id, self.id, offset, wait)
            yield from read.chunks
            offset = read.offset
            if read.result is not None:
                self._result = read.result
                return

    def wait(self, timeout: float | None = None) -> ExecResult:
        """Wait for the end and return how it ended, with its output (up to the cap).
        ``timeout``: raise TimeoutError if it still runs then; the process goes on."""
        if self._result is not None:
            return self._result
        self.sandbox._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _WAIT_STEP if deadline is None else deadline - time.monotonic()
            read = self.sandbox.backend.process_read(
                self.sandbox.id, self.id, _TO_THE_END, max(0.0, min(_WAIT_STEP, left))
            )
            if read.result is not None:
                self._result = read.result
                return read.result
            if deadline is not None and time.monotonic() >= deadline:
                raise self._still_running(timeout)

    def _still_running(self, timeout: float | None) -> TimeoutError:
        return TimeoutError(
            f"process {self.id} still runs after {timeout}s",
            backend=self.sandbox.backend_name,
            sandbox_id=self.sandbox.id,
        )
