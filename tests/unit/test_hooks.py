"""Every hook corral calls, seen from plugins, through the real ``subprocess-test`` backend.

The backend comes from the example distribution in tests/plugin_dist (installed into the
test environment); it is not isolating, so each sandbox opts out of isolation explicitly.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import corral
from corral.core import hookspecs
from corral.core.convert import structure
from corral.core.hookcalls import RULES, Rule
from corral.core.plugins import PluginHost
from corral.core.settings import Settings, load_settings
from corral.core.transfer import FileTransfer, Transferred

BACKEND = "subprocess-test"
NOT_ISOLATED = corral.Security(isolate=False, allow_unsafe=("isolate",))

RULE_PHRASES = {
    Rule.REFUSE: "(may-refuse rule)",
    Rule.OBSERVE: "(observer rule)",
    Rule.REGISTER: "(registration rule)",
}

HOOKS_IN_ORDER = [
    "corral_configure",
    "corral_backends",
    "corral_extra_mounts",
    "corral_extra_env",
    "corral_check_spec",
    "corral_sandbox_creating",
    "corral_sandbox_created",
    "corral_exec",
    "corral_process_spawned",
    "corral_transfer",
    "corral_transfer",
    "corral_usage",
    "corral_usage_sampled",
    "corral_health",
    "corral_sandbox_destroying",
    "corral_sandbox_destroyed",
]


def hookspec_names() -> list[str]:
    """Every hook specification in corral.core.hookspecs, found by pluggy's marker."""
    return sorted(
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if getattr(fn, f"{hookspecs.PROJECT}_spec", None) is not None
    )


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Sandboxes in tmp_path/boxes; nothing from the user's files or variables."""
    monkeypatch.chdir(tmp_path)
    boxes = {"backends": {BACKEND: {"root": str(tmp_path / "boxes")}}}
    return load_settings(boxes, cwd=tmp_path, environ={})


@pytest.fixture
def make(global_host: PluginHost, settings: Settings) -> Iterator[Callable[..., corral.Sandbox]]:
    """``corral.create`` on the test backend; every sandbox is closed afterwards."""
    made: list[corral.Sandbox] = []

    def create(**keywords: Any) -> corral.Sandbox:
        sandbox = corral.create(
            backend=BACKEND, security=NOT_ISOLATED, settings=settings, **keywords
        )
        made.append(sandbox)
        return sandbox

    yield create
    for sandbox in made:
        sandbox.close()


def existing(settings: Settings) -> list[str]:
    """Ids of the sandboxes the test backend holds now."""
    return [info.id for info in corral.list(backend=BACKEND, settings=settings)]


# -- lifecycle -------------------------------------------------------------------------


