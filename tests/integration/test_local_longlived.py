"""The local backend's long-lived sandboxes (issue 15), at the backend level: execs fed
as they run and signalled by name, terminals, pause and resume, extend, snapshots and
changes, on real processes under bubblewrap and the cgroup freezer."""

from __future__ import annotations

import os
import signal
import tarfile
import threading
import time
import uuid
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import psutil
import pytest

import corral
from corral.backends.local import LocalBackend, LocalSettings
from corral.core.convert import structure
from corral.core.output import InputFeed, OutputSink
from corral.core.results import Change
from corral.core.spec import ExecRequest

pytestmark = pytest.mark.local

UNSAFE_LOCAL = corral.Security(isolate=False, allow_unsafe=("isolate",))
WAIT = 30.0  # the most any awaited output may take; never asserted on


class Running:
    """A backend exec running in a thread, as the keeper runs a spawned process."""

    def __init__(self, sb: corral.Sandbox, request: ExecRequest) -> None:
        self.sink = OutputSink(1 << 20)
        self.status = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.status = sb.backend.exec(sb.id, request, self.sink)
            except BaseException as e:
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    @property
    def output(self) -> bytes:
        return self.sink.value("stdout")

    def wait_for(self, text: bytes) -> None:
        deadline = time.monotonic() + WAIT
        while text not in self.output:
            assert self.thread.is_alive() or text in self.output, (self.output, self.error)
            assert time.monotonic() < deadline, f"no {text!r} in {self.output!r}"
            time.sleep(0.01)

    def end(self):
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the exec did not end"
        if self.error is not None:
            raise self.error
        return self.status


def start(sb: corral.Sandbox, argv: list[str], **fields: object) -> Running:
    fields.setdefault("timeout", 120)
    return Running(sb, ExecRequest(argv=argv, **fields))


def name() -> str:
    return f"p-{uuid.uuid4().hex[:12]}"


def _token() -> str:
    return str(uuid.uuid4().int % 10**6).zfill(6)  # digits: sleep's argument


