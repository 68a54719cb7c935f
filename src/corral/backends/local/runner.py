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
from typing import IO, TYPE_CHECKING, Any, Protocol

from ...core.backend import ExecStatus
from ...core.errors import InternalError
from ...core.output import InputFeed, OutputSink
from . import child

if TYPE_CHECKING:
    from .terminal import Terminal

_READ = 64 * 1024
_POLL = 0.05  # how often a waiting exec looks at its cancel flag
_DRAIN = 5.0  # seconds to read output still held open after the end (or a stop)
_FEED_CHUNK = 64 * 1024


def _feed(pipe: IO[bytes], data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError, OSError):
        pipe.write(data)
    with contextlib.suppress(BrokenPipeError, OSError):
        pipe.close()


def feed_input(
    fd: int,
    data: bytes | None,
    feed: InputFeed | None,
    finished: threading.Event,
    *,
    eof: bytes | None = None,
) -> None:
    """Write ``data``, then what ``feed`` brings as it comes, to ``fd`` until the feed's
    end of file or ``finished`` (the command ended: what is still queued is dropped).
    The end of file closes ``fd``, or with ``eof`` (a terminal's end-of-file character)
    writes that and leaves ``fd`` open. Never blocks past ``finished``: a command that
    stops reading holds the writer only until it ends."""
    os.set_blocking(fd, False)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)

    def write_all(chunk: bytes) -> bool:
        view = memoryview(chunk)
        while view:
            if finished.is_set():
                return False
            if not poller.poll(_POLL * 1000):
                continue
            try:
                view = view[os.write(fd, view[:_FEED_CHUNK]) :]
            except BlockingIOError:
                continue
            except OSError:  # EPIPE, EIO: nobody reads any more
                return False
        return True

    try:
        if data and not write_all(data):
            return
        while feed is not None and not finished.is_set():
            chunk = feed.read(timeout=_POLL)
            if chunk is None:
                continue
            if not chunk:
                if eof is not None:
                    write_all(eof)
                return
            if not write_all(chunk):
                return
    finally:
        if eof is None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _read_until(fd: int, deadline: float, complete: Callable[[bytes], bool]) -> bytes:
    """What a process wrote on ``fd`` until ``complete`` says it is all there (it
    writes nothing more until told to go), its end, or ``deadline``."""
    data = b""
    poller = select.poll()  # not select(): a busy program's fds pass 1024
    poller.register(fd, select.POLLIN)
    while not complete(data) and time.monotonic() < deadline:
        if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def _read_info(fd: int, deadline: float) -> dict[str, Any] | None:
    """bwrap's --info-fd JSON (the fd closed here), or None when bwrap exits first."""
    try:
        data = _read_until(fd, deadline, lambda d: _json(d) is not None)
    finally:
        os.close(fd)
    return _json(data)


def _json(data: bytes) -> dict[str, Any] | None:
    try:
        return json.loads(data)
    except ValueError:
        return None


def await_start(
    popen: subprocess.Popen[bytes],
    info_fd: int | None,
    enter: Callable[[int], None] | None = None,
) -> int:
    """The host pid to kill to end everything a sandbox's bwrap started, once it is
    safe to tell it "go" (child.py): the process itself once it says it is armed (and
    ``enter`` did its part for it), or with ``info_fd`` (closed here) bwrap's child,
    the sandbox's init, from --info-fd."""
    deadline = time.monotonic() + 30
    try:
        if info_fd is None:
            stderr = popen.stderr.fileno()  # type: ignore[union-attr]
            said = _read_until(stderr, deadline, lambda d: d.endswith(b"\n"))
            pid = popen.pid if said == child.ARMED else None
            if pid is not None and enter is not None:
                _enter(enter, pid)
        else:
            said = b""
            info = _read_info(info_fd, deadline)
            pid = None if info is None else int(info["child-pid"])
        if pid is None:
            raise _failed(popen, said)
        return pid
    except BaseException:
        kill(popen, None)
        raise


def _enter(enter: Callable[[int], None], pid: int) -> None:
    try:
        enter(pid)
    except OSError as e:
        raise _cannot_set_up(e) from e


def _cannot_set_up(e: Exception) -> InternalError:
    return InternalError(
        "the sandbox's process could not join its cgroups, take its host user or "
        f"lower its limits before starting ({e}); `corral doctor` checks the cgroups "
        "and backends.local.host_user, and a sandbox closed meanwhile has no cgroups"
    )


