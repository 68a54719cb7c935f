"""Killing one exec's processes by the marker in their environment.

An exec that shares its sandbox's pid namespace with others (every container exec, and
a local exec through the sandbox's agent) cannot be killed as a process group: setsid
and double forks leave any tree. So each exec carries a marker variable, and every
process of the sandbox whose environment holds it belongs to that exec.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Container, Iterable
from pathlib import Path

MARKER = "CORRAL_EXEC"

# An exec's processes rank first for the kernel's OOM killer: when a memory bomb fills
# its sandbox, the kill takes the exec's processes and never the one whose end would
# end the sandbox (CI saw a bomb's second OOM kill take a container's keep-alive
# `sleep` after its first took the bomb), nor a local sandbox's agent. On the host,
# sandboxed processes go before the host's own. Raising the score needs no privilege.
EXEC_OOM_SCORE_ADJ = 500


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s children, of every thread of it."""
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        for task in os.listdir(f"/proc/{pid}/task"):
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def host_pids() -> list[int]:
    """Every process of this host (of this program's pid namespace)."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _environ(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def kill_marked(
    pids: Callable[[], Iterable[int]],
    marker: str | None,
    spare: Container[int] = (),
    also: Iterable[int] = (),
) -> int:
    """SIGKILL the processes among ``pids()`` carrying ``marker`` (with None: all of
    them), and ``also``; never those in ``spare``.

    Each is stopped (SIGSTOP) as soon as it is found and all are killed together after:
    killed one by one, a parent could run its next command between its child's death and
    its own (``trap '' TERM; sleep 1000; rm -rf ...``). Rounds repeat until one finds
    nothing new, so forks made meanwhile (a fork bomb) die too. A round waits until what
    it found has stopped: a process stopped in the middle of a fork lists its new child
    only once the fork is done, and a round that looked before then would miss it (CI
    saw a fork bomb outlive its exec so).
    """
    wanted = None if marker is None else f"{MARKER}={marker}".encode()
    victims = set(also)
    for pid in victims:
        _signal(pid, signal.SIGSTOP)
    for _ in range(50):
        found = set()
        for pid in pids():
            if pid in spare or pid in victims:
                continue
            with contextlib.suppress(OSError):
                if wanted is None or wanted in _environ(pid):
                    _signal(pid, signal.SIGSTOP)
                    found.add(pid)
        if not found:
            break
        _wait_stopped(found)
        victims |= found
    for pid in victims:
        _signal(pid, signal.SIGKILL)
    return len(victims)


def _wait_stopped(pids: set[int], timeout: float = 1.0) -> None:
    """Wait (briefly) until each of ``pids`` is stopped, a zombie or gone."""
    deadline = time.monotonic() + timeout
    waiting = set(pids)
    while waiting and time.monotonic() < deadline:
        waiting = {pid for pid in waiting if _state(pid) not in "TtZX"}
        if waiting:
            time.sleep(0.001)


def _state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("X" once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return "X"
    fields = stat[stat.rfind(b")") + 1 :].split()  # the name may hold spaces and parens
    return fields[0].decode() if fields else "X"
