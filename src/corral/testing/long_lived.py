"""The conformance checks of long-lived sandboxes, one class per feature.

``BackendConformance`` inherits them all. Each class checks its feature where the
backend declares the capability, and, where it does not, that the feature is refused
with a CapabilityError before anything is made (never quietly weakened).
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

import corral
from corral.core.backend import Backend, Capability
from corral.core.settings import Settings

from ._kit import ConformanceBase, Make, _in_workdir, _listed, _output

__all__ = [
    "ChangeConformance",
    "ExtendConformance",
    "IdleTimeoutConformance",
    "LongLivedConformance",
    "PauseConformance",
    "PortConformance",
    "ProcessConformance",
    "SnapshotConformance",
    "TerminalConformance",
]


def _has(backend: Backend, capability: Capability) -> bool:
    """Whether the backend declares every flag of ``capability``."""
    return backend.capabilities() & capability == capability


def _refused(call: Callable[[], Any], backend: str, settings: Settings) -> None:
    """``call`` raises CapabilityError, and no sandbox appeared meanwhile."""
    before = _listed(backend, settings)
    with pytest.raises(corral.CapabilityError):
        call()
    assert _listed(backend, settings) <= before, "a refused call must make nothing"


def _read_until(process: corral.Process, text: bytes, since: str = "start") -> bytes:
    """The process's output up to and including ``text`` (failing after 30 s)."""
    seen = b""
    for chunk in process.output(since, timeout=30):  # type: ignore[arg-type]
        seen += chunk.data
        if text in seen:
            return seen
    raise AssertionError(f"the process ended before printing {text!r}; it printed {seen!r}")


def _cpu(sandbox: corral.Sandbox) -> float:
    seconds = sandbox.usage().cpu_seconds
    if seconds is None:
        pytest.skip(f"the {sandbox.backend_name} backend reports no CPU time here")
    return seconds