class Recorder:
    """Implements every hook, records each call and changes nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def _record(self, name: str, **arguments: Any) -> None:
        self.calls.append((name, arguments))

    @corral.hookimpl
    def corral_configure(self, settings: Settings) -> None:
        self._record("corral_configure", settings=settings)

    @corral.hookimpl
    def corral_backends(self) -> list[corral.BackendInfo]:
        self._record("corral_backends")
        return []

    @corral.hookimpl
    def corral_extra_mounts(self, spec: corral.SandboxSpec, backend: str) -> list[Any]:
        self._record("corral_extra_mounts", spec=spec, backend=backend)
        return []

    @corral.hookimpl
    def corral_extra_env(self, spec: corral.SandboxSpec, backend: str) -> dict[str, str]:
        self._record("corral_extra_env", spec=spec, backend=backend)
        return {}

    @corral.hookimpl
    def corral_check_spec(self, spec: corral.SandboxSpec, backend: str) -> None:
        self._record("corral_check_spec", spec=spec, backend=backend)

    @corral.hookimpl
    def corral_sandbox_creating(self, spec: Any, sandbox_id: str, backend: str) -> None:
        self._record("corral_sandbox_creating", spec=spec, sandbox_id=sandbox_id, backend=backend)

    @corral.hookimpl
    def corral_sandbox_created(self, sandbox: corral.Sandbox) -> None:
        self._record("corral_sandbox_created", sandbox=sandbox)

    @corral.hookimpl
    def corral_exec(self, sandbox: corral.Sandbox, request: corral.ExecRequest, sink: Any) -> None:
        self._record("corral_exec", sandbox=sandbox, request=request)

    @corral.hookimpl
    def corral_transfer(self, sandbox: corral.Sandbox, transfer: FileTransfer) -> None:
        self._record("corral_transfer", sandbox=sandbox, transfer=transfer)

    @corral.hookimpl
    def corral_usage(self, sandbox: corral.Sandbox) -> None:
        self._record("corral_usage", sandbox=sandbox)

    @corral.hookimpl
    def corral_health(self, sandbox: corral.Sandbox) -> None:
        self._record("corral_health", sandbox=sandbox)

    @corral.hookimpl
    def corral_usage_sampled(self, sandbox: corral.Sandbox, usage: corral.ResourceUsage) -> None:
        self._record("corral_usage_sampled", sandbox=sandbox, usage=usage)

    @corral.hookimpl
    def corral_process_spawned(
        self, sandbox: corral.Sandbox, request: corral.ExecRequest, process_id: str
    ) -> None:
        self._record("corral_process_spawned", request=request, process_id=process_id)

    @corral.hookimpl
    def corral_sandbox_destroying(self, sandbox: corral.Sandbox) -> None:
        self._record("corral_sandbox_destroying", sandbox=sandbox, closed=sandbox.closed)

    @corral.hookimpl
    def corral_sandbox_destroyed(self, sandbox_id: str, backend: str, error: Any) -> None:
        self._record(
            "corral_sandbox_destroyed", sandbox_id=sandbox_id, backend=backend, error=error
        )


def test_every_hook_is_called_in_order(
    global_host: PluginHost, make: Callable[..., corral.Sandbox], settings: Settings
) -> None:
    recorder = Recorder()
    global_host.register(recorder, "recorder")
    sandbox = make(env={"GREETING": "hello"})
    result = sandbox.exec(["sh", "-c", 'echo "$GREETING"; echo oops >&2; exit 3'])
    process = sandbox.spawn(["sh", "-c", 'read -r line; echo "got $line"'])
    process.write("hi\n")
    assert process.wait().stdout == b"got hi\n"
    sandbox.write_file("/note.txt", b"noted")
    assert sandbox.read_file("/note.txt") == b"noted"
    usage = sandbox.usage()
    assert sandbox.health() == corral.Health(status="none")
    sandbox.close()

    assert recorder.names() == HOOKS_IN_ORDER
    assert sorted(set(recorder.names())) == hookspec_names()
    calls = dict(recorder.calls)
    assert calls["corral_configure"]["settings"] is settings
    for name in ("corral_extra_mounts", "corral_extra_env", "corral_check_spec"):
        assert calls[name]["backend"] == BACKEND
    assert calls["corral_sandbox_creating"]["sandbox_id"] == sandbox.id
    assert calls["corral_sandbox_created"]["sandbox"] is sandbox
    assert calls["corral_exec"]["request"].argv[0] == "sh"
    assert calls["corral_process_spawned"]["process_id"] == process.id
    assert calls["corral_usage_sampled"]["usage"] is usage
    transfers = [c["transfer"] for n, c in recorder.calls if n == "corral_transfer"]
    assert [(t.operation, t.path, t.direction) for t in transfers] == [
        ("write_file", "/note.txt", "in"),
        ("read_file", "/note.txt", "out"),
    ]
    assert calls["corral_sandbox_destroying"] == {"sandbox": sandbox, "closed": False}
    assert calls["corral_sandbox_destroyed"] == {
        "sandbox_id": sandbox.id,
        "backend": BACKEND,
        "error": None,
    }
    # The core's own corral_exec answered, through the backend.
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"hello\n", b"oops\n")
    assert existing(settings) == []


class Twin:
    """corral_backends at run time: a second backend, a renamed copy of the test one."""

    def __init__(self, host: PluginHost) -> None:
        base = host.backends()[BACKEND].info.backend
        self.cls = type("TwinBackend", (base,), {"name": "subprocess-twin"})

    @corral.hookimpl
    def corral_backends(self) -> list[corral.BackendInfo]:
        return [corral.BackendInfo("subprocess-twin", self.cls, "a twin, for tests")]


def test_corral_backends_adds_a_backend_that_create_can_select(
    global_host: PluginHost, tmp_path: Path
) -> None:
    twin = Twin(global_host)
    global_host.register(twin, "twin", "twin-dist")
    record = global_host.backends()["subprocess-twin"]
    assert (record.plugin, record.distribution) == ("twin", "twin-dist")
    settings = load_settings(
        {"backends": {"subprocess-twin": {"root": str(tmp_path / "twins")}}},
        cwd=tmp_path,
        environ={},
    )
    with corral.create(backend="subprocess-twin", security=NOT_ISOLATED, settings=settings) as sb:
        assert type(sb.backend) is twin.cls
        assert sb.labels["corral.backend"] == "subprocess-twin"
        assert sb.exec(["echo", "twin"]).text == "twin\n"
        assert (tmp_path / "twins" / sb.id).is_dir()
    assert corral.list(backend="subprocess-twin", settings=settings) == []


# -- configuration ---------------------------------------------------------------------


@attrs.frozen
class GreetingSettings:
    """``[plugins.greeting]`` of the test plugin below."""

    word: str = "hello"


class Greeting:
    """corral_configure: reads its own table, and puts the word in every sandbox's env."""

    def __init__(self) -> None:
        self.given: list[Settings] = []
        self.word = "unconfigured"

    @corral.hookimpl
    def corral_configure(self, settings: Settings) -> None:
        self.given.append(settings)
        table = settings.plugins.get("greeting", {})
        self.word = structure(table, GreetingSettings, "plugins.greeting").word

    @corral.hookimpl
    def corral_extra_env(self, spec: Any, backend: str) -> dict[str, str]:
        return {"GREETING": self.word}


