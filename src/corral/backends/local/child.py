"""How a sandbox's process gets into its cgroups, OOM rank, host user and limits, and
ties its life to its caller's, before bwrap (or an unisolated command) runs.

Three ways to the same outcome:

- ``Tools.prefix``: small programs run in front of bwrap (sh, then util-linux's setpriv
  and prlimit), so that Python starts it with vfork. Forking a large program to run a
  ``preexec_fn`` copies its page tables on every exec: 8 ms of the caller's CPU for an
  80 MB program here, against 0.8 ms, and the forks of many threads queue behind each
  other.
- ``Tools.gated_prefix``, for a bwrap that waits at ``GATE`` (below): no root shell,
  as the caller puts the waiting process in its cgroups from outside (``enter``).
  Each program run costs about 0.8 ms of CPU, which adds up when a hundred sandboxes
  start at once.
- ``setup``: a ``preexec_fn`` that does the same in the forked child, where setpriv or
  prlimit is missing.

Each way it all happens before bwrap runs, so bwrap and everything it starts are
inside the limits from their first instruction. The parent-death signal is armed
after the change of user (which clears it), then the caller is checked to be still
there: a caller that dies at any moment takes the process with it. (Handing a started
bwrap its cgroups through --block-fd left a window: bwrap takes EOF there for a
release, so a caller dying then let the command run unconfined.) Lowering one's own
rlimits needs no privilege, where prlimit on another process needs CAP_SYS_RESOURCE,
which a root inside a container often lacks; as the host user, a process cannot
raise its hard limits past the caller's either (``LocalBackend`` says so first).

bwrap's own --die-with-parent cannot carry that guarantee into the sandbox
(bubblewrap#633): its child arms the signal only once its setup is done, and never
checks that bwrap is still there, so a caller killed meanwhile leaves the child
waiting forever for bwrap, or running the command as an orphan. So a bwrap is started
as the init of a pid namespace of its own (``own_pid_namespace``): when that init dies,
the kernel kills every process bwrap made, at whatever stage. That init is the
caller's own child; it says "armed" on stderr once its parent-death signal is, and
runs bwrap only when the caller answers "go" on stdin. A caller still there to read
"armed" was there when the signal was armed, so none is lost. (Inside the namespace
``getppid()`` is 0: the caller's answer replaces the check of the parent.) Making a
pid namespace takes CAP_SYS_ADMIN; without it, bwrap's own program waits for "go"
instead (``bwrap.GATED``), which leaves bubblewrap's window open: ``corral doctor``
says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
from collections.abc import Callable, Iterator, Sequence

import attrs

__all__ = [
    "ARMED",
    "GATE",
    "Launch",
    "Limits",
    "Tools",
    "can_make_pid_namespaces",
    "enter",
    "own_pid_namespace",
    "setup",
]

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
# The same, for the init of a pid namespace of its own: the caller answers instead.
_GATE_SCRIPT = 'echo armed >&2; IFS= read -r go; [ "$go" = go ] || exit 126; exec "$@"'
GATE = ("/bin/sh", "-c", _GATE_SCRIPT, "sh")
# Limits every shell's ulimit sets in these units (counts, seconds), which spares
# prlimit's run in front of a gated bwrap; a core size only as 0 (blocks elsewhere).
_ULIMIT_FLAGS = {resource.RLIMIT_NOFILE: "n", resource.RLIMIT_CPU: "t", resource.RLIMIT_CORE: "c"}
ARMED = b"armed\n"
_PRLIMIT_NAMES = {
    resource.RLIMIT_NOFILE: "nofile",
    resource.RLIMIT_CORE: "core",
    resource.RLIMIT_NPROC: "nproc",
    resource.RLIMIT_AS: "as",
    resource.RLIMIT_CPU: "cpu",
    resource.RLIMIT_FSIZE: "fsize",
}


@attrs.frozen
class Launch:
    """How one sandbox process starts: ``prefix`` in front of its argv, or else its
    ``preexec_fn``; whether it is the init of a pid namespace of its own that waits at
    ``GATE`` (``gated``); and what its caller does for it then, given its pid
    (``enter``, or nothing)."""

    prefix: list[str]
    preexec_fn: Callable[[], None] | None
    gated: bool
    enter: Callable[[int], None] | None = None


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
        what ``setup`` does (without a gate)."""
        adj = "-" if oom_score_adj is None else str(oom_score_adj)
        return [
            *("/bin/sh", "-c", _JOIN, "sh", adj, str(len(cgroup_procs)), *cgroup_procs),
            *(self.setpriv, *_user_options(run_as), "--pdeathsig=KILL", "--"),
            *("/bin/sh", "-c", _CHECK, "sh", str(os.getpid())),
            *self._prlimit(limits),
        ]

    def gated_prefix(self, *, run_as: tuple[int, int] | None, limits: Limits) -> list[str]:
        """The argv in front of a bwrap that starts as the init of a pid namespace of
        its own (run with a clean environment): the user and the parent-death signal,
        then ``GATE`` with the limits (by the shell's ulimit where it can, else by
        prlimit after it). Its caller puts it in its cgroups and OOM rank while it
        waits (``enter``), which spares the root shell of ``prefix``."""
        setpriv = [self.setpriv, *_user_options(run_as), "--pdeathsig=KILL", "--"]
        ulimits = _ulimits(limits)
        if ulimits is None:
            return [*setpriv, *GATE, *self._prlimit(limits)]
        # A limit the shell cannot set ends it before "armed": the exec fails, plainly.
        script = " && ".join([*ulimits, "true"]) + " || exit 126; " + _GATE_SCRIPT
        return [*setpriv, "/bin/sh", "-c", script, "sh"]

    def _prlimit(self, limits: Limits) -> list[str]:
        rlimits = [f"--{_PRLIMIT_NAMES[kind]}={soft}:{hard}" for kind, (soft, hard) in limits]
        return [self.prlimit, *rlimits, "--"]