def popen(
    argv: list[str], *, own_pid_namespace: bool = False, **kwargs: Any
) -> subprocess.Popen[bytes]:
    """``subprocess.Popen``, with a failed child setup (see child.py) said plainly; with
    ``own_pid_namespace``, the process is the init of a pid namespace of its own."""
    try:
        if not own_pid_namespace:
            return subprocess.Popen(argv, close_fds=True, **kwargs)
        with child.own_pid_namespace():
            return subprocess.Popen(argv, close_fds=True, **kwargs)
    except subprocess.SubprocessError as e:  # the preexec_fn raised; its errno is lost
        raise _cannot_set_up(e) from e


def kill(popen: subprocess.Popen[bytes], child_pid: int | None) -> None:
    """SIGKILL the init of a sandbox's pid namespace (ending it) and the process this
    program started, and reap that."""
    for pid in (child_pid, popen.pid):
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    popen.wait()


def _failed(popen: subprocess.Popen[bytes], said: bytes) -> InternalError:
    kill(popen, None)
    said += popen.stderr.read()  # type: ignore[union-attr]
    message = said.decode(errors="replace").strip()
    reason = message or f"it exited with {popen.returncode} and said nothing"
    return InternalError(
        f"bubblewrap failed to start the sandbox: {reason}; `corral doctor` checks what "
        "the local backend needs (bubblewrap, the cgroups, backends.local.host_user)"
    )


