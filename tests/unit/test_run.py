"""corral.run on the fake backend: the calls it makes, the hooks it fires, what it refuses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import corral
from corral.core.plugins import get_host
from corral.testing import FakeBackend


class _Observer:
    """Records the lifecycle hooks; optionally uses the sandbox or refuses the command."""

    def __init__(self, *, write_on_create: bool = False, refuse: bool = False) -> None:
        self.events: list[str] = []
        self.write_on_create = write_on_create
        self.refuse = refuse

    @corral.hookimpl
    def corral_sandbox_creating(self, spec, sandbox_id, backend):
        self.events.append("creating")

    @corral.hookimpl
    def corral_sandbox_created(self, sandbox):
        self.events.append(f"created:{sandbox.info.status}")
        if self.write_on_create:
            sandbox.write_file("/tmp/seed", b"seed")

    @corral.hookimpl(wrapper=True)
    def corral_exec(self, sandbox, request, sink):
        self.events.append("exec")
        if self.refuse:
            raise corral.PolicyError("not this command")
        return (yield)

    @corral.hookimpl
    def corral_sandbox_destroying(self, sandbox):
        self.events.append("destroying")

    @corral.hookimpl
    def corral_sandbox_destroyed(self, sandbox_id, backend, error):
        self.events.append("destroyed")


@pytest.fixture
def observe() -> Iterator:
    registered: list[_Observer] = []

    def _observe(**options: bool) -> _Observer:
        registered.append(_Observer(**options))
        get_host().pm.register(registered[-1])
        return registered[-1]

    yield _observe
    for observer in registered:
        get_host().pm.unregister(observer)


def _run(settings: corral.Settings, argv: list[str], **keywords: object) -> corral.ExecResult:
    return corral.run(argv, backend="fake", settings=settings, **keywords)


def test_run_is_create_exec_destroy_with_every_hook(
    fake_backend: FakeBackend, clean_settings, observe
):
    fake_backend.script(["greet"], stdout="hi\n", exit_code=3)
    observer = observe()
    result = _run(clean_settings, ["greet"], env={"A": "1"}, timeout=5)
    assert (result.exit_code, result.text) == (3, "hi\n")
    assert [c.method for c in fake_backend.calls] == ["create", "exec", "destroy"]
    create, exec_call, _ = fake_backend.calls
    assert create.details["spec"].env == {"A": "1"}
    assert exec_call.details["request"].timeout == 5
    assert exec_call.details["request"].env["A"] == "1"
    assert observer.events == ["creating", "created:pending", "exec", "destroying", "destroyed"]
    assert corral.list(backend="fake", settings=clean_settings) == []


def test_a_plugin_that_uses_the_sandbox_first_gets_it_made_first(
    fake_backend: FakeBackend, clean_settings, observe
):
    fake_backend.script(["true"])
    observe(write_on_create=True)
    assert _run(clean_settings, ["true"]).ok
    methods = [c.method for c in fake_backend.calls]
    assert methods == ["create", "put_archive", "exec", "destroy"]


def test_a_refused_command_leaves_nothing_made(fake_backend: FakeBackend, clean_settings, observe):
    observer = observe(refuse=True)
    with pytest.raises(corral.PolicyError, match="not this command"):
        _run(clean_settings, ["true"])
    assert fake_backend.calls == [], "nothing was made, so nothing to destroy"
    assert observer.events[-2:] == ["destroying", "destroyed"]


def test_a_failing_run_is_cleaned_up(fake_backend: FakeBackend, clean_settings):
    def boom(request):
        raise corral.InternalError("the backend broke mid-command")

    fake_backend.script(["crash"], boom)
    with pytest.raises(corral.InternalError, match="mid-command"):
        _run(clean_settings, ["crash"])
    assert [c.method for c in fake_backend.calls][-1] == "destroy"
    assert corral.list(backend="fake", settings=clean_settings) == []


def test_keywords_are_checked(fake_backend: FakeBackend, clean_settings, observe):
    observer = observe()
    with pytest.raises(corral.ConfigError, match="command"):
        _run(clean_settings, ["true"], command=["sleep", "1"])
    with pytest.raises(corral.ConfigError, match="nonsense"):
        _run(clean_settings, ["true"], nonsense=1)
    with pytest.raises(corral.ConfigError, match="argv"):
        _run(clean_settings, [])
    with pytest.raises(corral.ConfigError, match="timeout"):
        _run(clean_settings, ["true"], timeout=-1)
    assert fake_backend.calls == []
    assert observer.events == [], "no hook saw a sandbox for a command that could not run"
