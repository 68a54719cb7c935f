"""The ``corral`` command and long-lived sandboxes: terminal sessions (exec -it, run -it,
shell) driven through a real pseudo-terminal, timeouts said, and the small commands
(create, pause, resume, ps, snapshot, extend, port), against the local backend."""

from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import corral
from corral.core.settings import load_settings

pytestmark = pytest.mark.local

Cli = Callable[..., subprocess.CompletedProcess[str]]
_PATIENCE = 60.0  # seconds a step may take before the test gives up (a hang guard only)


def _clean_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    # The user's own CORRAL_* settings and third-party plugins must not leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env.update(extra or {})
    return env


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    return folder


@pytest.fixture
def cli(project: Path) -> Cli:
    """``python -m corral ARGS...`` with no terminal at all (stdin is /dev/null)."""

    def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None):
        return subprocess.run(
            [sys.executable, "-m", "corral", *args],
            cwd=project,
            env=_clean_environment(env),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


@pytest.fixture
def sandbox_id(cli: Cli) -> Iterator[str]:
    """A sandbox made by ``corral create``, removed at the end (and proved gone)."""
    done = cli("create", "--lifetime", "10m")
    assert done.returncode == 0, done.stderr
    made = done.stdout.strip()
    assert len(made.split()) == 1, done.stdout
    yield made
    cli("rm", made)
    listing = cli("ls", "--json")
    assert made not in [info["id"] for info in json.loads(listing.stdout)]


def _local_has_terminals() -> None:
    from corral.core.plugins import get_host

    local = get_host().backend("local", load_settings(environ={}))
    if corral.Capability.TTY not in local.capabilities():
        pytest.skip("the local backend gives commands no terminal (TTY) here")


class Terminal:
    """``python -m corral ARGS`` on a pseudo-terminal of ours, as a person at a terminal
    runs it: its controlling terminal, with a window size we set."""

    def __init__(self, project: Path, *args: str, rows: int = 24, cols: int = 80) -> None:
        self.master, self.slave = os.openpty()
        self.resize(rows, cols)
        self.mode_before = termios.tcgetattr(self.slave)
        self.output = b""

        def controlling_terminal() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.process = subprocess.Popen(
            [sys.executable, "-m", "corral", *args],
            cwd=project,
            env=_clean_environment({"TERM": "xterm"}),
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            start_new_session=True,
            preexec_fn=controlling_terminal,
        )

    def resize(self, rows: int, cols: int) -> None:
        """Set the window size, as a terminal emulator does (SIGWINCH to the CLI)."""
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def _read_some(self, wait: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], wait)
        if not ready:
            return False
        try:
            self.output += os.read(self.master, 65536)
        except OSError:
            return False
        return True

    def read_until(self, wanted: bytes) -> bytes:
        """What it printed, once ``wanted`` is in it (the test fails on a hang)."""
        for _ in range(int(_PATIENCE / 0.1)):
            if wanted in self.output:
                return self.output
            self._read_some(0.1)
        raise AssertionError(f"{wanted!r} never came; the terminal shows {self.output!r}")

    def wait(self) -> int:
        """Its exit status, reading what it prints meanwhile."""
        for _ in range(int(_PATIENCE / 0.1)):
            self._read_some(0.1)
            if self.process.poll() is not None:
                while self._read_some(0.05):
                    pass
                return self.process.returncode
        self.process.kill()
        raise AssertionError(f"the CLI never ended; the terminal shows {self.output!r}")

    def mode(self) -> list:
        return termios.tcgetattr(self.slave)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminal(project: Path) -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def open_terminal(*args: str, rows: int = 24, cols: int = 80) -> Terminal:
        _local_has_terminals()
        found = Terminal(project, *args, rows=rows, cols=cols)
        opened.append(found)
        return found

    yield open_terminal
    for each in opened:
        each.close()


