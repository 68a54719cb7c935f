"""Long-lived sandboxes on the container engines, the process side (issue 15): execs fed
as they run, named execs signalled and resized, terminals, cancellation of a whole tree,
pause and resume, a lifetime moved by extend, and published ports.

At the backend level (``sb.backend``, ``sb.id``): the Sandbox-level API is built on it.
The test image is busybox (sh, httpd, setsid, stty, ps).
"""

from __future__ import annotations

import io
import signal
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable

import pytest

import corral
from corral.backends.containers import lifetimes
from corral.core.backend import Capability, ExecStatus
from corral.core.errors import CapabilityError, ConflictError, NotFoundError
from corral.core.output import InputFeed, OutputSink
from corral.core.spec import ExecRequest

# How long a poll waits for what it waits for before the test fails: never asserted
# as a duration, only a bound on a wait.
PATIENCE = 60.0


class Background:
    """A backend exec in a thread of its own, as corral's keeper runs one."""

    def __init__(self, sandbox: corral.Sandbox, argv: list[str], **request: object) -> None:
        self.sandbox = sandbox
        self.request = ExecRequest(argv, **{"timeout": 300, **request})  # type: ignore[arg-type]
        self.sink = OutputSink(1024 * 1024)
        self.result: ExecStatus | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.sandbox.backend.exec(self.sandbox.id, self.request, self.sink)
        except BaseException as e:  # handed to the test by join()
            self.error = e

    @property
    def out(self) -> bytes:
        return self.sink.value("stdout")

    def wait_for(self, text: bytes) -> bytes:
        """The output once it holds ``text`` (fails the test if it never does)."""
        until(lambda: text in self.out or not self.thread.is_alive(), f"output {text!r}")
        assert text in self.out, (self.out, self.sink.value("stderr"), self.result, self.error)
        return self.out

    def join(self) -> ExecStatus:
        self.thread.join(PATIENCE)
        assert not self.thread.is_alive(), "the exec did not end"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def run(sandbox: corral.Sandbox, script: str) -> tuple[int, str]:
    sink = OutputSink(1024 * 1024)
    status = sandbox.backend.exec(sandbox.id, ExecRequest(["sh", "-c", script], timeout=60), sink)
    return status.exit_code, (sink.value("stdout") + sink.value("stderr")).decode()


def processes(sandbox: corral.Sandbox) -> list[str]:
    """The command lines of the sandbox's processes."""
    code, out = run(sandbox, "ps -o args")
    assert code == 0, out
    return out.splitlines()[1:]


def cpu_seconds(sandbox: corral.Sandbox) -> float:
    used = sandbox.backend.usage(sandbox.id).cpu_seconds
    assert used is not None
    return used


def test_capabilities_declared(box) -> None:
    sb = box()
    caps = sb.backend.capabilities()
    wanted = Capability.PROCESSES | Capability.TTY | Capability.PAUSE | Capability.PORTS
    assert caps & wanted == wanted
    assert caps & Capability.EXTEND  # the suite's engines are on this host


def test_repl_fed_line_by_line(box) -> None:
    """Each line is answered before the next is written, by one process (its state
    carries over), and the end of the feed ends it."""
    sb = box()
    feed = InputFeed()
    repl = Background(sb, ["sh"], input=feed, name="repl")
    expected = b""
    for i in range(1, 6):
        assert repl.out == expected  # nothing answered ahead of its line
        assert feed.write(f"n=$(( ${{n:-0}} + {i} )); echo answer-$n\n".encode())
        expected += f"answer-{i * (i + 1) // 2}\n".encode()
        repl.wait_for(expected)
    assert repl.thread.is_alive()  # stdin still open: the REPL waits for more
    feed.close()
    status = repl.join()
    assert status.exit_code == 0 and not status.timed_out
    assert repl.out == expected


def test_input_end_of_file_reaches_a_reader(box) -> None:
    sb = box()
    feed = InputFeed()
    counter = Background(sb, ["wc", "-c"], input=feed, name="counter")
    for _ in range(3):
        assert feed.write(b"x" * 1000)
    feed.close()
    assert counter.join().exit_code == 0
    assert counter.out.strip() == b"3000"


def test_signal_reaches_the_command_not_the_shell_around_it(box) -> None:
    sb = box()
    # The command itself (no shell around it) dies of the signal.
    sleeper = Background(sb, ["sleep", "1000"], name="sleeper")
    until(lambda: "sleep 1000" in processes(sb), "sleep running")
    sb.backend.exec_signal(sb.id, "sleeper", signal.SIGTERM)
    status = sleeper.join()
    assert (status.exit_code, status.signal, status.timed_out) == (143, 15, False)

    # A shell that is the command takes it in its trap; its child, which traps it too
    # and writes a file if it ever gets it, does not get it. The command waits a
    # second before ending, long enough for a wrongly signalled child to write.
    script = (
        "sh -c 'trap \"echo got >> /tmp/child-got\" TERM; while :; do sleep 0.1; done' "
        ">/dev/null 2>&1 & "
        "trap 'echo parent-got; sleep 1; exit 7' TERM; echo ready; "
        "while :; do sleep 0.1; done"
    )
    parent = Background(sb, ["sh", "-c", script], name="parent")
    parent.wait_for(b"ready\n")
    sb.backend.exec_signal(sb.id, "parent", signal.SIGTERM)
    status = parent.join()
    assert status.exit_code == 7 and b"parent-got" in parent.out
    assert run(sb, "test -e /tmp/child-got || echo never-got") == (0, "never-got\n")
    # Its child ended with it (the exec owns its descendants).
    assert not [p for p in processes(sb) if "child-got" in p]