def test_corral_configure_gives_each_plugin_its_own_table_once(
    global_host: PluginHost, make: Callable[..., corral.Sandbox], settings: Settings
) -> None:
    greeting = Greeting()
    global_host.register(greeting, "greeting")
    first = make()
    assert first.spec.env["GREETING"] == "hello"
    # Equal settings, even a new object, do not call it again.
    twin = load_settings({"backends": settings.backends}, cwd=Path.cwd(), environ={})
    assert twin == settings and twin is not settings
    corral.create(backend=BACKEND, security=NOT_ISOLATED, settings=twin).close()
    assert greeting.given == [settings]
    # Other settings do, and the plugin reads its table from them.
    other = attrs.evolve(settings, plugins={"greeting": {"word": "bonjour"}})
    with corral.create(backend=BACKEND, security=NOT_ISOLATED, settings=other) as sb:
        assert sb.exec(["sh", "-c", 'echo "$GREETING"']).text == "bonjour\n"
    assert greeting.given == [settings, other]
    # attach configures too: the settings in force become the first ones again.
    corral.attach(first.id, backend=BACKEND, settings=settings).detach()  # `first` closes it
    assert greeting.given == [settings, other, settings]
    assert greeting.word == "hello"


def test_corral_configure_is_replayed_to_a_plugin_registered_later(
    global_host: PluginHost, make: Callable[..., corral.Sandbox], settings: Settings
) -> None:
    make()
    late = Greeting()
    global_host.register(late, "late")
    assert late.given == [settings]
    assert make().spec.env["GREETING"] == "hello"
    assert late.given == [settings]


def test_a_plugin_refusing_its_table_fails_the_create_before_anything_is_made(
    global_host: PluginHost, make: Callable[..., corral.Sandbox], settings: Settings
) -> None:
    greeting = Greeting()
    global_host.register(greeting, "greeting")
    bad = attrs.evolve(settings, plugins={"greeting": {"wrod": "hi"}})
    for _ in range(2):  # refused settings are not remembered as given
        with pytest.raises(corral.ConfigError, match=r"plugins\.greeting\.wrod: unknown setting"):
            corral.create(backend=BACKEND, security=NOT_ISOLATED, settings=bad)
    assert existing(settings) == []
    assert len(greeting.given) == 2
    # A plugin registered now is replayed the refused settings, refuses them, and is
    # not left half-registered.
    with pytest.raises(corral.PluginError, match="cannot be registered"):
        global_host.register(Greeting(), "late")
    assert "late" not in {p.name for p in global_host.plugins()}
    assert make().spec.env["GREETING"] == "hello"