class Process:
    """One command, through bwrap or directly, supervised to its end."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        stdin: bytes | None,
        sink: OutputSink,
        popen_kwargs: dict[str, Any],
        info_fd: int | None = None,
        own_pid_namespace: bool = False,
        feed: InputFeed | None = None,
        terminal: Terminal | None = None,
    ) -> None:
        """With ``info_fd``, bwrap's --info-fd (the child's end, closed here). ``feed``
        is standard input as it comes, after ``stdin``. With ``terminal``, the
        command's output is its stdout (the terminal's slave end, closed here once
        passed on) and ``feed`` goes to the terminal, while stdin and stderr stay pipes
        of the launch (its "go", its complaints)."""
        self.sink = sink
        self._stdin = stdin
        self._feed = feed
        self._terminal = terminal
        self.child_pid: int | None = None
        wants_stdin = bool(stdin) or (feed is not None and terminal is None)
        try:
            self.popen = popen(
                argv,
                own_pid_namespace=own_pid_namespace,
                stdin=subprocess.PIPE if wants_stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if terminal is None else terminal.slave,
                stderr=subprocess.PIPE,
                env=env,
                **popen_kwargs,
            )
        finally:
            if info_fd is not None:  # the child's end; the parent must not hold it
                os.close(info_fd)
            if terminal is not None:  # only the command holds the slave: its end hangs up
                terminal.close_slave()

    def await_start(self, info_fd: int | None, enter: Callable[[int], None] | None = None) -> None:
        """Learn the pid that ends everything bwrap started (``await_start``)."""
        try:
            self.child_pid = await_start(self.popen, info_fd, enter)
        except BaseException:  # it never ran: nothing will drain or close its pipes
            for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
                if pipe is not None:
                    pipe.close()
            raise

    def kill(self) -> None:
        """SIGKILL the init of the sandbox's pid namespace (ending it) and the host
        process."""
        kill(self.popen, self.child_pid)

    def supervise(self, timeout: float | None, kill_tree: Callable[[], None]) -> ExecStatus:
        """Drain output and wait; on timeout or cancel kill everything, then report."""
        finished = threading.Event()
        feeders = []
        stdin = self.popen.stdin
        if stdin is not None and self._terminal is None and self._feed is not None:
            args: tuple[Any, ...] = (os.dup(stdin.fileno()), self._stdin, self._feed, finished)
            stdin.close()
            feeders.append(threading.Thread(target=feed_input, args=args, daemon=True))
        elif stdin is not None:
            feeders.append(threading.Thread(target=_feed, args=(stdin, self._stdin), daemon=True))
        if self._terminal is not None and self._feed is not None:
            args = (self._terminal.master, None, self._feed, finished)
            feeders.append(
                threading.Thread(
                    target=feed_input, args=args, kwargs={"eof": self._terminal.eof}, daemon=True
                )
            )
        for feeder in feeders:
            feeder.start()
        merged = self._terminal is not None  # a terminal's output is one stream
        pipes = {
            pipe.fileno(): "stdout" if merged else name
            for name, pipe in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr))
            if pipe is not None
        }
        if self._terminal is not None:
            pipes[self._terminal.master] = "stdout"
        try:
            with _ExitOf(self, kill_tree) as end:
                timed_out = pump(self.sink, pipes, end, timeout)
        finally:
            finished.set()
            for pipe in (self.popen.stdout, self.popen.stderr):
                if pipe is not None:
                    pipe.close()
        for feeder in feeders:
            feeder.join(timeout=5)
        code = self.popen.returncode
        if code < 0:  # killed: reported as a shell does, 128 + the signal's number
            sig: int | None = -code
            code = 128 - code
        else:
            sig = code - 128 if code > 128 else None
        return ExecStatus(exit_code=code, timed_out=timed_out, signal=sig)


class End(Protocol):
    """How ``pump`` learns that a command ended, and how it stops one."""

    @property
    def fd(self) -> int | None:  # a property: pump only reads it, so `fd: int` matches
        """Readable when there is news of the end; None when there is none to wait on."""

    def readable(self) -> bool:
        """``fd`` is readable: take what it says; True once the command has ended."""

    def ended(self) -> bool:
        """Asked on every round: whether the command has ended (where ``fd`` cannot
        tell, or has not yet)."""

    def stop(self) -> None:
        """Timeout, cancel or a failure: kill the command (its end follows)."""

    def leftovers(self) -> None:
        """The command ended: kill what it left running, which also closes the pipes
        that a background child may still hold."""


def pump(sink: OutputSink, pipes: dict[int, str], end: End, timeout: float | None) -> bool:
    """Drain ``pipes`` (fd: stream name) into ``sink`` until the command ends and its
    output is read; on timeout or cancel stop it. True when it was stopped so.

    One poll loop in the calling thread watches the pipes and the end: no thread per
    stream to start for every exec. Output still held open by a stray process is read
    for at most ``_DRAIN`` seconds after the end.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    poller = select.poll()  # not select(): a busy program's fds pass 1024
    for fd in pipes:
        poller.register(fd, select.POLLIN)
    if end.fd is not None:
        poller.register(end.fd, select.POLLIN)
    pipes = dict(pipes)
    stopped = False
    ended = False
    give_up: float | None = None  # after a stop, or after the end: when to stop reading
    try:
        while True:
            now = time.monotonic()
            if not ended and not stopped and (sink.cancelled or (deadline and now >= deadline)):
                stopped = True
                end.stop()
                give_up = now + _DRAIN
            if not ended:
                ended = end.ended()
            if ended and give_up is None:  # it ended by itself
                end.leftovers()
                give_up = now + _DRAIN
            if (ended and not pipes) or (give_up is not None and now > give_up):
                break
            for fd, _ in poller.poll(_POLL * 1000):
                if fd == end.fd:
                    if end.readable():
                        poller.unregister(fd)
                        ended = True
                elif fd in pipes:
                    chunk = _read(fd)
                    if chunk:
                        sink.write(pipes[fd], chunk)  # past the cap too: never block it
                    else:
                        poller.unregister(fd)
                        del pipes[fd]
    except BaseException:
        # A failing consumer (on_chunk) or an interrupt: the command must not run on.
        end.stop()
        raise
    return stopped


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, _READ)
    except OSError:
        return b""


class _ExitOf:
    """The end of a host process, seen through its pidfd (Linux 5.3), which is readable
    the moment it exits: ``Popen.wait(timeout)`` polls with sleeps of up to 50 ms, which
    a short command would pay on every exec. Without one, the exit is polled."""

    def __init__(self, process: Process, kill_tree: Callable[[], None]) -> None:
        self._process = process
        self._kill_tree = kill_tree
        try:
            self.fd: int | None = os.pidfd_open(process.popen.pid)
        except (AttributeError, OSError):
            self.fd = None

    def __enter__(self) -> _ExitOf:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)

    def readable(self) -> bool:
        self._process.popen.wait()
        return True

    def ended(self) -> bool:
        # With a pidfd the poll reports the exit; without one, ask on every round.
        return self.fd is None and self._process.popen.poll() is not None

    def stop(self) -> None:
        self._process.kill()
        self._kill_tree()

    def leftovers(self) -> None:
        # An exec owns its descendants: whatever it left running dies with it.
        self._kill_tree()