def test_signal_of_no_such_command(box) -> None:
    sb = box()
    with pytest.raises(NotFoundError, match="nobody"):
        sb.backend.exec_signal(sb.id, "nobody", signal.SIGTERM)
    done = Background(sb, ["true"], name="done")
    assert done.join().exit_code == 0
    with pytest.raises(NotFoundError):
        sb.backend.exec_signal(sb.id, "done", signal.SIGTERM)


def test_a_tty_exec_sees_a_terminal_and_its_size(box) -> None:
    sb = box()
    feed = InputFeed()
    shell = Background(sb, ["sh"], input=feed, name="term", tty=True)
    sb.backend.exec_resize(sb.id, "term", 33, 101)
    feed.write(b"test -t 0 && test -t 1 && echo is-a-tty; stty size; echo term=$TERM\n")
    shell.wait_for(b"33 101")
    assert b"is-a-tty" in shell.out and b"term=xterm-256color" in shell.out
    sb.backend.exec_resize(sb.id, "term", 40, 120)
    feed.write(b"stty size; echo to-stderr >&2\n")
    shell.wait_for(b"40 120")
    shell.wait_for(b"to-stderr")  # one stream: the terminal's
    feed.close()  # the terminal's end of file
    status = shell.join()
    assert status.exit_code == 0
    assert shell.sink.value("stderr") == b""

    # Without tty, no terminal, and nothing to resize.
    plain = Background(sb, ["sh", "-c", "test -t 0 || echo no-tty; sleep 1000"], name="plain")
    plain.wait_for(b"no-tty")
    with pytest.raises(ConflictError, match="no terminal"):
        sb.backend.exec_resize(sb.id, "plain", 10, 10)
    plain.sink.cancel()
    assert plain.join().timed_out


def sleeps(sandbox: corral.Sandbox) -> list[str]:
    return sorted(p.strip() for p in processes(sandbox) if p.startswith("sleep 100"))


def test_cancel_kills_the_whole_tree_with_a_setsid_escapee(box) -> None:
    sb = box()
    tree = Background(
        sb,
        ["sh", "-c", "setsid sleep 1001 & (sleep 1002 &); sleep 1003 & echo started; wait"],
        name="tree",
    )
    tree.wait_for(b"started")
    until(lambda: sleeps(sb) == ["sleep 1001", "sleep 1002", "sleep 1003"], "three sleeps")
    tree.sink.cancel()
    assert tree.join().timed_out
    assert sleeps(sb) == []


def test_pause_stops_the_cpu_clock_and_resume_continues(box) -> None:
    sb = box()
    busy = Background(
        sb, ["sh", "-c", "echo kept > /workspace/kept; echo spinning; while :; do :; done"]
    )
    busy.wait_for(b"spinning")
    start = cpu_seconds(sb)
    until(lambda: cpu_seconds(sb) > start + 0.3, "the loop using CPU")

    sb.backend.pause(sb.id)
    assert sb.backend.inspect(sb.id)[0].status == "paused"
    assert [i.status for i in sb.backend.list() if i.id == sb.id] == ["paused"]
    frozen = cpu_seconds(sb)
    time.sleep(1.0)  # a busy loop would use most of a CPU second meanwhile
    assert cpu_seconds(sb) - frozen < 0.05

    # What needs a running sandbox says it is paused, at once (never a hang).
    with pytest.raises(ConflictError, match="paused"):
        sb.backend.exec(sb.id, ExecRequest(["true"], timeout=30), OutputSink(1024))
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("new"), io.BytesIO(b""))
    archive.seek(0)
    with pytest.raises(ConflictError, match="paused"):
        sb.backend.put_archive(sb.id, "/workspace", archive)
    with pytest.raises(ConflictError, match="paused"):
        b"".join(sb.backend.get_archive(sb.id, "/workspace/kept"))

    sb.backend.resume(sb.id)
    assert sb.backend.inspect(sb.id)[0].status == "running"
    until(lambda: cpu_seconds(sb) > frozen + 0.3, "the loop using CPU again")
    assert busy.thread.is_alive()  # the same loop, not a new one
    assert run(sb, "cat /workspace/kept") == (0, "kept\n")
    busy.sink.cancel()
    assert busy.join().timed_out


