"""A local exec's pseudo-terminal, and finding the command of a running exec.

A ``tty`` exec gets a pty pair made on the host: the command's stdin, stdout and
stderr are the slave end and it is the controlling terminal of a session of the
command's own (``setsid -c``, which makes one without forking when the process leads
no process group, as a bwrap'd program never does: its group's leader is outside its
pid namespace). The host holds the master: every byte the command writes comes out
there, what the keeper writes goes in, and its window size is set there (the kernel
tells the command's foreground group with SIGWINCH).

Signals go to the command itself, never to a launcher in front of it (the agent's
script shell, env(1), the tty's redirecting shell): ``command_pid`` waits for the
launch chain to have exec'd into the command, and signals through a pidfd, so a pid
that ended and was reused meanwhile is never signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import termios
import time
from collections.abc import Callable, Sequence

from .. import sweep
from .bwrap import AS_IS, GATED

SETSID = "/usr/bin/setsid"
# Before the command: the slave (the launch's stdout) becomes its stdin and stderr,
# and setsid makes it the controlling terminal of a session of the command's own.
_ON_TERMINAL = ("/bin/sh", "-c", f'exec 0<&1 2>&1; exec {SETSID} -c "$@"', "sh")
_ROWS, _COLS = 24, 80
# Launchers a command's process passes through before it is the command: a forked
# subshell of the agent's script (same argv as the script), env(1) with a clean
# environment, the terminal's shell, setsid, bwrap's gate.
_LAUNCHERS = (("/usr/bin/env",), _ON_TERMINAL[:3], (SETSID, "-c"), AS_IS[:3], GATED[:3])
_SETTLE = 2.0  # seconds for a launch chain to reach the command


def available() -> bool:
    return os.access(SETSID, os.X_OK)


class Terminal:
    """A pty pair for one exec: the host keeps the master, the command gets the slave."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        os.set_inheritable(self.slave, False)
        for fd in (self.master, self.slave):
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        self.resize(_ROWS, _COLS)
        # What the keeper's "close stdin" writes: the line discipline's end of file.
        self.eof = termios.tcgetattr(self.slave)[6][termios.VEOF]
        self._closed = False

    @staticmethod
    def program(argv: Sequence[str]) -> list[str]:
        """``argv`` run on the terminal (given as stdout) as its controlling terminal."""
        return [*_ON_TERMINAL, *argv]

    def resize(self, rows: int, cols: int) -> None:
        if not (0 < rows < 65536 and 0 < cols < 65536):
            raise ValueError(f"{rows}x{cols} is not a terminal size")
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close_slave(self) -> None:
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    def close(self) -> None:
        self.close_slave()
        if not self._closed:
            self._closed = True
            os.close(self.master)


def _cmdline(pid: int) -> tuple[str, ...] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return tuple(os.fsdecode(part) for part in raw.split(b"\0")[:-1])


def _is_launcher(cmdline: tuple[str, ...], also: Sequence[tuple[str, ...]]) -> bool:
    return any(cmdline[: len(prefix)] == prefix for prefix in (*_LAUNCHERS, *also))


def command_pid(
    find: Callable[[], int | None],
    argv: Sequence[str],
    also_launchers: Sequence[tuple[str, ...]] = (),
) -> int | None:
    """The pid of a running exec's command: ``find()`` names the process that is or
    will be the command (None: not started yet, or ended); this waits (briefly) until
    that process runs ``argv`` or at least no launcher any more. None when there is
    none by then."""
    deadline = time.monotonic() + _SETTLE
    while True:
        pid = find()
        cmdline = None if pid is None else _cmdline(pid)
        if cmdline is not None and (
            cmdline == tuple(argv) or not _is_launcher(cmdline, also_launchers)
        ):
            return pid
        if time.monotonic() > deadline:
            # A command that is a launcher itself (env ...) is the one; else none runs.
            return pid if cmdline is not None else None
        time.sleep(0.005)


def send_signal(pid: int, signum: int, still_ours: Callable[[int], bool]) -> None:
    """Signal ``pid`` through a pidfd, once ``still_ours(pid)`` holds with the pidfd
    open (so the pid is not one reused by another process since it was found)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if still_ours(pid):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signum)
    finally:
        os.close(fd)


def innermost_pid(pid: int) -> tuple[int, int] | None:
    """A process's pid in its own pid namespace, and how deep that namespace is."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    return int(ids[-1]), len(ids)
    except (OSError, ValueError, IndexError):
        pass
    return None


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += sweep.children(current)
    return found


def bwrap_program(root: int) -> int | None:
    """The program of the bwrap started as ``root`` (or started by it): pid 2 of the
    innermost pid namespace below it (bwrap's init is 1 there)."""
    best: tuple[int, int] | None = None
    for pid in descendants(root):
        inner = innermost_pid(pid)
        if inner is not None and inner[0] == 2 and (best is None or inner[1] > best[0]):
            best = (inner[1], pid)
    return None if best is None else best[1]