# -- exec: wrappers and replacements ---------------------------------------------------


class Shouting:
    """A wrapper=True corral_exec: sees the core's result and replaces it."""

    def __init__(self) -> None:
        self.seen: list[corral.ExecResult] = []

    @corral.hookimpl(wrapper=True)
    def corral_exec(self, sandbox: Any, request: Any, sink: Any) -> Any:
        result = yield
        self.seen.append(result)
        return attrs.evolve(result, stdout=result.stdout.upper())


def test_a_corral_exec_wrapper_sees_and_replaces_the_result(
    global_host: PluginHost, make: Callable[..., corral.Sandbox]
) -> None:
    wrapper = Shouting()
    global_host.register(wrapper, "shouting")
    result = make().exec(["echo", "quiet please"])
    assert [r.stdout for r in wrapper.seen] == [b"quiet please\n"]
    assert result.stdout == b"QUIET PLEASE\n"
    assert result.exit_code == 0


class Replay:
    """A tryfirst corral_exec that answers from a recording: the backend never runs it."""

    recorded = {("touch", "marker"): corral.ExecResult(exit_code=0, stdout=b"from the tape")}

    def __init__(self) -> None:
        self.replayed: list[tuple[str, ...]] = []

    @corral.hookimpl(tryfirst=True)
    def corral_exec(self, sandbox: Any, request: Any, sink: Any) -> Any:
        result = self.recorded.get(request.argv)
        if result is not None:
            self.replayed.append(request.argv)
        return result


def test_a_tryfirst_corral_exec_short_circuits_the_backend(
    global_host: PluginHost, make: Callable[..., corral.Sandbox]
) -> None:
    replay = Replay()
    global_host.register(replay, "replay")
    sandbox = make()
    assert sandbox.exec(["touch", "marker"]).stdout == b"from the tape"
    assert replay.replayed == [("touch", "marker")]
    # Anything not recorded falls through to the backend, which never made the marker.
    listing = sandbox.exec(["ls", "-a"])
    assert listing.exit_code == 0
    assert "marker" not in listing.text.split()


def test_corral_exec_also_serves_streams(
    global_host: PluginHost, make: Callable[..., corral.Sandbox]
) -> None:
    wrapper = Shouting()
    global_host.register(wrapper, "shouting")
    events = list(make().stream(["sh", "-c", "echo out; echo err >&2"]))
    chunks = [e for e in events if isinstance(e, corral.OutputChunk)]
    seen = sorted((c.stream, c.data) for c in chunks)
    assert seen == [("stderr", b"err\n"), ("stdout", b"out\n")]
    assert isinstance(events[-1], corral.ExecResult)
    assert events[-1].stdout == b"OUT\n"
    assert len(wrapper.seen) == 1


# -- usage -----------------------------------------------------------------------------


class Agent:
    """Answers corral_usage first, and exports every sample."""

    sample = corral.ResourceUsage(memory_bytes=123, pids=2)

    def __init__(self) -> None:
        self.exported: list[corral.ResourceUsage] = []

    @corral.hookimpl(tryfirst=True)
    def corral_usage(self, sandbox: Any) -> corral.ResourceUsage:
        return self.sample

    @corral.hookimpl
    def corral_usage_sampled(self, sandbox: Any, usage: corral.ResourceUsage) -> None:
        self.exported.append(usage)


def test_corral_usage_can_be_answered_by_a_plugin_and_corral_usage_sampled_exports_it(
    global_host: PluginHost, make: Callable[..., corral.Sandbox]
) -> None:
    agent = Agent()
    global_host.register(agent, "agent")
    assert make().usage() is Agent.sample
    assert agent.exported == [Agent.sample]


# -- file transfers and health --------------------------------------------------------


