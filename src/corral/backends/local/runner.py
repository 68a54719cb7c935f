"""Running one command as a host process: pipes drained, stdin fed, timeout enforced."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from ...core.backend import ExecStatus
from ...core.errors import InternalError
from ...core.output import OutputSink

_READ = 64 * 1024
_POLL = 0.05  # how often a waiting exec looks at its cancel flag


def _drain(pipe: IO[bytes], stream: str, sink: OutputSink) -> None:
    # Keep reading after the cap: the sink drops the excess, the command never blocks.
    fd = pipe.fileno()
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, _READ):
            sink.write(stream, chunk)
    pipe.close()


def _feed(pipe: IO[bytes], data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError, OSError):
        pipe.write(data)
    with contextlib.suppress(BrokenPipeError, OSError):
        pipe.close()


def _read_info(fd: int, deadline: float) -> dict[str, Any] | None:
    """bwrap's --info-fd JSON, or None when bwrap exits before writing it."""
    data = b""
    with os.fdopen(fd, "rb", buffering=0) as f:
        while time.monotonic() < deadline:
            chunk = f.read(4096)
            if not chunk:
                break
            data += chunk
            with contextlib.suppress(ValueError):
                return json.loads(data)
    return None


class _ExitWatch:
    """Waits for a process to exit, waking the moment it does.

    Through a pidfd where the kernel has them (Linux 5.3): ``Popen.wait(timeout)`` polls
    with sleeps of up to 50 ms, which a short command would pay on every exec.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pidfd: int | None
        try:
            self.pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):
            self.pidfd = None

    def wait(self, seconds: float) -> bool:
        """True once the process has exited and been reaped; False after ``seconds``."""
        if self.pidfd is None:
            try:
                self.popen.wait(seconds)
            except subprocess.TimeoutExpired:
                return False
            return True
        poller = select.poll()  # not select(): a busy program's fds pass 1024
        poller.register(self.pidfd, select.POLLIN)
        if not poller.poll(seconds * 1000):
            return False
        self.popen.wait()
        return True

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class Process:
    """One command, started blocked (bwrap) or directly, then supervised to its end."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        stdin: bytes | None,
        sink: OutputSink,
        popen_kwargs: dict[str, Any],
        bwrap_fds: tuple[int, int] | None = None,
    ) -> None:
        self.sink = sink
        self._stdin = stdin
        self.child_pid: int | None = None
        try:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                close_fds=True,
                **popen_kwargs,
            )
        finally:
            if bwrap_fds is not None:
                for fd in bwrap_fds:  # the child's ends; the parent must not hold them
                    os.close(fd)

    def wait_for_bwrap(self, info_fd: int, block_fd: int, prepare: Callable[[int], None]) -> None:
        """Read the sandbox's pid, let ``prepare`` apply limits to it, then release it."""
        try:
            info = _read_info(info_fd, time.monotonic() + 30)
            if info is None:
                raise self._failed()
            self.child_pid = int(info["child-pid"])
            try:
                prepare(self.child_pid)
            except ProcessLookupError:
                raise self._failed() from None
            os.write(block_fd, b"go")
        except BaseException:
            self.kill()
            self.popen.wait()
            raise
        finally:
            os.close(block_fd)

    def _failed(self) -> InternalError:
        self.kill()
        self.popen.wait()
        message = self.popen.stderr.read().decode(errors="replace").strip()  # type: ignore[union-attr]
        return InternalError(f"bubblewrap failed to start the sandbox: {message}")

    def kill(self) -> None:
        """SIGKILL the sandbox's init (ending its pid namespace) and the host process."""
        for pid in (self.child_pid, self.popen.pid):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def supervise(self, timeout: float | None, kill_tree: Callable[[], None]) -> ExecStatus:
        """Drain output and wait; on timeout or cancel kill everything, then report."""
        threads = [
            threading.Thread(
                target=_drain, args=(self.popen.stdout, "stdout", self.sink), daemon=True
            ),
            threading.Thread(
                target=_drain, args=(self.popen.stderr, "stderr", self.sink), daemon=True
            ),
        ]
        if self._stdin:
            threads.append(
                threading.Thread(target=_feed, args=(self.popen.stdin, self._stdin), daemon=True)
            )
        for t in threads:
            t.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        watch = _ExitWatch(self.popen)
        try:
            while not watch.wait(_POLL):
                if self.sink.cancelled or (deadline is not None and time.monotonic() >= deadline):
                    timed_out = True
                    self.kill()
                    kill_tree()
                    self.popen.wait()
                    break
        finally:
            watch.close()
        # An exec owns its descendants: whatever it left running dies with it, which
        # also closes the pipes that a background child may still hold.
        kill_tree()
        for t in threads:
            t.join(timeout=5)
        code = self.popen.returncode
        sig = -code if code < 0 else (code - 128 if code > 128 else None)
        if code < 0:
            code = 128 + sig  # type: ignore[operator]
        return ExecStatus(exit_code=code, timed_out=timed_out, signal=sig)
