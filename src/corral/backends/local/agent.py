"""A local sandbox's agent: one shell that stays inside the sandbox's namespaces and
cgroups and forks each exec.

Starting bubblewrap costs 8 to 16 ms here (a mount namespace set up from scratch) and
joining each v1 cgroup hierarchy 1 to 2 ms (an RCU grace period per write). Through the
agent an exec costs two forks: bubblewrap runs once per sandbox and program, and what
the agent forks is born in the cgroups.

The host and the agent talk through the sandbox's run folder, which the sandbox sees
read-only at ``AGENT_DIR``: for each exec the host writes a script and makes FIFOs for
stdout, stderr, stdin and the exit status, then sends the exec's name on the agent's
stdin, a pipe only the host holds. The agent runs the script in the background, and
the script reports "started" and at the end the exit code on the status FIFO.

The agent runs as the sandbox's user, so the sandbox's code can signal, stop or fool it.
Nothing it says is trusted beyond what the command could do itself: a status it
garbles reads as "killed", an agent that stops answering is replaced, and killing an
exec never asks it: the exec's processes carry a marker (``sweep``) and die from the
host. The sandbox's processes die with the program that started its agent (child.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import shlex
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...core.backend import ExecStatus
from ...core.errors import InternalError
from ...core.output import InputFeed, OutputSink
from .. import sweep
from .bwrap import AGENT_DIR, GO, after_env
from .child import Launch
from .runner import await_start, feed_input, kill, popen, pump

# The agent itself: each line on its stdin names an exec, whose script runs in the
# background with the exec's marker in its environment (and so in its children's). It
# is started from a subshell that exits at once: the agent keeps no job table, which
# grew with every exec, and the script's parent is bwrap's init, which reaps it.
AGENT = (
    "exec >/dev/null 2>&1; while IFS= read -r name; do ( "
    f'{sweep.MARKER}="$name" /bin/sh "{AGENT_DIR}/$name.sh" </dev/null & ); done'
)
# What a sandbox with an agent holds between execs: bwrap, its init in the sandbox, sh.
AGENT_PROCESSES = 3
# First in each exec's script: its processes go before the agent's for the OOM killer.
_RANK_FIRST_FOR_OOM = (
    f"{{ echo {sweep.EXEC_OOM_SCORE_ADJ} >/proc/self/oom_score_adj; }} 2>/dev/null; "
)
START_WITHIN = 30.0  # seconds for the agent to start an exec before it counts as hung


def exec_script(
    name: str,
    argv: list[str],
    env: dict[str, str],
    workdir: str,
    stdin: bool,
    cputime: int | None,
) -> str:
    """The shell script of one exec, as the sandbox reads it."""
    at = f"{AGENT_DIR}/{name}"
    q = shlex.quote
    limit = f"ulimit -S -t {cputime} && ulimit -H -t {cputime + 1} || exit 1; " if cputime else ""
    assignments = " ".join(q(f"{k}={v}") for k, v in {**env, sweep.MARKER: name}.items())
    command = " ".join(q(a) for a in after_env(argv))
    source = f"{at}.in" if stdin else "/dev/null"
    # The status FIFO and output are opened first, so the host hears of every failure;
    # the command itself holds neither the status FIFO nor anything of the agent's.
    # env(1) gives the shell's exit codes: 127 not found, 126 not executable.
    return (
        f"{_RANK_FIRST_FOR_OOM}exec 9>{at}.status >{at}.out 2>{at}.err\n"
        "echo started >&9\n"
        f"( exec 9>&- <{source}; {limit}"
        f"cd -- {q(workdir)} 2>/dev/null || "
        f"{{ echo {q(f'corral: cannot enter the working folder {workdir}')} >&2; exit 1; }}; "
        f"exec /usr/bin/env -i -- {assignments} {command} )\n"
        'echo "$?" >&9\n'
    )


class _Spawner:
    """Starts agents from one thread that lives as long as the program. bwrap's
    --die-with-parent fires when the *thread* that forked it ends, and an exec may come
    from a short-lived worker thread, whose end would take the sandbox with it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], queue.SimpleQueue[Any]]]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def run(self, job: Callable[[], Any]) -> Any:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # also after a fork
                self._thread = threading.Thread(
                    target=self._serve, name="corral-local-agents", daemon=True
                )
                self._thread.start()
        answer: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._jobs.put((job, answer))
        ok, value = answer.get()
        if not ok:
            raise value
        return value

    def _serve(self) -> None:
        while True:
            job, answer = self._jobs.get()
            try:
                answer.put((True, job()))
            except BaseException as e:  # handed to the caller, raised in its thread
                answer.put((False, e))


_spawner = _Spawner()