class ProcessConformance(ConformanceBase):
    """Background processes (PROCESSES): ``spawn``, ``Process``, ``processes``."""

    def test_a_repl_is_fed_line_by_line(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PROCESSES):
            with pytest.raises(corral.CapabilityError):
                sb.spawn(["sh"])
            return
        repl = sb.spawn(["sh"])
        assert repl.running
        repl.write("echo one\n")
        assert b"one\n" in _read_until(repl, b"one\n")
        # Each answer comes before the next line is written: it is a conversation.
        repl.write("x=two; echo $x\n")
        assert _read_until(repl, b"two\n") == b"one\ntwo\n"
        repl.write("exit 5\n")
        result = repl.wait(timeout=30)
        assert (result.exit_code, result.timed_out) == (5, False), result
        assert result.stdout == b"one\ntwo\n"
        assert not repl.running
        assert [p.id for p in sb.processes()] == [repl.id]

    def test_execs_run_beside_a_background_process(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PROCESSES):
            pytest.skip("no PROCESSES: refusal checked by test_a_repl_is_fed_line_by_line")
        echo = sb.spawn(["sh", "-c", 'while read -r line; do echo "got $line"; done'])
        for i in range(3):
            assert sb.exec(["echo", f"exec {i}"]).text == f"exec {i}\n"
            echo.write(f"{i}\n")
        echo.close_stdin()
        result = echo.wait(timeout=30)
        assert result.exit_code == 0 and result.stdout == b"got 0\ngot 1\ngot 2\n", result

    def test_a_process_outlives_its_creator_and_is_found_by_attach(
        self, conformance_sandbox: Make, conformance_settings: Settings
    ) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PROCESSES):
            pytest.skip("no PROCESSES: refusal checked by test_a_repl_is_fed_line_by_line")
        # Another program attaches, spawns, and exits without a word to the process.
        program = (
            "import pickle, sys, corral\n"
            "settings, backend, sandbox_id = pickle.load(sys.stdin.buffer)\n"
            "sb = corral.attach(sandbox_id, backend=backend, settings=settings)\n"
            "sb.detach()\n"
            "p = sb.spawn(['sh', '-c', 'echo up; read -r line; echo \"bye $line\"'])\n"
            "print(p.id)\n"
        )
        # A program as a user's: the backend found by its entry point.
        env = {k: v for k, v in os.environ.items() if k != "CORRAL_DISABLE_PLUGIN_AUTOLOAD"}
        creator = subprocess.run(
            [sys.executable, "-c", program],
            env=env,
            input=pickle.dumps((conformance_settings, self.backend, sb.id)),
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert creator.returncode == 0, creator.stderr.decode()
        process_id = creator.stdout.decode().strip()
        again = corral.attach(sb.id, backend=self.backend, settings=conformance_settings)
        again.detach()  # the first handle owns the sandbox
        found = again.process(process_id)
        assert found.running, "the process must outlive the program that spawned it"
        assert b"up\n" in _read_until(found, b"up\n")
        found.write("now\n")
        assert found.wait(timeout=30).stdout == b"up\nbye now\n"
        with pytest.raises(corral.NotFoundError):
            again.process("p-nosuchprocess")

    def test_a_signal_reaches_the_command_not_a_shell_around_it(
        self, conformance_sandbox: Make
    ) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PROCESSES):
            pytest.skip("no PROCESSES: refusal checked by test_a_repl_is_fed_line_by_line")
        script = "trap 'echo TERM; exit 3' TERM; echo ready; while :; do sleep 0.1; done"
        process = sb.spawn(["sh", "-c", script])
        _read_until(process, b"ready")
        process.signal(signal.SIGTERM)
        result = process.wait(timeout=30)
        # Only the command's own trap answers with "TERM" and exit 3: a signal to a
        # wrapper would kill it without the trap, or reach nothing.
        assert (result.exit_code, result.stdout) == (3, b"ready\nTERM\n"), result

    def test_kill_ends_the_whole_tree_and_is_not_a_timeout(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PROCESSES):
            pytest.skip("no PROCESSES: refusal checked by test_a_repl_is_fed_line_by_line")
        beat = _in_workdir(sb, "beat")
        loop = f"trap '' TERM; while :; do echo x >> {beat}; sleep 0.1; done"
        process = sb.spawn(
            ["sh", "-c", f'setsid sh -c "{loop}" & sh -c "{loop}" & echo started; wait']
        )
        _read_until(process, b"started")
        time.sleep(0.5)
        process.kill()
        result = process.wait(timeout=30)
        assert not result.timed_out and result.timed_out_by is None, result
        time.sleep(0.5)
        size = len(sb.read_file(beat))
        assert size, "the loops never ran; the check would prove nothing"
        time.sleep(1.0)
        assert len(sb.read_file(beat)) == size, "a process of the killed tree lives on"

    def test_a_kill_as_the_process_starts_stops_it(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PROCESSES):
            pytest.skip("no PROCESSES: refusal checked by test_a_repl_is_fed_line_by_line")
        process = sb.spawn(["sleep", "60"])
        process.kill()  # before the command may even be there to kill
        result = process.wait(timeout=30)
        assert not result.timed_out and result.exit_code != 0, result

    def test_output_nobody_reads_is_capped_and_never_blocks(
        self, conformance_sandbox: Make
    ) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PROCESSES):
            pytest.skip("no PROCESSES: refusal checked by test_a_repl_is_fed_line_by_line")
        script = "head -c 3000000 /dev/zero; echo done >&2"
        process = sb.spawn(["sh", "-c", script], max_output=100_000)
        result = process.wait(timeout=60)
        assert result.exit_code == 0 and result.truncated, result
        assert (len(result.stdout), result.stderr) == (100_000, b"done\n")

    def test_output_from_now_skips_what_came_before(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PROCESSES):
            pytest.skip("no PROCESSES: refusal checked by test_a_repl_is_fed_line_by_line")
        process = sb.spawn(["sh", "-c", "echo before; read -r line; echo after"])
        _read_until(process, b"before\n")
        later = process.output("now", timeout=30)
        process.write("\n")
        assert b"".join(chunk.data for chunk in later) == b"after\n"

    def test_a_wait_that_times_out_leaves_the_process_running(
        self, conformance_sandbox: Make
    ) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PROCESSES):
            pytest.skip("no PROCESSES: refusal checked by test_a_repl_is_fed_line_by_line")
        process = sb.spawn(["sh", "-c", "read -r line; echo $line"])
        with pytest.raises(corral.TimeoutError):
            process.wait(timeout=0.5)
        assert process.running
        process.write("still here\n")
        assert process.wait(timeout=30).stdout == b"still here\n"

    def test_a_spawn_timeout_stops_the_process(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PROCESSES):
            pytest.skip("no PROCESSES: refusal checked by test_a_repl_is_fed_line_by_line")
        result = sb.spawn(["sh", "-c", "echo a; sleep 60"], timeout=1).wait(timeout=60)
        assert result.timed_out and result.timed_out_by == "timeout", result
        assert result.stdout == b"a\n"

    def test_a_spawned_fork_bomb_is_contained(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox(pids=64)
        if not _has(sb.backend, Capability.PROCESSES | Capability.PIDS_LIMIT):
            pytest.skip("needs PROCESSES and PIDS_LIMIT")
        bomb = sb.spawn(["sh", "-c", "b() { b | b & }; b; sleep 60"], timeout=5)
        result = bomb.wait(timeout=120)
        assert result.timed_out or result.exit_code != 0, result
        assert _output(sb.exec(["echo", "alive"], timeout=60)) == "alive\n"

    def test_a_closed_sandbox_refuses_process_calls(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PROCESSES):
            pytest.skip("no PROCESSES: refusal checked by test_a_repl_is_fed_line_by_line")
        process = sb.spawn(["sleep", "60"])
        sb.close()
        for call in (
            lambda: sb.spawn(["true"]),
            lambda: process.write("x"),
            process.kill,
            lambda: process.wait(1),
            sb.processes,
        ):
            with pytest.raises(corral.SandboxClosedError):
                call()

    def test_a_sandbox_removed_elsewhere_ends_its_processes_and_refuses_more(
        self, conformance_sandbox: Make, conformance_settings: Settings
    ) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PROCESSES):
            pytest.skip("no PROCESSES: refusal checked by test_a_repl_is_fed_line_by_line")
        process = sb.spawn(["sh", "-c", "echo up; sleep 60"])
        _read_until(process, b"up")
        corral.attach(sb.id, backend=self.backend, settings=conformance_settings).close()
        # Its end, or why there is none (the backend's error): never a hang.
        ended: corral.ExecResult | corral.SandboxError
        try:
            ended = process.wait(timeout=60)
        except corral.SandboxError as e:
            ended = e
        assert not isinstance(ended, corral.TimeoutError), ended
        assert isinstance(ended, corral.SandboxError) or ended.exit_code != 0, ended
        with pytest.raises(corral.NotFoundError):
            sb.spawn(["true"])