def _sleeps(token: str) -> list[psutil.Process]:
    """The host's ``sleep`` processes whose argument starts with ``token``."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if cmdline[:1] == ["sleep"] and cmdline[1:2] and cmdline[1].startswith(token):
            found.append(p)
    return found


def _eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture(params=["own-bwrap", "agent", "unisolated"])
def route(request: pytest.FixtureRequest, make) -> Callable[[], corral.Sandbox]:
    """A sandbox whose next exec runs one of the local backend's three ways: a bwrap of
    its own (a sandbox's first exec), through the sandbox's agent (the others), or
    without isolation."""

    def _make() -> corral.Sandbox:
        if request.param == "unisolated":
            return make(security=UNSAFE_LOCAL)
        sb = make()
        if request.param == "agent":
            sb.exec(["true"])
        return sb

    return _make


# -- processes: input as it comes, names, signals --------------------------------------


def test_a_shell_is_fed_line_by_line_and_keeps_its_state(route):
    sb = route()
    feed = InputFeed()
    repl = start(sb, ["sh"], name=name(), input=feed)
    feed.write(b"x=6; echo first-$x\n")
    repl.wait_for(b"first-6")
    assert repl.thread.is_alive()  # waiting for the next line, not ended by the first
    feed.write(b"echo second-$((x * 7))\n")
    repl.wait_for(b"second-42")
    feed.write(b"exit 5\n")
    feed.close()
    status = repl.end()
    assert status.exit_code == 5
    assert repl.output == b"first-6\nsecond-42\n"


def test_a_python_repl_answers_each_line(make):
    sb = make()
    sb.exec(["true"])
    feed = InputFeed()
    repl = start(sb, ["python3", "-i", "-u", "-q"], name=name(), input=feed)
    feed.write(b"n = 20\n")
    feed.write(b"print('n is', n + 22)\n")
    repl.wait_for(b"n is 42")
    feed.close()  # end of file ends the REPL
    assert repl.end().exit_code == 0


def test_the_end_of_input_closes_the_commands_stdin(route):
    sb = route()
    feed = InputFeed()
    counting = start(sb, ["wc", "-c"], name=name(), input=feed)
    feed.write(b"12345")
    feed.write(b"678")
    feed.close()
    assert counting.end().exit_code == 0
    assert counting.output.strip() == b"8"


SIGNALLED = "trap 'echo got-usr1; exit 7' USR1; echo ready; while :; do sleep 0.05; done"


def test_a_signal_reaches_the_command_not_the_shell_around_it(route):
    sb = route()
    process = name()
    running = start(sb, ["sh", "-c", SIGNALLED], name=process)
    running.wait_for(b"ready\n")
    sb.backend.exec_signal(sb.id, process, signal.SIGUSR1)
    status = running.end()
    # The command's own trap ran (a shell around it would have died of the signal,
    # reported as a kill, and a child of it would have left the loop running).
    assert b"got-usr1" in running.output
    assert status.exit_code == 7


def test_a_signal_reaches_only_the_exec_it_names(make):
    sb = make()
    sb.exec(["true"])
    one, other = name(), name()
    first = start(sb, ["sh", "-c", SIGNALLED], name=one)
    second = start(sb, ["sh", "-c", SIGNALLED], name=other)
    first.wait_for(b"ready")
    second.wait_for(b"ready")
    sb.backend.exec_signal(sb.id, one, signal.SIGUSR1)
    assert first.end().exit_code == 7
    assert second.thread.is_alive() and b"got" not in second.output
    sb.backend.exec_signal(sb.id, other, signal.SIGKILL)
    assert second.end().exit_code == 137
    with pytest.raises(corral.NotFoundError):
        sb.backend.exec_signal(sb.id, one, signal.SIGTERM)  # it ended


def test_two_running_execs_cannot_share_a_name(make):
    sb = make()
    process = name()
    running = start(sb, ["sleep", "60"], name=process)
    _eventually(lambda: (sb.id, process) in sb.backend._named, "the exec never registered")
    with pytest.raises(corral.ConflictError):
        sb.backend.exec(sb.id, ExecRequest(argv=["true"], name=process), OutputSink(1024))
    sb.backend.exec_signal(sb.id, process, signal.SIGTERM)
    assert running.end().exit_code == 143


@pytest.mark.parametrize("how", ["own-bwrap", "agent", "tty"])
def test_cancelling_kills_the_whole_tree_setsid_escapees_included(make, how):
    sb = make()
    if how != "own-bwrap":
        sb.exec(["true"])
    token = _token()
    script = (
        f"sleep 2{token}1 & setsid sleep 2{token}2 & (sleep 2{token}3 &); "
        f"echo ready; sleep 2{token}4"
    )
    running = start(sb, ["sh", "-c", script], name=name(), input=InputFeed(), tty=how == "tty")
    running.wait_for(b"ready")
    _eventually(lambda: len(_sleeps(f"2{token}")) == 4, "the sleeps did not all start")
    running.sink.cancel()
    assert running.end().timed_out
    assert _sleeps(f"2{token}") == []
    assert sb.exec(["echo", "still-here"]).text == "still-here\n"


# -- terminals -----------------------------------------------------------------------------

ON_A_TERMINAL = (
    "test -t 0 && test -t 1 && test -t 2 && echo is-a-tty; echo term=$TERM; "
    "stty size; IFS= read -r line; stty size; echo bye"
)


@pytest.mark.parametrize("isolated", [True, False])
def test_a_tty_exec_sees_a_terminal_and_its_size_after_a_resize(make, isolated):
    sb = make() if isolated else make(security=UNSAFE_LOCAL)
    sb.exec(["true"])  # a terminal's exec has a bwrap of its own, agent or not
    feed = InputFeed()
    process = name()
    running = start(sb, ["sh", "-c", ON_A_TERMINAL], name=process, tty=True, input=feed)
    running.wait_for(b"24 80")  # the size a terminal starts with
    sb.backend.exec_resize(sb.id, process, 40, 132)
    feed.write(b"go\n")
    running.wait_for(b"bye")
    status = running.end()
    assert status.exit_code == 0
    text = running.output.replace(b"\r\n", b"\n")
    assert b"is-a-tty\n" in text
    assert b"term=xterm-256color\n" in text
    assert b"40 132\n" in text
    assert running.sink.value("stderr") == b""  # one stream, as on a terminal


@pytest.mark.parametrize("launch", ["util-linux", "preexec_fn", "no-pid-namespaces"])
def test_ctrl_c_on_a_terminal_interrupts_the_command(make, monkeypatch, launch):
    sb = make()
    # Each way a sandbox's bwrap starts (child.py): the terminal is the command's alone.
    if launch == "preexec_fn":
        monkeypatch.setattr(sb.backend, "_tools", None)
    elif launch == "no-pid-namespaces":
        monkeypatch.setattr(sb.backend, "_pid_namespaces", False)
    feed = InputFeed()
    script = "trap 'echo interrupted; exit 3' INT; echo ready; while :; do sleep 0.05; done"
    running = start(sb, ["sh", "-c", script], name=name(), tty=True, input=feed)
    running.wait_for(b"ready")
    feed.write(b"\x03")  # the terminal's line discipline signals its foreground group
    assert running.end().exit_code == 3
    assert b"interrupted" in running.output


def test_a_signal_and_a_resize_reach_a_python_program_on_a_terminal(make):
    sb = make()
    program = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGWINCH, lambda *a: print('size', *os.get_terminal_size()))\n"
        "signal.signal(signal.SIGUSR2, lambda *a: sys.exit(9))\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.05)\n"
    )
    process = name()
    running = start(sb, ["python3", "-u", "-c", program], name=process, tty=True)
    running.wait_for(b"ready")
    sb.backend.exec_resize(sb.id, process, 33, 101)
    running.wait_for(b"size 101 33")
    sb.backend.exec_signal(sb.id, process, signal.SIGUSR2)
    assert running.end().exit_code == 9


def test_resizing_an_exec_without_a_terminal_is_refused(make):
    sb = make()
    process = name()
    running = start(sb, ["sleep", "60"], name=process)
    _eventually(lambda: (sb.id, process) in sb.backend._named, "the exec never registered")
    with pytest.raises(corral.ConflictError):
        sb.backend.exec_resize(sb.id, process, 10, 10)
    running.sink.cancel()
    running.end()


# -- pause and resume ----------------------------------------------------------------------


def _cpu(sb: corral.Sandbox) -> float:
    cpu = sb.backend.usage(sb.id).cpu_seconds
    assert cpu is not None
    return cpu


def _tar_of(name: str, data: bytes) -> BytesIO:
    buffer = BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, BytesIO(data))
    buffer.seek(0)
    return buffer


def test_pause_stops_the_cpu_clock_and_resume_continues_with_files_intact(make):
    sb = make()
    backend = sb.backend
    assert backend.capabilities() & corral.Capability.PAUSE
    sb.write_file("/workspace/kept", b"before the pause")
    busy = start(sb, ["sh", "-c", "echo spinning; while :; do :; done"], name=name())
    busy.wait_for(b"spinning")
    start_cpu = _cpu(sb)
    _eventually(lambda: _cpu(sb) > start_cpu + 0.2, "the busy loop used no CPU")

    backend.pause(sb.id)
    assert backend.inspect(sb.id)[0].status == "paused"
    assert [i.status for i in backend.list() if i.id == sb.id] == ["paused"]
    paused_at = _cpu(sb)
    time.sleep(0.5)  # a busy loop running meanwhile would use about that much CPU
    assert _cpu(sb) - paused_at < 0.05
    assert busy.thread.is_alive()  # frozen, not killed

    with pytest.raises(corral.ConflictError, match="paused"):
        backend.exec(sb.id, ExecRequest(argv=["true"]), OutputSink(1024))
    with pytest.raises(corral.ConflictError, match="paused"):
        backend.put_archive(sb.id, "/workspace", _tar_of("x", b"x"))
    with pytest.raises(corral.ConflictError, match="paused"):
        list(backend.get_archive(sb.id, "/workspace/kept"))
    assert backend.usage(sb.id).pids  # usage still answers

    backend.resume(sb.id)
    backend.resume(sb.id)  # resuming a running sandbox does nothing
    assert backend.inspect(sb.id)[0].status == "running"
    resumed_at = _cpu(sb)
    _eventually(lambda: _cpu(sb) > resumed_at + 0.2, "the loop did not continue")
    assert sb.read_file("/workspace/kept") == b"before the pause"
    busy.sink.cancel()
    assert busy.end().timed_out


def test_a_paused_sandbox_is_destroyed_whole(make, state_dir):
    sb = make()
    sb.exec(["true"])  # the sleep runs through the sandbox's agent, frozen with it
    token = f"3{_token()}"
    sleeper = start(sb, ["sleep", token], name=name())
    _eventually(lambda: bool(_sleeps(token)), "the sleep never started")
    sb.backend.pause(sb.id)
    sb.close()  # the fixture proves no folder and no cgroup is left
    assert sleeper.end().exit_code == 137
    assert _sleeps(token) == []
    assert not (state_dir / "local" / sb.id).exists()
    assert not Path(f"/sys/fs/cgroup/unified/corral/corral-{sb.id}").exists()


def test_the_sweep_removes_an_expired_paused_sandbox(make, state_dir):
    sb = make()
    sb.exec(["true"])
    sb.backend.pause(sb.id)
    sb.backend.extend(sb.id, time.time() - 1)  # its lifetime is over
    sb.backend._sweep_expired_now()
    assert not (state_dir / "local" / sb.id).exists()
    with pytest.raises(corral.NotFoundError):
        sb.backend.inspect(sb.id)


# -- extend --------------------------------------------------------------------------------


def _another_program(settings: corral.Settings) -> LocalBackend:
    """A second backend instance: what another program (corral.attach) sees."""
    return LocalBackend(structure(settings.backends["local"], LocalSettings))


def test_extend_is_reported_everywhere_and_honoured_by_every_sweep(make, settings):
    sb = make()
    backend, other = sb.backend, _another_program(settings)
    later = time.time() + 7200.5
    other.inspect(sb.id)  # it knows the old end
    backend.extend(sb.id, later)
    for seen in (backend, other):
        info = seen.inspect(sb.id)[0]
        assert info.expires >= later and info.expires < later + 1
        assert info.labels["corral.expires"] == str(int(info.expires))
        assert [i.expires for i in seen.list() if i.id == sb.id] == [info.expires]
    # One program sees it expired, then another extends it: the first one's sweep
    # reads the new end before removing anything.
    backend.extend(sb.id, time.time() - 5)
    assert backend.inspect(sb.id)[0].expires < time.time()
    other.extend(sb.id, later)
    backend._sweep_expired_now()
    assert backend.inspect(sb.id)[0].expires >= later
    assert sb.exec(["echo", "alive"]).text == "alive\n"


def test_the_metadata_and_the_baseline_are_out_of_the_sandboxs_reach(make, state_dir):
    sb = make()
    folder = state_dir / "local" / sb.id
    meta, baseline = (folder / "meta.json").read_bytes(), (folder / "changes.json").read_bytes()
    probe = sb.exec(
        [
            "sh",
            "-c",
            f"ls -a /run/corral; test -e {folder}/meta.json && echo SEEN; "
            f"echo '{{}}' > {folder}/meta.json || echo cannot-write; "
            f"echo '{{}}' > {folder}/changes.json",
        ]
    )
    assert "SEEN" not in probe.text and "cannot-write" in probe.text
    assert "meta.json" not in probe.text and "changes.json" not in probe.text
    assert (folder / "meta.json").read_bytes() == meta
    assert (folder / "changes.json").read_bytes() == baseline


# -- snapshots -----------------------------------------------------------------------------


def _snapshot(sb: corral.Sandbox, labels: dict[str, str] | None = None):
    snapshot_id = uuid.uuid4().hex[:16]
    labels = {
        "corral.managed": "true",
        "corral.snapshot": snapshot_id,
        "corral.sandbox": sb.id,
        "corral.expires": str(int(time.time() + 3600)),
        **(labels or {}),
    }
    return sb.backend.snapshot(sb.id, snapshot_id, labels, False)


def test_a_snapshot_forked_three_times_gives_three_independent_sandboxes(make, state_dir):
    sb = make()
    sb.exec(
        [
            "sh",
            "-c",
            "mkdir -p /workspace/project/src && echo v1 > /workspace/project/src/main.txt && "
            "echo scratch > /tmp/scratch && chmod 640 /workspace/project/src/main.txt && "
            "ln -s src/main.txt /workspace/project/link && "
            "truncate -s 1G /workspace/sparse && mkfifo /workspace/fifo && "
            "echo locked > /workspace/locked && chmod 4000 /workspace/locked",
        ]
    )
    snap = _snapshot(sb, {"team": "blue"})
    assert snap.image == f"corral-snapshot:{snap.id}"
    assert [(s.id, s.labels["team"]) for s in sb.backend.snapshots()] == [(snap.id, "blue")]
    assert snap.size is not None and snap.size < 1024 * 1024  # the sparse file's holes stay holes

    forks = [make(image=snap.image) for _ in range(3)]
    for index, fork in enumerate(forks):
        out = fork.exec(
            [
                "sh",
                "-c",
                "cat /workspace/project/link /tmp/scratch; stat -c '%a %U' "
                "/workspace/project/src/main.txt; stat -c %s /workspace/sparse; "
                "test -e /workspace/fifo || echo no-fifo; stat -c %a /workspace/locked",
            ]
        ).text
        # Special files are left out, and set-id bits dropped (a mode of 0 is kept).
        assert out == "v1\nscratch\n640 sandbox\n1073741824\nno-fifo\n0\n"
        fork.exec(["sh", "-c", f"echo fork{index} > /workspace/project/src/main.txt"])
    for index, fork in enumerate(forks):
        assert fork.read_file("/workspace/project/src/main.txt") == f"fork{index}\n".encode()
    assert sb.read_file("/workspace/project/src/main.txt") == b"v1\n"

    sb.backend.remove_snapshot(snap.id)
    sb.backend.remove_snapshot(snap.id)  # gone already is fine
    assert sb.backend.snapshots() == []
    assert os.listdir(state_dir / "local-snapshots") == []
    with pytest.raises(corral.NotFoundError):
        make(image=snap.image)


def test_a_memory_snapshot_is_refused_before_anything(make, state_dir):
    sb = make()
    with pytest.raises(corral.CapabilityError):
        sb.backend.snapshot(sb.id, "x1", {"corral.expires": "0"}, True)
    assert not (state_dir / "local-snapshots").exists() or not os.listdir(
        state_dir / "local-snapshots"
    )


def test_a_snapshot_of_a_link_to_a_host_file_copies_the_link_and_leaks_nothing(
    make, shared_tmp, state_dir
):
    canary = uuid.uuid4().hex.encode()
    host_file = shared_tmp / "canary"
    host_file.write_bytes(canary)
    os.chmod(host_file, 0o644)
    sb = make()
    sb.exec(
        [
            "sh",
            "-c",
            f"ln -s {host_file} /workspace/to-host && ln -s /etc/shadow /tmp/shadow && "
            f"mkdir /workspace/d && ln -s {shared_tmp} /workspace/d/folder",
        ]
    )
    snap = _snapshot(sb)
    store = state_dir / "local-snapshots" / snap.id
    for path in store.rglob("*"):
        if path.is_symlink():
            continue
        assert not path.is_file() or canary not in path.read_bytes(), path
    assert os.readlink(store / "workspace" / "to-host") == str(host_file)

    fork = make(image=snap.image)
    out = fork.exec(
        ["sh", "-c", "readlink /workspace/to-host /tmp/shadow; cat /workspace/to-host /tmp/shadow"]
    )
    assert out.stdout == f"{host_file}\n/etc/shadow\n".encode()
    assert canary not in out.stdout + out.stderr
    assert out.exit_code != 0  # the host's files are not there to read
    with pytest.raises(corral.PathSecurityError):
        fork.read_file("/workspace/to-host")
    assert host_file.read_bytes() == canary
    sb.backend.remove_snapshot(snap.id)
    assert host_file.read_bytes() == canary and shared_tmp.is_dir()


# -- changes -------------------------------------------------------------------------------


def test_changes_lists_added_changed_and_deleted_without_reading_files(make, settings):
    base = make()
    base.exec(
        [
            "sh",
            "-c",
            "echo a > /workspace/edit; echo b > /workspace/gone; echo c > /workspace/same; "
            "mkdir /workspace/dir; echo d > /workspace/dir/inner; echo t > /tmp/t",
        ]
    )
    snap = _snapshot(base)
    sb = make(image=snap.image)
    assert sb.backend.changes(sb.id) == []
    sb.exec(
        [
            "sh",
            "-c",
            "echo more >> /workspace/edit; rm /workspace/gone; echo new > /workspace/new; "
            "echo secret > /workspace/secret; chmod 000 /workspace/secret; "
            "echo x > /workspace/dir/inner; rm /tmp/t; chmod 700 /workspace/dir",
        ]
    )
    expected = [
        Change("/tmp/t", "deleted"),
        Change("/workspace/dir", "changed"),
        Change("/workspace/dir/inner", "changed"),
        Change("/workspace/edit", "changed"),
        Change("/workspace/gone", "deleted"),
        Change("/workspace/new", "added"),
        Change("/workspace/secret", "added"),  # listed although nobody may read it
    ]
    assert sb.backend.changes(sb.id) == expected
    assert _another_program(settings).changes(sb.id) == expected  # kept host-side
    base.backend.remove_snapshot(snap.id)


def test_a_new_sandbox_lists_what_its_commands_made(make):
    sb = make()
    assert sb.backend.changes(sb.id) == []
    sb.exec(["sh", "-c", "mkdir /workspace/a && touch /workspace/a/b /tmp/c"])
    assert sb.backend.changes(sb.id) == [
        Change("/tmp/c", "added"),
        Change("/workspace/a", "added"),
        Change("/workspace/a/b", "added"),
    ]


# -- what the backend says it can do -------------------------------------------------------


def test_ports_are_left_out_and_the_hint_says_why(make):
    sb = make()
    caps = sb.backend.capabilities()
    wanted = (
        corral.Capability.PROCESSES
        | corral.Capability.TTY
        | corral.Capability.PAUSE
        | corral.Capability.EXTEND
        | corral.Capability.SNAPSHOTS
        | corral.Capability.CHANGES
    )
    assert caps & wanted == wanted
    assert not caps & corral.Capability.PORTS
    assert not caps & corral.Capability.MEMORY_SNAPSHOTS
    assert "--share-net" in sb.backend.capability_hint(corral.Capability.PORTS)