class TransferLog:
    """A wrapper=True corral_transfer, as an audit plugin would write it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, int]] = []

    @corral.hookimpl(wrapper=True)
    def corral_transfer(self, sandbox: Any, transfer: FileTransfer) -> Any:
        done: Transferred = yield
        self.seen.append((transfer.operation, transfer.direction, transfer.path, done.size))
        return done


def test_every_file_transfer_goes_through_corral_transfer_with_its_bytes(
    global_host: PluginHost, make: Callable[..., corral.Sandbox], tmp_path: Path
) -> None:
    log = TransferLog()
    global_host.register(log, "transfers")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "a.txt").write_bytes(b"x" * 1000)
    sandbox = make()
    sandbox.write_file("/hello.txt", "hello")
    assert sandbox.read_file("/hello.txt") == b"hello"
    sandbox.upload(tmp_path / "project", "/")
    copied = sandbox.download("/project", tmp_path / "back")
    assert (copied / "a.txt").read_bytes() == b"x" * 1000
    operations = [(op, way, path) for op, way, path, _ in log.seen]
    assert operations == [
        ("write_file", "in", "/hello.txt"),
        ("read_file", "out", "/hello.txt"),
        ("upload", "in", "/"),
        ("download", "out", "/project"),
    ]
    sizes = [size for *_, size in log.seen]
    assert sizes[:2] == [5, 5]  # the file's content
    assert all(size >= 1000 and size % 512 == 0 for size in sizes[2:])  # the tar stream


class ReadOnlyEtc:
    """A policy corral_transfer: nothing may be copied into /etc."""

    @corral.hookimpl(tryfirst=True)
    def corral_transfer(self, sandbox: Any, transfer: FileTransfer) -> None:
        if transfer.direction == "in" and transfer.path.startswith("/etc/"):
            raise corral.PolicyError(f"{transfer.path}: not writable by policy")


def test_corral_transfer_can_refuse_a_copy_before_anything_is_written(
    global_host: PluginHost, make: Callable[..., corral.Sandbox]
) -> None:
    global_host.register(ReadOnlyEtc(), "read-only-etc")
    sandbox = make()
    sandbox.exec(["mkdir", "-p", "etc"])
    with pytest.raises(corral.PolicyError, match="/etc/motd: not writable by policy"):
        sandbox.write_file("/etc/motd", "hi")
    with pytest.raises(corral.NotFoundError):
        sandbox.read_file("/etc/motd")
    sandbox.write_file("/motd", "hi")  # elsewhere, the core answers as before


class HealthProbe:
    """Answers corral_health first, from a probe of its own."""

    @corral.hookimpl(tryfirst=True)
    def corral_health(self, sandbox: Any) -> corral.Health:
        return corral.Health(status="unhealthy", failing_streak=3, last_output="probe says no")


def test_corral_health_can_be_answered_by_a_plugin(
    global_host: PluginHost, make: Callable[..., corral.Sandbox]
) -> None:
    sandbox = make()
    assert sandbox.health().status == "none"  # the core's answer, from the backend
    global_host.register(HealthProbe(), "probe")
    assert sandbox.health() == corral.Health("unhealthy", 3, "probe says no")


# -- contributions and checks at create ------------------------------------------------


class Contributor:
    """corral_extra_mounts and corral_extra_env, as a repository plugin would use them."""

    def __init__(self, mounts: list[Any], env: dict[str, str]) -> None:
        self.mounts, self.env = mounts, env

    @corral.hookimpl
    def corral_extra_mounts(self, spec: Any, backend: str) -> list[Any]:
        return self.mounts

    @corral.hookimpl
    def corral_extra_env(self, spec: Any, backend: str) -> dict[str, str]:
        return self.env


def test_corral_extra_mounts_and_corral_extra_env_land_in_the_spec(
    global_host: PluginHost, make: Callable[..., corral.Sandbox], tmp_path: Path
) -> None:
    (tmp_path / "repo").mkdir()
    contributor = Contributor(
        mounts=[corral.Tmpfs("/cache", size="1m"), corral.Mount("repo", "/repo")],
        env={"FROM_PLUGIN": "1", "SHARED": "from the plugin"},
    )
    global_host.register(contributor, "contributor")
    sandbox = make(env={"SHARED": "from the spec"}, mounts=[corral.Tmpfs("/tmp")])
    assert sandbox.spec.env == {"FROM_PLUGIN": "1", "SHARED": "from the spec"}
    targets = [m.target for m in sandbox.spec.mounts]
    assert targets == ["/tmp", "/cache", "/repo"]
    # A contributed bind mount goes through the same policy: its source is resolved.
    assert sandbox.spec.mounts[2].source == str((tmp_path / "repo").resolve())
    printed = sandbox.exec(["sh", "-c", 'echo "$FROM_PLUGIN/$SHARED"']).text
    assert printed == "1/from the spec\n"


def test_a_contributed_sensitive_mount_is_refused(
    global_host: PluginHost, make: Callable[..., corral.Sandbox], settings: Settings
) -> None:
    global_host.register(Contributor([corral.Mount("/etc", "/host-etc")], {}), "contributor")
    with pytest.raises(corral.PolicyError, match="is a system folder"):
        make()
    assert existing(settings) == []


class Refuser:
    """A policy plugin: corral_check_spec refuses any sandbox with a network."""

    def __init__(self) -> None:
        self.checked: list[corral.SandboxSpec] = []
        self.created = 0

    @corral.hookimpl
    def corral_check_spec(self, spec: corral.SandboxSpec, backend: str) -> None:
        self.checked.append(spec)
        if spec.network.mode != "none":
            raise corral.PolicyError("this service allows no network")

    @corral.hookimpl
    def corral_sandbox_creating(self, spec: Any, sandbox_id: str, backend: str) -> None:
        self.created += 1


def test_corral_check_spec_can_refuse_before_anything_is_made(
    global_host: PluginHost, make: Callable[..., corral.Sandbox], settings: Settings
) -> None:
    refuser = Refuser()
    global_host.register(Contributor([], {"ADDED": "1"}), "contributor")
    global_host.register(refuser, "refuser")
    with pytest.raises(corral.PolicyError, match="allows no network"):
        make(network="bridge")
    assert refuser.created == 0
    assert existing(settings) == []
    # It saw the final spec, contributions included; without a network it passes.
    assert refuser.checked[0].env == {"ADDED": "1"}
    assert make().spec.network.mode == "none"
    assert len(existing(settings)) == 1


class Collector:
    """corral_sandbox_destroying collects a report while the sandbox still exists."""

    def __init__(self) -> None:
        self.reports: list[bytes] = []

    @corral.hookimpl
    def corral_sandbox_destroying(self, sandbox: corral.Sandbox) -> None:
        self.reports.append(sandbox.read_file("/report.txt"))


def test_corral_sandbox_destroying_can_still_use_the_sandbox(
    global_host: PluginHost, make: Callable[..., corral.Sandbox], settings: Settings
) -> None:
    collector = Collector()
    global_host.register(collector, "collector")
    sandbox = make()
    sandbox.write_file("/report.txt", b"all green")
    sandbox.close()
    assert collector.reports == [b"all green"]
    assert sandbox.closed
    assert existing(settings) == []


# -- failures of observers -------------------------------------------------------------


class BrokenObserver:
    """Every notification that must not break the caller, raising."""

    @corral.hookimpl
    def corral_sandbox_destroying(self, sandbox: Any) -> None:
        raise RuntimeError("destroying observer broke")

    @corral.hookimpl
    def corral_sandbox_destroyed(self, sandbox_id: str, backend: str, error: Any) -> None:
        raise RuntimeError("destroyed observer broke")

    @corral.hookimpl
    def corral_usage_sampled(self, sandbox: Any, usage: Any) -> None:
        raise RuntimeError("exporter broke")

    @corral.hookimpl
    def corral_process_spawned(self, sandbox: Any, request: Any, process_id: str) -> None:
        raise RuntimeError("spawn observer broke")


def test_a_raising_observer_does_not_break_close_or_usage(
    global_host: PluginHost,
    make: Callable[..., corral.Sandbox],
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    global_host.register(BrokenObserver(), "broken")
    sandbox = make()
    assert sandbox.usage() == corral.ResourceUsage()
    with caplog.at_level(logging.ERROR, logger="corral"):
        process = sandbox.spawn(["echo", "spawned"])
        assert process.wait().stdout == b"spawned\n"
        sandbox.close()
    assert sandbox.closed
    assert existing(settings) == []
    logged = caplog.text
    assert "plugin 'broken' failed in corral_sandbox_destroyed" in logged
    assert "plugin 'broken' failed in corral_sandbox_destroying" in logged
    assert "plugin 'broken' failed in corral_process_spawned" in logged
    with pytest.raises(corral.SandboxClosedError):
        sandbox.exec(["true"])


class Tally:
    """A well-behaved observer of the same hooks as BrokenObserver."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @corral.hookimpl
    def corral_sandbox_destroying(self, sandbox: Any) -> None:
        self.seen.append("destroying")

    @corral.hookimpl
    def corral_sandbox_destroyed(self, sandbox_id: str, backend: str, error: Any) -> None:
        self.seen.append("destroyed")

    @corral.hookimpl
    def corral_usage_sampled(self, sandbox: Any, usage: Any) -> None:
        self.seen.append("usage_sampled")