class TerminalConformance(ConformanceBase):
    """Terminals (TTY): ``spawn(tty=True)`` and ``Process.resize``."""

    def test_a_tty_process_sees_a_terminal_and_its_size(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.TTY):
            with pytest.raises(corral.CapabilityError):
                sb.spawn(["sh"], tty=True)
            return
        script = "test -t 0 && test -t 1 && echo terminal; read -r line; stty size"
        process = sb.spawn(["sh", "-c", script], tty=True)
        _read_until(process, b"terminal")
        process.resize(33, 101)
        process.write("go\n")
        result = process.wait(timeout=30)
        assert result.exit_code == 0, result
        assert b"33 101" in result.stdout, result.stdout
        assert result.stderr == b"", "a terminal has one stream"

    def test_resizing_a_process_without_a_terminal_is_refused(
        self, conformance_sandbox: Make
    ) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PROCESSES):
            pytest.skip("no PROCESSES")
        process = sb.spawn(["sleep", "30"])
        with pytest.raises(corral.ConflictError, match="terminal"):
            process.resize(10, 10)
        process.kill()


class IdleTimeoutConformance(ConformanceBase):
    """Inactivity timeouts: the core enforces them on every backend, exec and spawn."""

    def test_an_idle_command_is_stopped_and_a_chatty_one_is_not(
        self, conformance_sandbox: Make
    ) -> None:
        sb = conformance_sandbox()
        idle = sb.exec(["sh", "-c", "echo start; sleep 30"], idle_timeout=1, timeout=60)
        assert idle.timed_out and idle.timed_out_by == "idle_timeout", idle
        assert idle.stdout == b"start\n"
        # As long as the idle one would have run, printing every 0.3 s: it goes on.
        chatty = "for i in 1 2 3 4 5 6 7 8 9 10; do echo $i; sleep 0.3; done"
        result = sb.exec(["sh", "-c", chatty], idle_timeout=2, timeout=60)
        assert result.exit_code == 0 and not result.timed_out, result
        plain = sb.exec(["sh", "-c", "sleep 30"], timeout=1)
        assert plain.timed_out_by == "timeout", plain

    def test_an_idle_background_process_is_stopped(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PROCESSES):
            pytest.skip("no PROCESSES")
        process = sb.spawn(["sh", "-c", "echo start; sleep 30"], idle_timeout=1)
        result = process.wait(timeout=60)
        assert result.timed_out and result.timed_out_by == "idle_timeout", result


