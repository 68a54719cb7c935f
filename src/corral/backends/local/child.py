"""How a sandbox's process gets into its cgroups, OOM rank, host user and limits, and
ties its life to its caller's, before bwrap (or an unisolated command) runs.

Two ways to the same outcome:

- ``Tools.prefix``: small programs run in front of bwrap (sh, then util-linux's setpriv
  and prlimit), so that Python starts it with vfork. Forking a large program to run a
  ``preexec_fn`` copies its page tables on every exec: 8 ms of the caller's CPU for an
  80 MB program here, against 0.8 ms, and the forks of many threads queue behind each
  other.
- ``setup``: a ``preexec_fn`` that does the same in the forked child, where setpriv or
  prlimit is missing.

Either way it all happens before exec, so bwrap and everything it starts are inside
the limits from their first instruction. The parent-death signal is armed after the
change of user (which clears it), then the caller is checked to be still there: a
caller that dies at any moment takes the process with it. (Handing a started bwrap its
cgroups through --block-fd left a window: bwrap takes EOF there for a release, so a
caller dying then let the command run unconfined.) Lowering one's own rlimits needs
no privilege, where prlimit on another process needs CAP_SYS_RESOURCE, which a root
inside a container often lacks.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
from collections.abc import Callable, Sequence

import attrs

__all__ = ["Limits", "Tools", "setup"]

Limits = list[tuple[int, tuple[int, int]]]  # (resource.RLIMIT_*, (soft, hard))

# As root, with the caller's environment never reaching a root shell (the program's
# own environment goes through bwrap's --setenv or env -i, after these).
_JOIN = (
    'adj=$1 n=$2; shift 2; while [ "$n" -gt 0 ]; do echo $$ >"$1" || exit 126; '
    'shift; n=$((n - 1)); done; [ "$adj" = - ] || echo "$adj" >/proc/self/oom_score_adj '
    '|| exit 126; exec "$@"'
)
# As the host user, after setpriv armed the parent-death signal: $PPID is read at
# start, so it is still the caller only if the caller outlived the arming.
_CHECK = '[ "$PPID" = "$1" ] || exit 126; shift; exec "$@"'
_PRLIMIT_NAMES = {
    resource.RLIMIT_NOFILE: "nofile",
    resource.RLIMIT_CORE: "core",
    resource.RLIMIT_NPROC: "nproc",
    resource.RLIMIT_AS: "as",
    resource.RLIMIT_CPU: "cpu",
    resource.RLIMIT_FSIZE: "fsize",
}


# Only the system's own: these run as root, so a PATH entry someone else may write to
# must not choose them.
_SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"


@attrs.frozen
class Tools:
    """util-linux's setpriv and prlimit, from the system's folders."""

    setpriv: str
    prlimit: str

    @classmethod
    def find(cls) -> Tools | None:
        setpriv = shutil.which("setpriv", path=_SYSTEM_PATH)
        prlimit = shutil.which("prlimit", path=_SYSTEM_PATH)
        return cls(setpriv, prlimit) if setpriv and prlimit else None

    def prefix(
        self,
        *,
        cgroup_procs: Sequence[str],
        run_as: tuple[int, int] | None,
        limits: Limits,
        oom_score_adj: int | None,
    ) -> list[str]:
        """The argv in front of a program, run with a clean environment, that does
        what ``setup`` does."""
        user = [] if run_as is None else [f"--reuid={run_as[0]}", f"--regid={run_as[1]}"]
        if run_as is not None:
            user.append("--clear-groups")
        rlimits = [f"--{_PRLIMIT_NAMES[kind]}={soft}:{hard}" for kind, (soft, hard) in limits]
        adj = "-" if oom_score_adj is None else str(oom_score_adj)
        return [
            *("/bin/sh", "-c", _JOIN, "sh", adj, str(len(cgroup_procs)), *cgroup_procs),
            *(self.setpriv, *user, "--pdeathsig=KILL", "--"),
            *("/bin/sh", "-c", _CHECK, "sh", str(os.getpid())),
            *(self.prlimit, *rlimits, "--"),
        ]


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
