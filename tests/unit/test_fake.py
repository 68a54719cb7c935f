"""The fake backend: scripted results, recorded calls, in-memory files, opt-in registration."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import corral
import corral.testing.fake as fake_module
from corral.core.plugins import PluginHost, get_host
from corral.testing import FakeBackend, fake_of
from corral.testing.fake import ALL_CAPABILITIES

Make = Callable[..., corral.Sandbox]


@pytest.fixture
def make(fake_backend: FakeBackend, clean_settings: corral.Settings) -> Iterator[Make]:
    """``corral.create`` on the fake backend; every sandbox is closed afterwards."""
    made: list[corral.Sandbox] = []

    def create(**keywords: object) -> corral.Sandbox:
        sandbox = corral.create(backend="fake", settings=clean_settings, **keywords)
        made.append(sandbox)
        return sandbox

    yield create
    for sandbox in made:
        sandbox.close()


# -- scripted results ---------------------------------------------------------------------


def test_a_scripted_result_is_returned(fake_backend: FakeBackend, make: Make) -> None:
    fake_backend.script(["python3", "-c"], stdout=b"42\n", stderr="note\n", exit_code=0)
    result = make().exec(["python3", "-c", "print(6 * 7)"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"42\n", b"note\n")
    assert result.text == "42\n" and result.ok


def test_the_latest_matching_rule_wins_and_exact_rules_match_only_exactly(
    fake_backend: FakeBackend, make: Make
) -> None:
    fake_backend.script(["git"], stdout="any git\n")
    fake_backend.script(["git", "status"], stdout="clean\n", exact=True)
    sb = make()
    assert sb.exec(["git", "status"]).text == "clean\n"
    assert sb.exec(["git", "status", "--short"]).text == "any git\n"
    fake_backend.script(["git"], exit_code=128, stderr="fatal\n")
    assert sb.exec(["git", "status"]).exit_code == 128


def test_a_callable_sees_the_request(fake_backend: FakeBackend, make: Make) -> None:
    def upper(request: corral.ExecRequest) -> corral.ExecResult:
        assert request.env["MODE"] == "loud"
        return corral.ExecResult(exit_code=0, stdout=(request.stdin or b"").upper())

    fake_backend.script(["upper"], upper)
    fake_backend.script(["fail"], lambda request: corral.ExecStatus(exit_code=9, signal=9))
    sb = make()
    assert sb.exec(["upper"], stdin=b"quiet", env={"MODE": "loud"}).stdout == b"QUIET"
    failed = sb.exec(["fail"])
    assert (failed.exit_code, failed.signal, failed.stdout) == (9, 9, b"")


def test_unmatched_commands_end_with_127(fake_backend: FakeBackend, make: Make) -> None:
    result = make().exec(["cowsay", "moo"])
    assert result.exit_code == 127
    assert "no scripted result for ['cowsay', 'moo']" in result.stderr_text
    assert "fake.script" in result.stderr_text


def test_timeouts_and_oom_are_reported_as_scripted(fake_backend: FakeBackend, make: Make) -> None:
    fake_backend.script(["slow"], stdout=b"partial", exit_code=137, timed_out=True)
    fake_backend.script(["hungry"], exit_code=137, oom_killed=True)
    fake_backend.script(["parent"], oom_events=1)  # a child was OOM-killed, not the command
    sb = make()
    slow = sb.exec(["slow"], timeout=1)
    assert slow.timed_out and not slow.ok and slow.stdout == b"partial"
    hungry = sb.exec(["hungry"])
    assert hungry.oom_killed and hungry.oom_events == 1
    parent = sb.exec(["parent"])
    assert parent.ok and not parent.oom_killed and parent.oom_events == 1
    assert sb.exec(["slow"]).oom_events == 0


def test_scripted_output_goes_through_the_cap_and_streams(
    fake_backend: FakeBackend, make: Make
) -> None:
    fake_backend.script(["flood"], stdout=b"x" * 100, stderr=b"e")
    sb = make()
    capped = sb.exec(["flood"], max_output=10)
    assert capped.truncated and capped.stdout == b"x" * 10
    events = list(sb.stream(["flood"]))
    assert [type(e).__name__ for e in events] == ["OutputChunk", "OutputChunk", "ExecResult"]
    assert events[0].data == b"x" * 100


# -- calls ----------------------------------------------------------------------------------


def test_every_call_is_recorded_in_order(fake_backend: FakeBackend, make: Make) -> None:
    fake_backend.script(["true"])
    sb = make(env={"A": "1"})
    sb.exec(["true"], timeout=5)
    sb.write_file("/workspace/a.txt", b"a")
    sb.read_file("/workspace/a.txt")
    sb.usage()
    sb.close()
    methods = [c.method for c in fake_backend.calls]
    assert methods == ["create", "exec", "put_archive", "get_archive", "usage", "destroy"]
    assert {c.sandbox_id for c in fake_backend.calls} == {sb.id}
    create, exec_call = fake_backend.calls[0], fake_backend.calls[1]
    assert create.details["spec"].env == {"A": "1"}
    assert create.details["labels"]["corral.sandbox"] == sb.id
    assert exec_call.details["argv"] == ("true",)
    assert exec_call.details["request"].timeout == 5
    method, sandbox_id, details = fake_backend.calls[2]  # a plain tuple, too
    assert (method, sandbox_id) == ("put_archive", sb.id)
    assert details == {"path": "/workspace", "names": ["a.txt"]}
    assert fake_backend.executed() == [("true",)]
    assert fake_backend.executed(sb.id) == [("true",)]


# -- files ----------------------------------------------------------------------------------


def test_files_round_trip(fake_backend: FakeBackend, make: Make, tmp_path: Path) -> None:
    sb = make()
    data = bytes(range(256)) * 4096
    sb.write_file("/workspace/blob", data)
    sb.write_file("/tmp/t.txt", "text")
    assert sb.read_file("/workspace/blob") == data
    assert fake_backend.files(sb.id) == {"/workspace/blob": data, "/tmp/t.txt": b"text"}
    source = tmp_path / "src"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "a.py").write_text("A = 1\n")
    sb.upload(source, "/workspace")
    assert fake_backend.files(sb.id)["/workspace/src/pkg/a.py"] == b"A = 1\n"
    back = sb.download("/workspace/src", tmp_path / "back")
    assert (back / "pkg" / "a.py").read_text() == "A = 1\n"


def test_file_errors_are_those_of_a_real_backend(make: Make) -> None:
    sb = make()
    with pytest.raises(corral.NotFoundError):
        sb.read_file("/workspace/absent")
    with pytest.raises(corral.NotFoundError):
        sb.write_file("/workspace/no/such/folder/f", b"x")
    with pytest.raises(corral.PathSecurityError):
        sb.write_file("/workspace/../etc/passwd", b"x")
    sb.write_file("/workspace/f", b"x")
    with pytest.raises(corral.ConfigError, match="folder, not a file"):
        sb.read_file("/workspace")


# -- lifecycle and state --------------------------------------------------------------------


def test_list_inspect_attach_and_destroy(make: Make, clean_settings: corral.Settings) -> None:
    sb = make(labels={"team": "a"})
    (info,) = corral.list(backend="fake", settings=clean_settings)
    assert (info.id, info.backend, info.status) == (sb.id, "fake", "running")
    assert info.labels["team"] == "a"
    other = corral.attach(sb.id, backend="fake", settings=clean_settings)
    other.detach()
    assert other.spec == sb.spec
    sb.close()
    assert corral.list(backend="fake", settings=clean_settings) == []
    with pytest.raises(corral.NotFoundError):
        other.exec(["true"])
    with pytest.raises(corral.NotFoundError):
        corral.attach(sb.id, backend="fake", settings=clean_settings)


def test_usage_health_pause(fake_backend: FakeBackend, make: Make) -> None:
    fake_backend.script(["true"])
    sb = make(memory="256MiB")
    usage = sb.usage()
    assert usage.memory_limit_bytes == 256 * 1024**2 and usage.timestamp > 0
    assert sb.health().status == "none"
    assert make(healthcheck={"test": ["true"]}).health().status == "healthy"
    fake_backend.pause(sb.id)
    with pytest.raises(corral.ConflictError, match="paused"):
        sb.exec(["true"])
    fake_backend.resume(sb.id)
    assert sb.exec(["true"]).ok


def test_every_capability_is_declared(fake_backend: FakeBackend, make: Make) -> None:
    assert all(cap in fake_backend.capabilities() for cap in corral.Capability)
    assert fake_backend.capabilities() == ALL_CAPABILITIES
    sb = make(cpus=2, disk="1GiB", cputime="10s", mounts=[corral.Tmpfs("/scratch")])
    assert sb.spec.limits.cpus == 2.0


def test_fake_of_gives_the_live_instance(fake_backend: FakeBackend, make: Make) -> None:
    sb = make()
    assert fake_of(sb) is fake_backend
    with pytest.raises(TypeError, match="fake backend"):
        fake_of(SimpleNamespace(backend=object()))  # type: ignore[arg-type]


# -- registration ---------------------------------------------------------------------------


def test_the_fake_is_opt_in_and_unregistering_drops_its_instance() -> None:
    host = PluginHost(environ={"CORRAL_DISABLE_PLUGIN_AUTOLOAD": "1"})
    try:
        assert "fake" not in host.backends()
        host.register(fake_module, "corral.testing.fake", "corral")
        record = host.backends()["fake"]
        assert record.info.backend is FakeBackend and "test double" in record.info.description
        first = host.backend("fake", corral.Settings())
        assert host.backend("fake", corral.Settings()) is first
        host.unregister("corral.testing.fake")
        with pytest.raises(corral.ConfigError, match="not a known backend"):
            host.backend("fake", corral.Settings())
        host.register(fake_module, "corral.testing.fake", "corral")
        assert host.backend("fake", corral.Settings()) is not first
    finally:
        host.close()


def test_the_fixture_registers_for_the_test_only(fake_backend: FakeBackend) -> None:
    host = get_host()
    assert host.backends()["fake"].info.backend is FakeBackend
    assert host.backend("fake", corral.Settings()) is fake_backend
