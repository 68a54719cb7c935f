"""``corral.run``: one command in a fresh sandbox, on every backend.

On the container engines the command is the container's own process (no exec), a path
of its own through each engine: so the campaign's guarantees are proved on it too,
timeouts that end the whole tree (B4), bounded output (B3), OOM evidence (B5), refusals
before anything is made, and nothing left behind (the harness checks after each case).
"""

from __future__ import annotations

import threading
import time

import pytest
from cases import ENGINES_ONLY, gone, host_processes, tagged, token

import corral
from corral.core.plugins import get_host

ALLOCATE = "dd if=/dev/zero of=/dev/null bs={size} count=1 2>/dev/null && echo allocated"


@pytest.fixture
def run(backend: str, backend_settings: corral.Settings):
    """``run(argv, **keywords)``: corral.run on the case's backend, tagged for the checks."""

    def _run(argv: list[str], **keywords: object) -> corral.ExecResult:
        keywords.setdefault("settings", backend_settings)
        keywords.setdefault("lifetime", "10m")
        return corral.run(argv, backend=backend, **keywords)

    return _run


def test_the_command_runs_and_nothing_is_left(run, backend, backend_settings):
    tag = token()
    result = run(
        ["sh", "-c", "echo out; echo err >&2; exit 3"], labels={"campaign.case": tag}, timeout=60
    )
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert not (result.timed_out or result.oom_killed or result.truncated)
    assert tagged(backend, backend_settings, tag) == [], "the sandbox outlived run()"


def test_the_sandbox_keywords_reach_the_command(run, backend):
    result = run(
        ["sh", "-c", 'echo "$GREETING"; pwd; id -u'],
        env={"GREETING": "hello"},
        workdir="/tmp",
        user="1234:1234",
        timeout=60,
    )
    assert result.text == "hello\n/tmp\n1234\n", result


def test_a_timeout_ends_the_whole_tree(run, backend, backend_settings):
    marker = token()
    tag = token()
    started = time.monotonic()
    result = run(
        ["sh", "-c", f"sleep 300 & sleep 301 & echo started; wait # {marker}"],
        timeout=2,
        labels={"campaign.case": tag},
    )
    assert result.timed_out and result.text == "started\n"
    assert time.monotonic() - started < 60
    assert gone(lambda: host_processes(marker, "sleep 30")) == []
    assert tagged(backend, backend_settings, tag) == []
    # The twin: a command inside its timeout is not touched.
    assert run(["sh", "-c", "sleep 0.2; echo done"], timeout=60).text == "done\n"


def test_cancel_stops_the_command(run):
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    result = run(["sleep", "300"], cancel=cancel, timeout=120)
    assert result.timed_out


def test_output_past_the_cap_is_dropped_and_said(run):
    result = run(["sh", "-c", "yes corral | head -c 1000000; echo; exit 0"], max_output=1000)
    assert result.exit_code == 0 and result.truncated and len(result.stdout) == 1000
    chunks: list[corral.OutputChunk] = []
    streamed = run(["sh", "-c", "echo one; echo two >&2"], on_chunk=chunks.append)
    assert b"".join(c.data for c in chunks if c.stream == "stdout") == streamed.stdout == b"one\n"


def test_an_oom_kill_is_reported_as_such(run):
    bomb = run(["sh", "-c", "exec " + ALLOCATE.format(size="256M")], memory="32MiB", timeout=60)
    assert bomb.exit_code == 137 and bomb.oom_killed and not bomb.timed_out
    # The twins: an allocation that fits, and a SIGKILL that is not an OOM.
    fits = run(["sh", "-c", ALLOCATE.format(size="8M")], memory="32MiB", timeout=60)
    assert fits.ok and fits.text == "allocated\n" and not fits.oom_killed
    killed = run(["sh", "-c", "kill -9 $$"], memory="32MiB", timeout=60)
    assert killed.exit_code == 137 and not killed.oom_killed and killed.oom_events == 0
    # A child killed for memory while the command itself goes on (T35): counted, no more.
    child = run(
        ["sh", "-c", ALLOCATE.format(size="256M") + "; echo parent-survived"],
        memory="32MiB",
        timeout=60,
    )
    assert child.exit_code == 0 and child.text == "parent-survived\n"
    assert child.oom_events >= 1 and not child.oom_killed


def test_a_missing_program_exits_127(run):
    result = run(["no-such-program-here"], timeout=60)
    assert result.exit_code == 127 and not result.ok


def test_stdin_reaches_the_command(run):
    assert run(["cat"], stdin=b"fed\n", timeout=60).stdout == b"fed\n"


class _WritesOnCreate:
    """A plugin that uses the sandbox before its command: the sandbox is then made first."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @corral.hookimpl
    def corral_sandbox_created(self, sandbox: corral.Sandbox) -> None:
        sandbox.write_file("/tmp/from-plugin", b"written before the command\n")

    @corral.hookimpl(wrapper=True)
    def corral_exec(self, sandbox, request, sink):
        self.seen.append(" ".join(request.argv))
        return (yield)


def test_plugins_see_the_command_and_may_use_the_sandbox_first(run):
    plugin = _WritesOnCreate()
    host = get_host()
    host.pm.register(plugin)
    try:
        result = run(["cat", "/tmp/from-plugin"], timeout=60)
    finally:
        host.pm.unregister(plugin)
    assert result.text == "written before the command\n", result
    assert plugin.seen == ["cat /tmp/from-plugin"]


def test_refusals_come_before_anything_is_made(run, backend, backend_settings):
    tag = token()
    with pytest.raises(corral.PolicyError, match="sensitive"):
        run(["true"], mounts=[corral.Mount("/etc", "/mnt/etc")], labels={"campaign.case": tag})
    with pytest.raises(corral.ConfigError, match="command"):
        run(["true"], command=["sleep", "1"])
    with pytest.raises(corral.ConfigError, match="nonsense"):
        run(["true"], nonsense=1)
    assert tagged(backend, backend_settings, tag) == []


@ENGINES_ONLY
def test_a_missing_image_fails_cleanly(run, backend, backend_settings):
    tag = token()
    with pytest.raises(corral.NotFoundError, match="no-such-image"):
        run(["true"], image="corral-test/no-such-image:1", labels={"campaign.case": tag})
    assert tagged(backend, backend_settings, tag) == []
