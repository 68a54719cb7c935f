"""The behaviours every corral backend must have, as a pytest test class to inherit.

In a test module of the backend's distribution::

    from corral.testing.conformance import BackendConformance

    class TestMine(BackendConformance):
        backend = "mine"
        settings = {"backends": {"mine": {"root": "/srv/mine"}}}  # optional
        image = "busybox:latest"  # optional

Each check runs only where it applies: those about a capability (bind mounts, the
nofile and pids limits) are skipped, with the reason, when the backend does not declare
that capability. The commands used exist both in a busybox image and on a Debian host:
sh, echo, cat, printf, test, true, sleep, head, sha256sum, ln, mkdir, touch, rm, stat, date,
dd and setsid.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import corral
from corral.core.backend import Backend, Capability
from corral.core.settings import Settings

from ._kit import (
    ConformanceBase,
    Make,
    MiB,
    _in_workdir,
    _listed,
    _need,
    _output,
    _within,
    unavailable,
)
from .long_lived import (
    ChangeConformance,
    ExtendConformance,
    IdleTimeoutConformance,
    LongLivedConformance,
    PauseConformance,
    PortConformance,
    ProcessConformance,
    SnapshotConformance,
    TerminalConformance,
)

__all__ = [
    "BackendConformance",
    "ChangeConformance",
    "ConformanceBase",
    "ExtendConformance",
    "IdleTimeoutConformance",
    "LongLivedConformance",
    "PauseConformance",
    "PortConformance",
    "ProcessConformance",
    "SnapshotConformance",
    "TerminalConformance",
    "unavailable",
]


class BackendConformance(LongLivedConformance):
    """The conformance suite. Subclass it as ``Test...`` and set ``backend``.

    It holds a backend to the whole contract: the checks below, and those of each class
    of ``long_lived.py`` (background processes, terminals, idle timeouts, pause, extend,
    snapshots, ports, changes), each of which checks, for a backend that does not
    declare its capability, that the feature is refused before anything is made.

    Attributes:
        backend: the name the backend is selected by (required).
        settings: settings laid over clean defaults (nothing is read from the user's
            files or variables); ``mount_roots`` defaults to a scratch folder that the
            suite also mounts from. Override the ``conformance_settings`` fixture
            instead when the settings need paths made at run time.
        image: the image of every sandbox, for backends that run images.
    """

    # -- lifecycle -----------------------------------------------------------------------

    def test_lifecycle(self, conformance_sandbox: Make, conformance_settings: Settings) -> None:
        sb = conformance_sandbox()
        listed = {i.id: i for i in corral.list(backend=self.backend, settings=conformance_settings)}
        assert sb.id in listed, "a new sandbox must be listed"
        info = listed[sb.id]
        assert info.backend == self.backend
        assert info.expires > info.created
        assert info.labels.get("corral.sandbox") == sb.id
        result = sb.exec(["echo", "hello"])
        assert (result.exit_code, result.stdout, result.timed_out) == (0, b"hello\n", False)
        sb.close()
        sb.close()  # idempotent
        assert sb.closed
        for call in (
            lambda: sb.exec(["true"]),
            lambda: sb.read_file("/tmp/x"),
            lambda: sb.write_file("/tmp/x", b"x"),
            sb.usage,
        ):
            with pytest.raises(corral.SandboxClosedError):
                call()
        assert sb.id not in _listed(self.backend, conformance_settings)

    def test_attach_finds_a_live_sandbox(
        self, conformance_sandbox: Make, conformance_settings: Settings
    ) -> None:
        sb = conformance_sandbox()
        sb.write_file(_in_workdir(sb, "note"), b"from the first handle")
        other = corral.attach(sb.id, backend=self.backend, settings=conformance_settings)
        other.detach()  # the first handle owns it
        assert other.spec.limits == sb.spec.limits
        assert other.exec(["cat", _in_workdir(sb, "note")]).stdout == b"from the first handle"

    def test_attach_to_a_missing_sandbox_is_not_found(
        self, conformance_backend: Backend, conformance_settings: Settings
    ) -> None:
        missing = uuid.uuid4().hex[:16]
        with pytest.raises(corral.NotFoundError) as info:
            corral.attach(missing, backend=self.backend, settings=conformance_settings)
        assert info.value.category == "not_found"

    def test_a_sandbox_removed_elsewhere_is_not_found(
        self, conformance_sandbox: Make, conformance_settings: Settings
    ) -> None:
        sb = conformance_sandbox()
        corral.attach(sb.id, backend=self.backend, settings=conformance_settings).close()
        with pytest.raises(corral.NotFoundError):
            sb.exec(["true"])
        sb.close()  # gone already: closing is still fine

    def test_nothing_is_left_after_close(
        self, conformance_sandbox: Make, conformance_settings: Settings
    ) -> None:
        boxes = [conformance_sandbox() for _ in range(3)]
        for sb in boxes:
            sb.exec(["sh", "-c", "sleep 30 &"], timeout=10)  # a background child, too
            sb.close()
        left = _listed(self.backend, conformance_settings) & {sb.id for sb in boxes}
        assert not left, f"closed sandboxes still listed: {sorted(left)}"

    # -- exec semantics ------------------------------------------------------------------

    def test_exit_codes_are_the_commands_own(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        assert sb.exec(["true"]).exit_code == 0
        assert sb.exec(["sh", "-c", "exit 3"]).exit_code == 3
        missing = sb.exec(["/no/such/command"])
        assert missing.exit_code == 127, missing
        assert sb.exec(["corral-no-such-command"]).exit_code == 127

    def test_argv_is_never_a_shell(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        marker = _in_workdir(sb, "pwned")
        args = [f"$(touch {marker})", "`id`", "; echo x", "a|b>c", "*", "$HOME", "two words"]
        result = sb.exec(["printf", "%s\\n", *args])
        assert result.text == "".join(a + "\n" for a in args)
        assert sb.exec(["test", "-e", marker]).exit_code == 1
        with pytest.raises(corral.ConfigError):
            sb.exec("echo hi")  # type-checks (a str is a Sequence[str]); refused at run time

    def test_stdin_bytes_round_trip(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        data = os.urandom(MiB) + b"\x00\xff\n"
        result = sb.exec(["cat"], stdin=data, timeout=60)
        assert result.exit_code == 0
        assert result.stdout == data, "stdin must reach the command byte for byte"
        digest = _output(sb.exec(["sha256sum"], stdin=data, timeout=60)).split()[0]
        assert digest == hashlib.sha256(data).hexdigest()
        # Without stdin, the command reads end-of-file at once rather than waiting.
        result = sb.exec(["cat"], timeout=10)
        assert (result.exit_code, result.stdout, result.timed_out) == (0, b"", False)

    def test_environment_per_call(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox(env={"FROM_SPEC": "spec", "SHARED": "spec"})
        show = ["sh", "-c", 'printf "%s|%s|%s" "$FROM_SPEC" "$SHARED" "$PER_CALL"']
        assert sb.exec(show, env={"SHARED": "call", "PER_CALL": "x y"}).text == "spec|call|x y"
        assert sb.exec(show).text == "spec|spec|", "a call's env must not outlive the call"

    def test_workdir(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        assert sb.exec(["sh", "-c", "pwd"]).text == sb.spec.workdir + "\n"
        assert sb.exec(["sh", "-c", "pwd"], workdir="/tmp").text == "/tmp\n"

    def test_non_utf8_output_is_kept(self, conformance_sandbox: Make) -> None:
        result = conformance_sandbox().exec(["printf", "\\377\\376\\200ok\\n"])
        assert result.stdout == b"\xff\xfe\x80ok\n"
        assert result.text == "\ufffd\ufffd\ufffdok\n"

    def test_stream_yields_output_then_the_result(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        events = list(sb.stream(["sh", "-c", "echo one; echo err >&2; sleep 0.2; echo two"]))
        assert isinstance(events[-1], corral.ExecResult) and events[-1].exit_code == 0
        chunks = [e for e in events[:-1] if isinstance(e, corral.OutputChunk)]
        assert len(chunks) == len(events) - 1
        assert b"".join(c.data for c in chunks if c.stream == "stdout") == b"one\ntwo\n"
        assert b"".join(c.data for c in chunks if c.stream == "stderr") == b"err\n"

    # -- timeouts ------------------------------------------------------------------------

    def test_timeout_stops_the_whole_command_and_keeps_the_sandbox(
        self, conformance_sandbox: Make
    ) -> None:
        sb = conformance_sandbox()
        sb.write_file(_in_workdir(sb, "state"), b"kept")
        beats = [_in_workdir(sb, f"beat-{kind}") for kind in ("child", "setsid", "orphan")]
        # Each loop ignores SIGTERM and leaves a trace while it lives.
        loop = "trap '' TERM; while :; do echo x >> {}; sleep 0.1; done"
        script = (
            f'sh -c "{loop.format(beats[0])}" & '
            f'setsid sh -c "{loop.format(beats[1])}" & '
            f'(sh -c "{loop.format(beats[2])}" &); '
            "echo started; sleep 60"
        )
        started = time.monotonic()
        result = _within(60, lambda: sb.exec(["sh", "-c", script], timeout=2))
        elapsed = time.monotonic() - started
        assert result.timed_out, result
        assert result.stdout == b"started\n", "the output before the timeout must be kept"
        assert elapsed < 20, f"a 2 s timeout took {elapsed:.1f} s"
        time.sleep(0.5)
        sizes = [len(sb.read_file(beat)) for beat in beats]
        assert all(sizes), f"the loops never ran ({sizes}); the check would prove nothing"
        time.sleep(1.0)
        after = [len(sb.read_file(beat)) for beat in beats]
        assert after == sizes, "processes the command started outlived its timeout"
        assert sb.exec(["cat", _in_workdir(sb, "state")]).stdout == b"kept"

    # -- output caps ---------------------------------------------------------------------

    def test_output_past_the_cap_is_truncated_to_the_cap(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        script = "head -c 3000000 /dev/zero; echo done >&2"
        result = sb.exec(["sh", "-c", script], max_output=100_000, timeout=60)
        assert result.exit_code == 0 and not result.timed_out, result
        assert result.truncated
        assert len(result.stdout) == 100_000
        assert result.stderr == b"done\n"

    def test_output_at_the_cap_is_whole(self, conformance_sandbox: Make) -> None:
        result = conformance_sandbox().exec(["head", "-c", "65536", "/dev/zero"], max_output=65536)
        assert not result.truncated
        assert result.stdout == bytes(65536)

    # -- files and path safety -----------------------------------------------------------

    def test_one_mebibyte_file_round_trip(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox()
        data = os.urandom(MiB)
        path = _in_workdir(sb, "blob")
        sb.write_file(path, data)
        assert sb.read_file(path) == data
        assert _output(sb.exec(["sha256sum", path])).split()[0] == hashlib.sha256(data).hexdigest()
        sb.write_file(path, b"replaced")
        assert sb.read_file(path) == b"replaced"
        # Dated now, not 1970 (build tools compare modification times).
        age = _output(sb.exec(["sh", "-c", f'echo $(( $(date +%s) - $(stat -c %Y "{path}") ))']))
        assert abs(int(age)) < 600, f"a written file is {age.strip()} s old"
        sb.write_file("/tmp/t.txt", "text")
        assert sb.exec(["cat", "/tmp/t.txt"]).stdout == b"text"

    def test_upload_and_download_a_folder(self, conformance_sandbox: Make, tmp_path: Path) -> None:
        src = tmp_path / "src"
        (src / "pkg").mkdir(parents=True)
        (src / "pkg" / "a.py").write_text("A = 1\n")
        (src / "top.bin").write_bytes(b"\x00\x01\xff")
        sb = conformance_sandbox()
        sb.upload(src, sb.spec.workdir)
        uploaded = _in_workdir(sb, "src")
        assert sb.exec(["cat", f"{uploaded}/pkg/a.py"]).stdout == b"A = 1\n"
        assert sb.exec(["sh", "-c", f"echo more >> {uploaded}/pkg/a.py"]).exit_code == 0
        got = sb.download(uploaded, tmp_path / "back")
        assert (got / "pkg" / "a.py").read_text() == "A = 1\nmore\n"
        assert (got / "top.bin").read_bytes() == b"\x00\x01\xff"

    def test_paths_that_leave_the_sandbox_are_refused(
        self, conformance_sandbox: Make, tmp_path: Path
    ) -> None:
        sb = conformance_sandbox()
        for bad in ("/tmp/../../etc/passwd", "relative/path", "tmp/x", "/tmp/a\0b"):
            with pytest.raises(corral.PathSecurityError):
                sb.write_file(bad, b"x")
            with pytest.raises(corral.PathSecurityError):
                sb.read_file(bad)
            with pytest.raises(corral.PathSecurityError):
                sb.download(bad, tmp_path / "out")
            with pytest.raises(corral.PathSecurityError):
                sb.upload(tmp_path, bad)

    def test_planted_symlinks_are_never_followed(
        self, conformance_sandbox: Make, conformance_scratch: Path, tmp_path: Path
    ) -> None:
        canary = conformance_scratch / "canary"
        canary.write_text("host file, untouched")
        os.chmod(canary, 0o666)
        sb = conformance_sandbox()
        out, link = _in_workdir(sb, "out"), _in_workdir(sb, "link")
        plant = f"mkdir {out} && ln -s /etc {out}/etc && ln -s {canary} {link}"
        _output(sb.exec(["sh", "-c", plant]))
        with pytest.raises(corral.ArchiveError):
            sb.download(out, tmp_path / "out")
        assert not (tmp_path / "out").exists(), "a refused download must leave nothing"
        assert [p.name for p in tmp_path.iterdir()] == [], "staging folders were left behind"
        # A link may be refused, or resolved inside the sandbox; never on the host.
        try:
            seen = sb.read_file(link)
        except corral.SandboxError:
            pass
        else:
            assert seen != canary.read_bytes(), "read_file followed a link to a host file"
        with contextlib.suppress(corral.SandboxError):
            sb.write_file(link, b"replaced")
        assert canary.read_text() == "host file, untouched", "write_file wrote through a link"

    # -- mounts --------------------------------------------------------------------------

    def test_bind_mounts_are_read_only_by_default(
        self,
        conformance_backend: Backend,
        conformance_settings: Settings,
        conformance_sandbox: Make,
    ) -> None:
        _need(conformance_backend, Capability.BIND_MOUNTS)
        roots = conformance_settings.allowed_mount_roots()
        if not roots:
            pytest.skip("the settings allow no mount root")
        folder = Path(tempfile.mkdtemp(prefix="corral-mount-", dir=roots[0]))
        try:
            (folder / "code.txt").write_text("source\n")
            os.chmod(folder / "code.txt", 0o666)
            os.chmod(folder, 0o777)  # only the mount, not file modes, may stop writes
            sb = conformance_sandbox(mounts=[corral.Mount(str(folder), "/conformance-ro")])
            assert sb.exec(["cat", "/conformance-ro/code.txt"]).stdout == b"source\n"
            for argv in (
                ["touch", "/conformance-ro/new"],
                ["rm", "-f", "/conformance-ro/code.txt"],
                ["sh", "-c", "echo changed > /conformance-ro/code.txt"],
            ):
                assert sb.exec(argv).exit_code != 0, f"{argv} wrote to a read-only mount"
            with pytest.raises(corral.SandboxError):
                sb.write_file("/conformance-ro/by-api", b"x")
            assert sorted(p.name for p in folder.iterdir()) == ["code.txt"]
            assert (folder / "code.txt").read_text() == "source\n"
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- limits and usage ----------------------------------------------------------------

    def test_nofile_limit_is_visible(
        self, conformance_backend: Backend, conformance_sandbox: Make
    ) -> None:
        _need(conformance_backend, Capability.NOFILE_LIMIT)
        sb = conformance_sandbox(nofile=123)
        assert _output(sb.exec(["sh", "-c", "ulimit -n"])).strip() == "123"

    def test_pids_limit_stops_forks(
        self, conformance_backend: Backend, conformance_sandbox: Make
    ) -> None:
        _need(conformance_backend, Capability.PIDS_LIMIT)
        sb = conformance_sandbox(pids=32)
        script = "i=0; while [ $i -lt 64 ]; do sleep 3 & i=$((i+1)); done; wait"
        result = _within(90, lambda: sb.exec(["sh", "-c", script], timeout=30))
        assert b"fork" in result.stderr.lower(), f"64 processes started under pids=32: {result}"
        assert sb.exec(["echo", "ok"], timeout=30).stdout == b"ok\n"

    def test_fork_bomb_is_contained(
        self, conformance_backend: Backend, conformance_sandbox: Make
    ) -> None:
        _need(conformance_backend, Capability.PIDS_LIMIT)
        sb = conformance_sandbox(pids=64)
        bomb = "bomb() { bomb | bomb & }; bomb; sleep 2"
        result = _within(70, lambda: sb.exec(["sh", "-c", bomb], timeout=10))
        assert b"fork" in result.stderr.lower() or result.timed_out, result
        assert sb.exec(["echo", "still here"], timeout=30).stdout == b"still here\n"

    def test_an_oom_kill_counts_in_its_own_exec_only(
        self, conformance_backend: Backend, conformance_sandbox: Make
    ) -> None:
        _need(conformance_backend, Capability.MEMORY_LIMIT)
        sb = conformance_sandbox(memory="32MiB")
        plain = sb.exec(["true"])
        assert (plain.oom_killed, plain.oom_events) == (False, 0), plain
        # A child allocates far past the limit (killed, or refused the memory where the
        # limit is an address-space cap); the command goes on and exits 0 on its own.
        hog = "dd if=/dev/zero of=/dev/null bs=256M count=1 2>/dev/null; echo survived"
        child = sb.exec(["sh", "-c", hog], timeout=60)
        assert child.exit_code == 0 and child.text == "survived\n", child
        assert not child.oom_killed, "a child's OOM kill is not the command's"
        assert child.oom_events in (0, 1), child  # 0 where the backend cannot see kills
        # OOM kills are counted per exec: a later one never inherits an earlier one's.
        after = sb.exec(["true"])
        assert (after.oom_killed, after.oom_events) == (False, 0), after

    def test_usage_reports_the_memory_limit(self, conformance_sandbox: Make) -> None:
        sb = conformance_sandbox(memory="256MiB")
        sb.exec(["true"])
        usage = sb.usage()
        assert isinstance(usage, corral.ResourceUsage)
        assert usage.memory_limit_bytes == 256 * MiB
        assert usage.timestamp > 0