def test_a_raising_observer_does_not_keep_the_others_from_being_told(
    global_host: PluginHost, make: Callable[..., corral.Sandbox]
) -> None:
    tally = Tally()
    global_host.register(tally, "tally")
    global_host.register(BrokenObserver(), "broken")  # registered last: called first
    sandbox = make()
    sandbox.usage()
    sandbox.close()
    assert tally.seen == ["usage_sampled", "destroying", "destroyed"]


class FailingCreated:
    @corral.hookimpl
    def corral_sandbox_created(self, sandbox: corral.Sandbox) -> None:
        self.sandbox = sandbox
        raise RuntimeError("registry is down")


def test_a_failing_corral_sandbox_created_destroys_the_sandbox(
    global_host: PluginHost, make: Callable[..., corral.Sandbox], settings: Settings
) -> None:
    failing = FailingCreated()
    global_host.register(failing, "failing", "failing-dist")
    # A plugin's bug (not a SandboxError) reaches the caller as an InternalError that
    # names the plugin and its distribution, chained to what it raised.
    with pytest.raises(corral.InternalError) as raised:
        make()
    error = raised.value
    assert "plugin 'failing' from failing-dist failed in corral_sandbox_created" in str(error)
    assert "RuntimeError: registry is down" in str(error)
    assert error.fix == "report it to the authors of failing-dist"
    assert isinstance(error.__cause__, RuntimeError)
    assert failing.sandbox.closed
    assert existing(settings) == []