class PauseConformance(ConformanceBase):
    """Pause and resume (PAUSE)."""

    def test_pause_stops_the_cpu_clock_and_resume_goes_on(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PAUSE):
            with pytest.raises(corral.CapabilityError):
                sb.pause()
            return
        note = _in_workdir(sb, "note")
        sb.write_file(note, b"kept")
        busy = _busy_loop(sb)
        time.sleep(1.0)
        sb.pause()
        assert sb.status == "paused"
        frozen = _cpu(sb)
        time.sleep(1.5)
        assert _cpu(sb) - frozen < 0.2, "a paused sandbox must use no CPU"
        with pytest.raises(corral.ConflictError, match="paused"):
            sb.exec(["true"])
        sb.resume()
        assert sb.status == "running"
        thawed = _cpu(sb)
        time.sleep(1.5)
        assert _cpu(sb) - thawed > 0.2, "the loop must go on after resume"
        assert sb.read_file(note) == b"kept"
        busy.kill()

    def test_another_handle_on_a_paused_sandbox_gets_a_clear_error(
        self, conformance_sandbox: Make, conformance_settings: Settings
    ) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PAUSE):
            pytest.skip("no PAUSE: refusal checked by test_pause_stops_the_cpu_clock...")
        sb.pause()
        other = corral.attach(sb.id, backend=self.backend, settings=conformance_settings)
        other.detach()
        assert other.status == "paused"
        with pytest.raises(corral.ConflictError):
            other.exec(["true"], timeout=10)
        sb.resume()
        assert other.exec(["echo", "ok"]).text == "ok\n"

    def test_auto_resume_resumes_for_a_call_that_needs_it(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox(auto_resume=True)
        if not _has(sb.backend, Capability.PAUSE):
            pytest.skip("no PAUSE")
        sb.pause()
        assert sb.exec(["echo", "back"]).text == "back\n"
        assert sb.status == "running"

    def test_a_paused_sandbox_closes_and_leaves_nothing(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.PAUSE):
            pytest.skip("no PAUSE")
        if _has(sb.backend, Capability.PROCESSES):
            sb.spawn(["sleep", "60"])
        sb.pause()
        sb.close()  # the fixture checks that nothing is listed or kept after
        with pytest.raises(corral.SandboxClosedError):
            sb.resume()


def _busy_loop(sb: corral.Sandbox) -> corral.Process:
    if _has(sb.backend, Capability.PROCESSES):
        return sb.spawn(["sh", "-c", "while :; do :; done"])
    pytest.skip("the busy loop runs as a background process (PROCESSES)")


class ExtendConformance(ConformanceBase):
    """Extending a sandbox's lifetime (EXTEND)."""

    def test_extend_moves_the_end_and_nothing_removes_it_before(
        self, conformance_sandbox: Make, conformance_settings: Settings
    ) -> None:
        sb = conformance_sandbox(lifetime=3)
        if not _has(sb.backend, Capability.EXTEND):
            with pytest.raises(corral.CapabilityError):
                sb.extend(60)
            return
        first = sb.expires
        expires = sb.extend(120)
        assert expires == sb.expires and expires >= first + 119
        listed = {i.id: i for i in corral.list(backend=self.backend, settings=conformance_settings)}
        assert abs(listed[sb.id].expires - expires) < 2, listed[sb.id]
        # Past the first end and every sweep's grace: still there, still working.
        time.sleep(8)
        assert sb.exec(["echo", "still"], timeout=30).text == "still\n"
        corral.gc(backend=self.backend, settings=conformance_settings)
        assert sb.id in _listed(self.backend, conformance_settings)


class SnapshotConformance(ConformanceBase):
    """Snapshots and forks (SNAPSHOTS, MEMORY_SNAPSHOTS)."""

    def test_a_snapshot_forked_three_times_gives_independent_sandboxes(
        self, conformance_sandbox: Make, conformance_settings: Settings
    ) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.SNAPSHOTS):
            _refused(sb.snapshot, self.backend, conformance_settings)
            return
        sb.write_file(_in_workdir(sb, "made"), b"before the snapshot")
        sb.exec(["sh", "-c", f"mkdir -p {_in_workdir(sb, 'tree/deep')} && echo t > /tmp/t"])
        snap = sb.snapshot()
        sb.write_file(_in_workdir(sb, "later"), b"after the snapshot")
        forks = [conformance_sandbox(image=snap) for _ in range(3)]
        for i, fork in enumerate(forks):
            assert fork.read_file(_in_workdir(fork, "made")) == b"before the snapshot"
            assert fork.read_file("/tmp/t") == b"t\n"
            assert fork.exec(["test", "-d", _in_workdir(fork, "tree/deep")]).exit_code == 0
            assert fork.exec(["test", "-e", _in_workdir(fork, "later")]).exit_code == 1
            fork.write_file(_in_workdir(fork, "mine"), f"fork {i}")
        for i, fork in enumerate(forks):
            assert fork.read_file(_in_workdir(fork, "mine")) == f"fork {i}".encode()
        assert sb.exec(["test", "-e", _in_workdir(sb, "mine")]).exit_code == 1
        listed = {
            s.id: s for s in corral.snapshots(backend=self.backend, settings=conformance_settings)
        }
        assert snap.id in listed and listed[snap.id].info.sandbox_id == sb.id
        assert listed[snap.id].info.labels.get("corral.snapshot") == snap.id
        for fork in forks:
            fork.close()
        snap.remove()
        snap.remove()  # idempotent
        assert snap.id not in {
            s.id for s in corral.snapshots(backend=self.backend, settings=conformance_settings)
        }

    def test_fork_is_snapshot_and_create(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.SNAPSHOTS):
            pytest.skip("no SNAPSHOTS: refusal checked by the forked-three-times check")
        sb.write_file(_in_workdir(sb, "f"), b"shared")
        forks = sb.fork(2)
        try:
            assert [f.read_file(_in_workdir(f, "f")) for f in forks] == [b"shared"] * 2
            assert len({f.id for f in forks} | {sb.id}) == 3
        finally:
            for fork in forks:
                fork.close()

    def test_gc_removes_expired_snapshots(
        self, conformance_sandbox: Make, conformance_settings: Settings
    ) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.SNAPSHOTS):
            pytest.skip("no SNAPSHOTS")
        snap = sb.snapshot(lifetime=1)
        keep = sb.snapshot(lifetime=3600)
        try:
            time.sleep(2.5)  # the label counts whole seconds
            corral.gc(backend=self.backend, settings=conformance_settings)
            left = {
                s.id for s in corral.snapshots(backend=self.backend, settings=conformance_settings)
            }
            assert snap.id not in left and keep.id in left
        finally:
            keep.remove()
            snap.remove()

    def test_a_snapshot_keeps_a_link_to_a_host_path_a_link(
        self, conformance_sandbox: Make, conformance_scratch: Any
    ) -> None:
        secret = conformance_scratch / "host-secret"
        secret.write_text("host secret")
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.SNAPSHOTS):
            pytest.skip("no SNAPSHOTS")
        link = _in_workdir(sb, "link")
        sb.exec(["ln", "-s", str(secret), link])
        fork = conformance_sandbox(image=sb.snapshot())
        assert _output(fork.exec(["readlink", link])) == f"{secret}\n"
        seen = fork.exec(["cat", link])
        assert b"host secret" not in seen.stdout, "a snapshot followed a link to the host"
        with pytest.raises(corral.SandboxError):
            fork.read_file(link)  # links are never followed out of a sandbox

    def test_a_memory_snapshot_is_refused_where_it_cannot_be_taken(
        self, conformance_sandbox: Make, conformance_settings: Settings
    ) -> None:
        sb = conformance_sandbox()
        if _has(sb.backend, Capability.MEMORY_SNAPSHOTS):
            pytest.skip("memory snapshots are declared: checked by the backend's own tests")
        before = {
            s.id for s in corral.snapshots(backend=self.backend, settings=conformance_settings)
        }
        with pytest.raises(corral.CapabilityError):
            sb.snapshot(memory=True)
        after = {
            s.id for s in corral.snapshots(backend=self.backend, settings=conformance_settings)
        }
        assert after == before