def test_a_paused_sandbox_is_destroyed(box, engine: str, engine_client) -> None:
    sb = box(network="bridge")
    sb.backend.pause(sb.id)
    sb.close()
    assert sb.id not in {i.id for i in sb.backend.list()}
    assert engine_client.networks(filters={"label": f"corral.sandbox={sb.id}"}) == []


def test_gc_removes_an_expired_paused_sandbox(box, engine: str, engine_settings) -> None:
    sb = box(lifetime="5s")
    sb.backend.pause(sb.id)  # its own PID 1 timer is frozen: it cannot end by itself
    expires = sb.backend.inspect(sb.id)[0].expires
    # Just past the end (any gc, another program's too, may remove it from then on).
    until(lambda: time.time() > expires, "the lifetime's end")
    assert sb.backend.inspect(sb.id)[0].status == "paused"
    assert sb.id in corral.gc(backend=engine, settings=engine_settings)
    assert sb.id not in {i.id for i in sb.backend.list()}


def test_extend_moves_the_end(box, engine: str, engine_settings) -> None:
    sb = box(lifetime="4s")
    info = sb.backend.inspect(sb.id)[0]
    moved = info.expires + 120
    sb.backend.extend(sb.id, moved)
    assert sb.backend.inspect(sb.id)[0].expires == moved
    assert [i.expires for i in sb.backend.list() if i.id == sb.id] == [moved]
    # Past the first end: still alive (its own PID 1 slept on), and gc leaves it.
    until(lambda: time.time() > info.expires + 3, "the first end")
    assert run(sb, "echo alive") == (0, "alive\n")
    assert sb.id not in corral.gc(backend=engine, settings=engine_settings)
    # The sandbox cannot move its own end.
    code, out = run(sb, "echo 99999 > /.corral-lifetime/extra")
    assert code != 0 and "Read-only" in out
    assert sb.backend.inspect(sb.id)[0].expires == moved
    folder = lifetimes.root() / engine / sb.id
    assert folder.is_dir()
    sb.close()
    assert not folder.exists()


def test_the_movable_lifetimes_processes_rank_last_for_the_oom_killer(box) -> None:
    """PID 1 is a shell that runs the lifetime's sleep: both, not only PID 1's child,
    must outrank no exec for the OOM killer, or a memory bomb's second kill could end
    the sandbox."""
    sb = box()
    script = (
        "walk() { for c in $(cat /proc/$1/task/*/children); do "
        'echo "$(cat /proc/$c/oom_score_adj) $(cat /proc/$c/cmdline | tr "\\0" " ")"; '
        "walk $c; done; }; walk 1"
    )
    code, out = run(sb, script)
    assert code == 0, out
    lines = out.splitlines()
    assert any(" sleep " in f" {line} " for line in lines), lines  # the lifetime's sleep
    assert [line.split()[0] for line in lines] == ["0"] * len(lines), lines


def test_extend_of_a_sandbox_with_its_own_command(box) -> None:
    sb = box(command=["sleep", "1000"])
    with pytest.raises(CapabilityError, match=r"sandbox\.command"):
        sb.backend.extend(sb.id, time.time() + 3600)


def test_a_published_port_answers_on_the_hosts_loopback(box, engine_client) -> None:
    sb = box(network="bridge", ports=[8000])
    assert run(sb, "mkdir -p /workspace/www && echo hello > /workspace/www/index.html")[0] == 0
    server = Background(sb, ["httpd", "-f", "-p", "8000", "-h", "/workspace/www"], name="web")
    host, port = sb.backend.port(sb.id, 8000)
    assert host == "127.0.0.1"
    bindings = engine_client.inspect_container(f"corral-{sb.id}")["HostConfig"]["PortBindings"]
    assert [b["HostIp"] for b in bindings["8000/tcp"]] == ["127.0.0.1"]

    def answers() -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/index.html", timeout=5) as r:
                return bytes(r.read())
        except OSError:
            return None

    until(lambda: answers() == b"hello\n", "the server answering")
    assert run(sb, "echo beside") == (0, "beside\n")  # execs run beside it
    assert answers() == b"hello\n"
    with pytest.raises(NotFoundError, match="9000"):
        sb.backend.port(sb.id, 9000)
    server.sink.cancel()
    assert server.join().timed_out


def test_nothing_left_after_destroy(box, engine: str, engine_client) -> None:
    sb = box(network="bridge", ports=[8000])
    left = Background(sb, ["sleep", "1000"], name="left")
    until(lambda: "sleep 1000" in processes(sb), "sleep running")
    sb.close()
    left.thread.join(PATIENCE)
    assert not left.thread.is_alive()  # the exec ended with its sandbox
    assert engine_client.containers(all=True, filters={"label": f"corral.sandbox={sb.id}"}) == []
    assert engine_client.networks(filters={"label": f"corral.sandbox={sb.id}"}) == []
    mine = engine_client.volumes(filters={"label": f"corral.sandbox={sb.id}"})["Volumes"]
    assert not mine  # (the box fixture compares the engine's whole list, others' too)
    assert not (lifetimes.root() / engine / sb.id).exists()