class FailingCreating:
    @corral.hookimpl
    def corral_sandbox_creating(self, spec: Any, sandbox_id: str, backend: str) -> None:
        raise corral.PolicyError("quota reached")


def test_a_failing_corral_sandbox_creating_aborts_the_create(
    global_host: PluginHost, make: Callable[..., corral.Sandbox], settings: Settings
) -> None:
    global_host.register(FailingCreating(), "failing")
    with pytest.raises(corral.PolicyError, match="quota reached"):
        make()
    assert existing(settings) == []


def test_without_opting_out_of_isolation_the_test_backend_is_refused(
    global_host: PluginHost, settings: Settings
) -> None:
    with pytest.raises(corral.CapabilityError, match="needs ISOLATION"):
        corral.create(backend=BACKEND, settings=settings)
    assert existing(settings) == []


# -- the contract is complete ----------------------------------------------------------


def test_every_hookspec_is_tested_and_documented() -> None:
    names = hookspec_names()
    assert names == sorted(set(HOOKS_IN_ORDER))
    source = Path(__file__).read_text()
    for name in names:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "Added in" in doc, f"{name} does not say when it was added"
        assert "Example" in doc, f"{name} has no example"
        uses = source.count(f"def {name}(")
        assert uses >= 2, f"{name} is implemented by fewer than two test plugins here"
        # Its error rule is stated once, in RULES, and said in its docstring.
        phrase = RULE_PHRASES[RULES[name]]
        assert "May raise:" in doc and phrase in doc, f"{name} does not say: {phrase}"