class PortConformance(ConformanceBase):
    """Published ports (PORTS), on the host's loopback only."""

    def test_a_server_answers_on_its_published_port_while_execs_run(
        self,
        conformance_backend: Backend,
        conformance_sandbox: Make,
        conformance_settings: Settings,
    ) -> None:
        if not _has(conformance_backend, Capability.NETWORK_BRIDGE):
            pytest.skip("no bridged network here")

        def make() -> corral.Sandbox:
            return conformance_sandbox(network="bridge", ports=[8000])

        if not _has(conformance_backend, Capability.PORTS):
            _refused(make, self.backend, conformance_settings)
            return
        sb = make()
        if not _has(sb.backend, Capability.PROCESSES):
            pytest.skip("the server runs as a background process (PROCESSES)")
        sb.write_file(_in_workdir(sb, "index.html"), b"served from the sandbox")
        server = sb.spawn(["httpd", "-f", "-p", "8000", "-h", sb.spec.workdir])
        host, port = sb.port(8000)
        assert host == "127.0.0.1", "a port is published on the host's loopback only"
        assert sb.exec(["echo", "beside"]).text == "beside\n"
        assert b"served from the sandbox" in _http_get(host, port)
        with pytest.raises(corral.ConfigError, match="port"):
            sb.port(9999)
        server.kill()

    def test_ports_without_a_network_are_refused_by_name(self, conformance_sandbox: Make) -> None:
        with pytest.raises(corral.ConfigError, match="ports"):
            conformance_sandbox(ports=[8000])


