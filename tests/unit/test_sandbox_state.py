"""A Sandbox handle's state is one value (SandboxState), moved by named transitions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import corral
from corral.core.plugins import get_host
from corral.core.sandbox import SandboxState
from corral.testing import FakeBackend


class StateWatcher:
    """Records the handle's state as each hook sees it."""

    def __init__(self, close_again: bool = False) -> None:
        self.seen: list[tuple[str, SandboxState]] = []
        self.close_again = close_again

    @corral.hookimpl
    def corral_sandbox_created(self, sandbox: corral.Sandbox) -> None:
        self.seen.append(("created", sandbox.state))

    @corral.hookimpl(wrapper=True)
    def corral_exec(self, sandbox: corral.Sandbox, request: Any, sink: Any) -> Any:
        self.seen.append(("exec", sandbox.state))
        result = yield
        self.seen.append(("executed", sandbox.state))
        return result

    @corral.hookimpl
    def corral_sandbox_destroying(self, sandbox: corral.Sandbox) -> None:
        self.seen.append(("destroying", sandbox.state))
        if self.close_again:
            sandbox.close()  # re-entrant: returns at once, the close in progress goes on


@pytest.fixture
def watch() -> Iterator[Any]:
    watchers: list[StateWatcher] = []

    def register(**options: Any) -> StateWatcher:
        watchers.append(StateWatcher(**options))
        get_host().register(watchers[-1], f"watcher-{len(watchers)}")
        return watchers[-1]

    yield register
    for n in range(len(watchers)):
        get_host().unregister(f"watcher-{n + 1}")


def test_a_created_sandbox_runs_until_closed(
    fake_backend: FakeBackend, clean_settings: corral.Settings, watch: Any
) -> None:
    watcher = watch(close_again=True)
    sandbox = corral.create(backend="fake", settings=clean_settings)
    assert sandbox.state is SandboxState.RUNNING
    assert "(running)" in repr(sandbox)
    sandbox.close()
    assert sandbox.state is SandboxState.CLOSED and sandbox.closed
    assert "(closed)" in repr(sandbox)
    assert watcher.seen == [
        ("created", SandboxState.RUNNING),
        ("destroying", SandboxState.CLOSING),
    ]
    assert [c.method for c in fake_backend.calls].count("destroy") == 1
    sandbox.close()  # idempotent
    assert [c.method for c in fake_backend.calls].count("destroy") == 1


def test_run_moves_its_sandbox_from_pending_to_spent(
    fake_backend: FakeBackend, clean_settings: corral.Settings, watch: Any
) -> None:
    fake_backend.script(["true"])
    watcher = watch()
    assert corral.run(["true"], backend="fake", settings=clean_settings).ok
    assert watcher.seen == [
        ("created", SandboxState.PENDING),
        ("exec", SandboxState.PENDING),
        ("executed", SandboxState.SPENT),
        ("destroying", SandboxState.CLOSING),
    ]
    # run_once removed it: the close asks the backend for nothing more.
    assert [c.method for c in fake_backend.calls] == ["create", "exec", "destroy"]


def test_a_closed_sandbox_refuses_every_use(
    fake_backend: FakeBackend, clean_settings: corral.Settings
) -> None:
    sandbox = corral.create(backend="fake", settings=clean_settings)
    sandbox.close()
    uses = [
        lambda: sandbox.exec(["true"]),
        lambda: sandbox.write_file("/f", "x"),
        lambda: sandbox.read_file("/f"),
        sandbox.usage,
        sandbox.health,
        sandbox.detach,
    ]
    for use in uses:
        with pytest.raises(corral.SandboxClosedError):
            use()