def test_exec_it_gives_a_terminal_of_our_size(terminal, sandbox_id: str) -> None:
    script = "read x; stty size; test -t 0 && test -t 1 && echo on-a-tty; exit 3"
    session = terminal("exec", "-it", sandbox_id, "--", "sh", "-c", script, rows=33, cols=101)
    session.write(b"go\r")
    assert session.wait() == 3
    assert b"33 101" in session.output
    assert b"on-a-tty" in session.output
    assert session.mode() == session.mode_before, "the terminal was left in raw mode"


def test_ctrl_c_reaches_the_command_as_a_byte(terminal, sandbox_id: str) -> None:
    script = 'trap "echo INT; exit 7" INT; echo ready; while :; do sleep 0.1; done'
    session = terminal("exec", "-ti", sandbox_id, "--", "sh", "-c", script)
    session.read_until(b"ready")
    session.write(b"\x03")
    assert session.wait() == 7  # the command's status: corral itself was not interrupted
    assert b"INT" in session.output
    assert session.mode() == session.mode_before


def test_the_window_size_is_followed(terminal, sandbox_id: str) -> None:
    script = "while read x; do stty size; done"
    session = terminal("exec", "-it", sandbox_id, "--", "sh", "-c", script, rows=40, cols=100)
    session.write(b"\r")
    session.read_until(b"40 100")
    session.resize(50, 132)
    for _ in range(100):  # the SIGWINCH is handled soon; ask until the new size shows
        session.write(b"\r")
        session._read_some(0.2)
        if b"50 132" in session.output:
            break
    assert b"50 132" in session.output
    session.write(b"\x04")  # end of file: the loop ends
    assert session.wait() == 0
    assert session.mode() == session.mode_before


def test_shell_opens_the_sandboxs_shell(terminal, sandbox_id: str) -> None:
    session = terminal("shell", sandbox_id)
    session.write(b"echo $((6 * 7))x\r")
    session.read_until(b"42x")
    session.write(b"exit 4\r")
    assert session.wait() == 4
    assert session.mode() == session.mode_before


def test_run_it_removes_its_sandbox_after(terminal, cli: Cli) -> None:
    before = {info["id"] for info in json.loads(cli("ls", "--json").stdout)}
    session = terminal("run", "-it", "--", "sh", "-c", "read x; echo got-$x; exit 2")
    session.write(b"it\r")
    assert session.wait() == 2
    assert b"got-it" in session.output
    after = {info["id"] for info in json.loads(cli("ls", "--json").stdout)}
    assert after <= before, "run -it left its sandbox"
    assert session.mode() == session.mode_before


def test_t_without_a_terminal_is_refused(cli: Cli, sandbox_id: str) -> None:
    for flags in (["-it"], ["-t"]):
        done = cli("exec", *flags, sandbox_id, "--", "true")
        assert done.returncode == 125
        assert "TTY" in done.stderr or "terminal" in done.stderr, done.stderr
    refused = cli("run", "-it", "--", "true")
    assert refused.returncode == 125 and "not a TTY" in refused.stderr
    shell = cli("shell", sandbox_id)
    assert shell.returncode == 125 and "not a TTY" in shell.stderr