def _ulimits(limits: Limits) -> list[str] | None:
    """The shell's ulimit commands for ``limits``, or None where one is beyond them."""
    commands = []
    for kind, (soft, hard) in limits:
        flag = _ULIMIT_FLAGS.get(kind)
        if flag is None or (kind == resource.RLIMIT_CORE and hard != 0):
            return None
        # Soft first: a hard limit below the soft one in force is refused.
        commands += [f"ulimit -S -{flag} {int(soft)}", f"ulimit -H -{flag} {int(hard)}"]
    return commands


def _user_options(run_as: tuple[int, int] | None) -> list[str]:
    if run_as is None:
        return []
    return [f"--reuid={run_as[0]}", f"--regid={run_as[1]}", "--clear-groups"]


def enter(pid: int, *, cgroup_procs: Sequence[str], oom_score_adj: int | None) -> None:
    """From the caller, for its child waiting at ``GATE`` (after its change of user, so
    the OOM rank cannot be lowered back there): into the cgroups and the OOM rank,
    before it runs bwrap. OSError when the cgroups are gone. (The child sets its own
    limits: setting another user's takes CAP_SYS_RESOURCE, which a root in a container
    often lacks, as here.)"""
    me = str(pid).encode()
    for path in cgroup_procs:
        _write(os.fsencode(path), me)
    if oom_score_adj is not None:  # raising it needs no privilege
        _write(f"/proc/{pid}/oom_score_adj".encode(), str(oom_score_adj).encode())


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def setup(
    *,
    cgroup_procs: Sequence[str],
    run_as: tuple[int, int] | None,
    limits: Limits,
    oom_score_adj: int | None,
    gate: bool,
) -> Callable[[], None]:
    """A ``preexec_fn``: into the cgroups whose ``cgroup.procs`` files are given, then
    ``oom_score_adj`` (None leaves it; raising it needs no privilege), then user
    ``run_as`` (uid, gid; None stays), then ``limits``. With ``gate``, the program
    must start with ``GATE`` (which cannot wait here: Popen returns only once the
    child has run its program)."""
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
        # Last: a change of user clears it. exec keeps it (bwrap is not setuid).
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # With a gate (``GATE`` in front of the program), the caller answers instead.
        if not gate and os.getppid() != parent:  # the caller died before that
            os._exit(1)

    return in_the_child


def _write(path: bytes, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


_CLONE_NEWPID = 0x20000000


def can_make_pid_namespaces() -> bool:
    """Whether this program may make pid namespaces (CAP_SYS_ADMIN), by making one."""
    try:
        with own_pid_namespace():
            return True
    except OSError:
        return False


@contextlib.contextmanager
def own_pid_namespace() -> Iterator[None]:
    """The first process the calling thread starts meanwhile is the init of a new pid
    namespace (the thread's own setting, unshare(2): other threads are unaffected).
    Meanwhile the thread can start no thread (clone(2) refuses)."""
    home = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)  # to come back to
    try:
        if _libc.unshare(_CLONE_NEWPID) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWPID) failed")
        try:
            yield
        finally:
            if _libc.setns(home, _CLONE_NEWPID) != 0:  # else this thread could start nothing
                raise OSError(ctypes.get_errno(), "setns back to this program's pid namespace")
    finally:
        os.close(home)
