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


def _pidfd(pid: int) -> int | None:
    """A pidfd of the process where the kernel has them (Linux 5.3), readable the moment
    it exits: ``Popen.wait(timeout)`` polls with sleeps of up to 50 ms, which a short
    command would pay on every exec. Without one, the exit is polled."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


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
        """Drain output and wait; on timeout or cancel kill everything, then report.

        One poll loop in the calling thread watches both pipes and the exit (a pidfd):
        no thread per stream to start for every exec. Only stdin gets a thread.
        """
        feeder = None
        if self._stdin:
            feeder = threading.Thread(
                target=_feed, args=(self.popen.stdin, self._stdin), daemon=True
            )
            feeder.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        pidfd = _pidfd(self.popen.pid)
        pipes: dict[int, tuple[str, IO[bytes]]] = {
            pipe.fileno(): (name, pipe)
            for name, pipe in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr))
            if pipe is not None
        }
        poller = select.poll()  # not select(): a busy program's fds pass 1024
        for fd in pipes:
            poller.register(fd, select.POLLIN)
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        exited = False
        drain_until: float | None = None
        try:
            while pipes or not exited:
                now = time.monotonic()
                expired = deadline is not None and now >= deadline
                if not exited and (self.sink.cancelled or expired):
                    timed_out = True
                    self.kill()
                    kill_tree()
                    self.popen.wait()
                    exited = True
                if exited and drain_until is None:
                    # An exec owns its descendants: whatever it left running dies with it,
                    # which also closes the pipes that a background child may still hold.
                    kill_tree()
                    drain_until = now + 5
                if drain_until is not None and now > drain_until:
                    break
                for fd, _ in poller.poll(_POLL * 1000):
                    if fd == pidfd:
                        poller.unregister(fd)
                        self.popen.wait()
                        exited = True
                    elif fd in pipes:
                        self._read(fd, pipes, poller)
                if pidfd is None and not exited:
                    exited = self.popen.poll() is not None
        except BaseException:
            # A failing consumer (on_chunk) or an interrupt: the command must not run on.
            self.kill()
            kill_tree()
            self.popen.wait()
            raise
        finally:
            if pidfd is not None:
                os.close(pidfd)
            for _, pipe in pipes.values():
                pipe.close()
        if feeder is not None:
            feeder.join(timeout=5)
        code = self.popen.returncode
        sig = -code if code < 0 else (code - 128 if code > 128 else None)
        if code < 0:
            code = 128 + sig  # type: ignore[operator]
        return ExecStatus(exit_code=code, timed_out=timed_out, signal=sig)

    def _read(self, fd: int, pipes: dict[int, tuple[str, IO[bytes]]], poller: Any) -> None:
        """One read from a ready pipe; at its end, forget it. Reading goes on past the cap
        (the sink drops the excess), so the command never blocks on a full pipe."""
        name, pipe = pipes[fd]
        try:
            chunk = os.read(fd, _READ)
        except OSError:
            chunk = b""
        if chunk:
            self.sink.write(name, chunk)
            return
        poller.unregister(fd)
        pipe.close()
        del pipes[fd]