class Agent:
    """One running agent of one sandbox, in this program."""

    def __init__(
        self,
        command_line: Callable[[int | None], list[str]],
        *,
        env: dict[str, str],
        launch: Launch,
        run_folder: str,
        owner: tuple[int, int] | None,
    ) -> None:
        """Start ``command_line(info_fd)``, ``launch.prefix`` then a bwrap whose command
        must be AGENT, in the sandbox's cgroups and user (see child.py). When
        ``launch.gated``, it starts as the init of a pid namespace of its own, says
        "armed" and waits for "go" (``info_fd`` is None); else bwrap reports its child
        on ``info_fd`` and its program must wait for "go"."""
        self._run = run_folder
        self._owner = owner
        self._lock = threading.Lock()
        self._running = 0  # execs of this program in flight
        self._machine: set[int] | None = None
        info_r, info_w = (None, None) if launch.gated else os.pipe()
        requests, self._requests = os.pipe()
        argv = command_line(info_w)
        try:
            self.popen: subprocess.Popen[bytes] = _spawner.run(
                lambda: popen(
                    argv,
                    own_pid_namespace=launch.gated,
                    stdin=requests,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,  # the launch's report, and bwrap's complaints
                    env=env,
                    pass_fds=() if info_w is None else (info_w,),
                    preexec_fn=launch.preexec_fn,
                )
            )
        except BaseException:
            for fd in (info_r, self._requests):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in (requests, info_w):
                if fd is not None:
                    os.close(fd)  # the child's ends
        try:
            self.init_pid = await_start(self.popen, info_r, launch.enter)
            os.write(self._requests, GO)
        except BaseException:
            os.close(self._requests)
            self.popen.stderr.close()
            raise

    def alive(self) -> bool:
        return self._requests >= 0 and self.popen.poll() is None

    def stop(self) -> None:
        """End the agent and with it every process of the sandbox it holds."""
        with self._lock:
            if self._requests < 0:
                return
            kill(self.popen, self.init_pid)
            os.close(self._requests)
            self._requests = -1
            if self.popen.stderr is not None:
                self.popen.stderr.close()

    def _send(self, name: str) -> None:
        with self._lock:  # never write to an fd number a stop has closed (and reused)
            if self._requests < 0:
                raise AgentGone("the sandbox's agent was stopped")
            try:
                os.write(self._requests, f"{name}\n".encode())
            except OSError as e:  # EPIPE: it died
                raise AgentGone(f"the sandbox's agent is gone: {e}") from None

    def pids(self) -> list[int]:
        """The processes of this agent's pid namespace: bwrap's init and its
        descendants, which include every orphan (the namespace's init adopts them).
        Not the cgroup's: another program's agent for the sandbox shares that."""
        found, todo = [], [self.init_pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += sweep.children(pid)
        return found

    def _machinery(self) -> set[int]:
        """Host pids of the inits of the pid namespaces (bwrap's own, and bwrap in its
        own: child.py) and of the agent (pid 2 in the sandbox's)."""
        if self._machine is None:
            inner = {pid: _innermost_pid(pid) for pid in self.pids()}
            found = {pid for pid, inside in inner.items() if inside in (1, 2)}
            if 2 not in inner.values():  # not started yet: look again next time
                return found | {self.init_pid}
            self._machine = found
        return self._machine

    def kill_exec(self, name: str) -> None:
        """Kill one exec's processes: those carrying its marker, and when no other exec
        of this program runs in the sandbox, every process but the agent's own (so also
        one that cleared its environment)."""
        with self._lock:  # no exec starts during the sweep that could take it for strays
            if self._running <= 1:
                sweep.kill_marked(self.pids, None, spare=self._machinery())
                return
        sweep.kill_marked(self.pids, name, spare=self._machinery())

    def script_shell(self, name: str) -> int | None:
        """The host pid of the shell running exec ``name``'s script, whose one child
        is (or is about to be) the command; None once it ended."""
        script = ("/bin/sh", f"{AGENT_DIR}/{name}.sh")
        marker = f"{sweep.MARKER}={name}".encode()
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if tuple(os.fsdecode(p) for p in f.read().split(b"\0")[:-1]) != script:
                        continue
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        return pid
            except OSError:
                continue
        return None

    def exec(
        self,
        argv: list[str],
        env: dict[str, str],
        workdir: str,
        stdin: bytes | None,
        cputime: int | None,
        sink: OutputSink,
        timeout: float | None,
        name: str | None = None,
        feed: InputFeed | None = None,
    ) -> ExecStatus:
        """Run one command through the agent. ``AgentGone`` means the command did not
        run: the agent was not there to take it, or did not start it in time. ``name``
        is the exec's marker and the name of its files (unique among the sandbox's
        running execs); ``feed``, standard input as it comes, after ``stdin``."""
        name = name or uuid.uuid4().hex
        has_stdin = stdin is not None or feed is not None
        script = exec_script(name, argv, env, workdir, has_stdin, cputime)
        try:
            files = _ExecFiles(self._run, name, self._owner, has_stdin, script)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoRoom(str(e)) from e
            raise
        finished = threading.Event()
        feeder = None
        try:
            end = _ExecEnd(self, files, name)
            with self._lock:
                self._running += 1
            try:
                self._send(name)
                if has_stdin:
                    feeder = _start_feeder(f"{files.base}.in", stdin, feed, finished)
                pipes = {files.fds["out"]: "stdout", files.fds["err"]: "stderr"}
                stopped = pump(sink, pipes, end, timeout)
            finally:
                with self._lock:
                    self._running -= 1
        finally:
            finished.set()
            if feeder is not None:
                feeder.join(timeout=5)
            files.remove()
        code = end.exit_code()
        return ExecStatus(
            exit_code=code, timed_out=stopped, signal=code - 128 if code > 128 else None
        )


def _innermost_pid(pid: int) -> int | None:
    """A host process's pid in its own pid namespace."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(status.split("NSpid:")[1].split("\n")[0].split()[-1])


class AgentGone(InternalError):
    """The agent could not take an exec: it died, or it stopped answering."""


class NoRoom(Exception):
    """The run folder, on the sandbox's capped disk, is full: an exec's files do not
    fit (a bwrap of its own needs none)."""


class _ExecFiles:
    """One exec's script and FIFOs in the run folder, the host's ends open."""

    def __init__(
        self, run: str, name: str, owner: tuple[int, int] | None, stdin: bool, script: str
    ) -> None:
        self.base = os.path.join(run, name)
        self.fds: dict[str, int] = {}
        self._owner = owner
        self._made: list[str] = []
        try:
            for kind in ("status", "out", "err", *(("in",) if stdin else ())):
                path = self._make(f"{self.base}.{kind}", fifo=True)
                if kind != "in":  # read ends open at once; the writer may come later
                    self.fds[kind] = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            path = self._make(f"{self.base}.sh", fifo=False)
            with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(script)
        except BaseException:
            self.remove()
            raise

    def _make(self, path: str, fifo: bool) -> str:
        # Only the sandbox's user may open them: a script holds the exec's environment.
        if fifo:
            os.mkfifo(path, 0o600)
        else:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        self._made.append(path)
        if self._owner is not None:
            os.chown(path, *self._owner)
        return path

    def unlink_script(self) -> None:
        """A script not started yet never will be."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.base}.sh")

    def hang_up(self) -> None:
        """End the output FIFOs for the host's reader: open a writer and close it."""
        for kind in ("out", "err"):
            with contextlib.suppress(OSError):
                os.close(os.open(f"{self.base}.{kind}", os.O_WRONLY | os.O_NONBLOCK))

    def remove(self) -> None:
        # Unlinked before the read ends close: a script opening a FIFO for writing
        # after that finds nothing, instead of waiting forever for a reader.
        for path in self._made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._made.clear()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class _ExecEnd:
    """``pump``'s view of one exec through the agent: the status FIFO says "started"
    and then the exit code; its end without a code means the command was killed."""

    def __init__(self, agent: Agent, files: _ExecFiles, name: str) -> None:
        self._agent = agent
        self._files = files
        self._name = name
        self._status = b""
        self._started = False
        self._start_by = time.monotonic() + START_WITHIN
        self._abandoned = False
        self.fd = files.fds["status"]

    def readable(self) -> bool:
        try:
            chunk = os.read(self.fd, 64)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        self._status = (self._status + chunk)[:64]  # a flood from the sandbox is not kept
        self._started = self._status.startswith(b"started\n")
        return not chunk

    def ended(self) -> bool:
        if self._abandoned or self._started:
            return self._abandoned
        if not self._agent.alive() or time.monotonic() > self._start_by:
            self.readable()  # what the poll has not passed on yet: it may have started
            if self._started:
                return False
            self.stop()
            raise AgentGone("the sandbox's agent did not start the command")
        return False

    def stop(self) -> None:
        self._files.unlink_script()
        self._agent.kill_exec(self._name)
        if not self._started:
            # Not started: the agent is stopped, hung or dead, whatever the sandbox did
            # to it. Stop it (the next exec gets a new one), and with nothing left to
            # write the FIFOs, hang them up so the output ends at once.
            self._abandoned = True
            self._agent.stop()
            self._files.hang_up()

    def leftovers(self) -> None:
        # An exec owns its descendants: whatever it left running dies with it.
        self._agent.kill_exec(self._name)

    def exit_code(self) -> int:
        lines = self._status.split(b"\n")
        with contextlib.suppress(ValueError, IndexError):
            if lines[0] == b"started" and 0 <= int(lines[1]) <= 255:
                return int(lines[1])
        return 137  # killed before it could report: by a stop, an OOM kill, the agent's end


def _start_feeder(
    path: str, data: bytes | None, feed: InputFeed | None, finished: threading.Event
) -> threading.Thread:
    """Write stdin (``data``, then what ``feed`` brings) once the command opens its
    FIFO (an open would block until then); its end closes the FIFO."""

    def run() -> None:
        fd = -1
        while fd < 0 and not finished.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:  # ENXIO: no reader yet
                finished.wait(0.002)
        if fd >= 0:
            feed_input(fd, data, feed, finished)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