def _http_get(host: str, port: int) -> bytes:
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection((host, port), timeout=10) as conn:
                conn.sendall(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
                if answer:
                    return answer
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing answered on {host}:{port}")
        time.sleep(0.2)


class ChangeConformance(ConformanceBase):
    """What changed since the sandbox was made (CHANGES), without reading files."""

    def test_changes_lists_added_changed_and_deleted_paths(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        if not _has(sb.backend, Capability.CHANGES):
            with pytest.raises(corral.CapabilityError):
                sb.changes()
            return
        w = sb.spec.workdir
        if _has(sb.backend, Capability.SNAPSHOTS):
            # Files that exist when a sandbox is made: one started from a snapshot.
            sb.exec(["sh", "-c", f"echo a > {w}/keep && echo b > {w}/edit && echo c > {w}/gone"])
            sb = conformance_sandbox(image=sb.snapshot())
            assert [c for c in sb.changes() if c.path.startswith(w + "/")] == []
            script = f"echo more >> {w}/edit && rm {w}/gone && "
        else:
            script = ""
        script += f"echo new > {w}/added && mkdir {w}/dir && echo s > {w}/dir/secret"
        script += f" && chmod 000 {w}/dir/secret"
        _output(sb.exec(["sh", "-c", script + " && echo ok"]))
        changes = {c.path: c.kind for c in sb.changes() if c.path.startswith(w + "/")}
        expected = {f"{w}/added": "added", f"{w}/dir": "added", f"{w}/dir/secret": "added"}
        if _has(sb.backend, Capability.SNAPSHOTS):
            expected.update({f"{w}/edit": "changed", f"{w}/gone": "deleted"})
        assert changes == expected
        assert sorted(sb.changes(), key=lambda c: c.path) == sb.changes()


class LongLivedConformance(
    ProcessConformance,
    TerminalConformance,
    IdleTimeoutConformance,
    PauseConformance,
    ExtendConformance,
    SnapshotConformance,
    PortConformance,
    ChangeConformance,
):
    """Every class above: what ``BackendConformance`` holds a backend to beyond its own
    checks, and what a backend's tests may inherit alone."""
