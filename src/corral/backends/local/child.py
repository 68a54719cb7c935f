"""What a sandbox's process does between fork and exec, before bwrap or a command runs.

It joins the sandbox's cgroups (as root), drops to the sandboxes' host user, lowers its
rlimits, ranks itself for the OOM killer (an exec's processes go first), and asks to
be killed when the thread that forked it ends. Done before exec, there is no
hand-over afterwards: bwrap and everything it starts are inside the limits from their
first instruction, and a caller that dies meanwhile takes the process with it.
(Handing a started bwrap its cgroups through --block-fd left a window: bwrap takes EOF
there for a release, so a caller dying then let the command run unconfined.)
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from collections.abc import Callable, Sequence

__all__ = ["Limits", "setup"]

Limits = list[tuple[int, tuple[int, int]]]  # (resource.RLIMIT_*, (soft, hard))

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def setup(
    *,
    cgroup_procs: Sequence[str],
    run_as: tuple[int, int] | None,
    limits: Limits,
    oom_score_adj: int | None,
) -> Callable[[], None]:
    """A ``preexec_fn``: into the cgroups whose ``cgroup.procs`` files are given, then
    ``oom_score_adj`` (None leaves it; raising it needs no privilege), then user
    ``run_as`` (uid, gid; None stays), then ``limits``."""
    parent = os.getpid()
    procs = [os.fsencode(path) for path in cgroup_procs]

    def in_the_child() -> None:
        me = str(os.getpid()).encode()
        for path in procs:
            _write(path, me)
        if oom_score_adj is not None:  # before the change of user makes /proc/self root's
            _write(b"/proc/self/oom_score_adj", str(oom_score_adj).encode())
        if run_as is not None:
            os.setgroups([])
            os.setgid(run_as[1])
            os.setuid(run_as[0])
        for kind, value in limits:
            resource.setrlimit(kind, value)
        # Last: a change of user clears it. exec keeps it (bwrap is not setuid), and
        # bwrap's --die-with-parent sets it again for its own child.
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the caller died before that
            os._exit(1)

    return in_the_child


def _write(path: bytes, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