def test_i_alone_still_reads_our_input_to_its_end(cli: Cli, sandbox_id: str) -> None:
    done = cli("exec", "-i", sandbox_id, "--", "sh", "-c", "cat; echo end", stdin="piped\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "piped\nend\n"


def test_a_timeout_is_said_on_one_line(cli: Cli, sandbox_id: str) -> None:
    idle = cli("exec", "--idle-timeout", "1", sandbox_id, "--", "sh", "-c", "echo a; sleep 60")
    assert idle.returncode == 124
    assert idle.stdout == "a\n"
    assert "stopped: no output for 1s (idle timeout)" in idle.stderr

    timed = cli("exec", "--timeout", "1", sandbox_id, "--", "sleep", "60")
    assert timed.returncode == 124
    assert "timed out after 1s" in timed.stderr

    quiet = cli("exec", "--json", "--timeout", "1", sandbox_id, "--", "sleep", "60")
    assert quiet.returncode == 124
    assert json.loads(quiet.stdout)["timed_out"] is True
    assert "timed out" not in quiet.stderr


def test_pause_resume_extend_and_ps(cli: Cli, terminal, sandbox_id: str) -> None:
    paused = cli("pause", sandbox_id, "--json")
    assert paused.returncode == 0, paused.stderr
    assert json.loads(paused.stdout) == {"sandbox_id": sandbox_id, "status": "paused"}
    refused = cli("exec", sandbox_id, "--", "true")
    assert refused.returncode == 125 and "paused" in refused.stderr
    resumed = cli("resume", sandbox_id)
    assert resumed.returncode == 0 and resumed.stdout.split() == [sandbox_id]
    assert cli("exec", sandbox_id, "--", "true").returncode == 0

    listed = {i["id"]: i for i in json.loads(cli("ls", "--json").stdout)}
    extended = cli("extend", sandbox_id, "1h", "--json")
    assert extended.returncode == 0, extended.stderr
    assert json.loads(extended.stdout)["expires"] > listed[sandbox_id]["expires"]

    assert json.loads(cli("ps", sandbox_id, "--json").stdout) == []
    session = terminal("exec", "-it", sandbox_id, "--", "sh", "-c", "exit 6")
    assert session.wait() == 6
    (process,) = json.loads(cli("ps", sandbox_id, "--json").stdout)
    assert process["argv"] == ["sh", "-c", "exit 6"]
    assert (process["tty"], process["running"], process["exit_code"]) == (True, False, 6)
    table = cli("ps", sandbox_id)
    assert process["id"] in table.stdout and "exited 6" in table.stdout


def test_snapshot_prints_an_image_to_start_from(cli: Cli, project: Path, sandbox_id: str) -> None:
    assert cli("exec", sandbox_id, "--", "sh", "-c", "echo kept > /workspace/note").returncode == 0
    done = cli("snapshot", sandbox_id, "--lifetime", "10m")
    assert done.returncode == 0, done.stderr
    image = done.stdout.strip()
    assert image.startswith("corral-snapshot:")
    settings = load_settings(cwd=project, environ={})
    try:
        again = cli("run", "--image", image, "--", "cat", "/workspace/note")
        assert again.returncode == 0, again.stderr
        assert again.stdout == "kept\n"
    finally:
        for snap in corral.snapshots(backend="local", settings=settings):
            if snap.image == image:
                snap.remove()
    as_json = cli("snapshot", sandbox_id, "--json")
    info = json.loads(as_json.stdout)
    assert info["sandbox_id"] == sandbox_id and info["image"].startswith("corral-snapshot:")
    for snap in corral.snapshots(backend="local", settings=settings):
        if snap.id == info["id"]:
            snap.remove()
    assert info["id"] not in [s.id for s in corral.snapshots(backend="local", settings=settings)]


@pytest.mark.docker
def test_create_says_where_published_ports_are(project: Path) -> None:
    url = os.environ.get("CORRALTEST_DOCKER_URL")
    if not url:
        pytest.skip("CORRALTEST_DOCKER_URL is not set; run the suite through ./scripts/test")
    image = os.environ.get("CORRALTEST_IMAGE", "corral-test/busybox:latest")
    env = {"CORRAL_BACKENDS__DOCKER__URL": url, "CORRAL_BACKENDS__DOCKER__PULL": "never"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "corral", *args, "--backend", "docker"],
            cwd=project,
            env=_clean_environment(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )

    made = cli("create", "--image", image, "--network", "bridge", "-p", "8080", "--json")
    assert made.returncode == 0, made.stderr
    answer = json.loads(made.stdout)
    try:
        host, port = answer["ports"]["8080"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        shown = cli("port", answer["sandbox_id"])
        assert shown.stdout.strip() == f"8080 -> {answer['ports']['8080']}"
        unpublished = cli("port", answer["sandbox_id"], "9090")
        assert unpublished.returncode == 1 and "not published" in unpublished.stderr
    finally:
        assert cli("rm", answer["sandbox_id"]).returncode == 0
