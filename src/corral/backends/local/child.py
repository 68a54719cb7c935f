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

bwrap's own --die-with-parent cannot carry that guarantee into the sandbox
(bubblewrap#633): its child arms the signal only once its setup is done, and never
checks that bwrap is still there, so a caller killed meanwhile leaves the child
waiting forever for bwrap, or running the command as an orphan. So before a bwrap,
``Tools.prefix`` puts util-linux's unshare, which starts bwrap as the init of a pid
namespace of its own: when that init dies, the kernel kills every process bwrap made.
The init tells the caller its host pid (one line on stderr) once its parent-death
signal is armed, and runs bwrap only when the caller answers "go" on stdin; the
caller answers only if unshare is still alive then, which proves the init armed it
while its parent was unshare, itself tied to the caller. Without util-linux
(``setup``), bwrap's program waits for "go" instead (``bwrap.GATED``), which leaves
bubblewrap's window open: ``corral doctor`` says so.
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
# After setpriv armed the parent-death signal: $PPID is read at start, so it is still
# the caller only if the caller outlived the arming.
_CHECK = '[ "$PPID" = "$1" ] || exit 126; shift; exec "$@"'
# The init of a sandbox's pid namespace, as the host user, once its parent-death signal
# is armed: its host pid for the caller (/proc is the host's here), then the caller's go.
_GATE = (
    'read -r pid _ </proc/self/stat || exit 126; echo "$pid" >&2; '
    'IFS= read -r go; [ "$go" = go ] || exit 126; exec "$@"'
)
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
    """util-linux's setpriv, prlimit and unshare, from the system's folders."""

    setpriv: str
    prlimit: str
    unshare: str

    @classmethod
    def find(cls) -> Tools | None:
        names = ("setpriv", "prlimit", "unshare")
        found = [shutil.which(name, path=_SYSTEM_PATH) for name in names]
        return None if None in found else cls(*found)  # type: ignore[arg-type]

    def prefix(
        self,
        *,
        cgroup_procs: Sequence[str],
        run_as: tuple[int, int] | None,
        limits: Limits,
        oom_score_adj: int | None,
        bwrap: bool,
    ) -> list[str]:
        """The argv in front of a program, run with a clean environment, that does
        what ``setup`` does; in front of a ``bwrap``, one that also gives it a pid
        namespace of its own, reports and waits for "go" (see above)."""
        user = [] if run_as is None else [f"--reuid={run_as[0]}", f"--regid={run_as[1]}"]
        if run_as is not None:
            user.append("--clear-groups")
        rlimits = [f"--{_PRLIMIT_NAMES[kind]}={soft}:{hard}" for kind, (soft, hard) in limits]
        adj = "-" if oom_score_adj is None else str(oom_score_adj)
        join = ("/bin/sh", "-c", _JOIN, "sh", adj, str(len(cgroup_procs)), *cgroup_procs)
        check = ("/bin/sh", "-c", _CHECK, "sh", str(os.getpid()))
        prlimit = (self.prlimit, *rlimits, "--")
        if not bwrap:
            return [*join, self.setpriv, *user, "--pdeathsig=KILL", "--", *check, *prlimit]
        # A user namespace of its own lets a caller that is not root make the pid one.
        own_user = [] if os.geteuid() == 0 else ["--user", "--map-current-user"]
        return [
            *join,
            *(self.setpriv, "--pdeathsig=KILL", "--", *check),
            *(self.unshare, *own_user, "--pid", "--kill-child=KILL", "--"),
            *(self.setpriv, *user, "--pdeathsig=KILL", "--"),
            *("/bin/sh", "-c", _GATE, "sh"),
            *prlimit,
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
