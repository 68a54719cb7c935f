"""THREATS.md B10, engine faults (T77, T78, T82): the engine missing, hung, slow, stopped,
restarted in the middle of an exec; an image that is not there. corral reports each
with a clear, correctly classified error, never hangs past its timeouts, and works
again once the engine is back.

Cases that stop or restart an engine use a private one of their own
(``private_engines``), never the shared engines; slow and hung engines are a proxy or
a silent socket in front of (or instead of) the shared ones, which nothing stops.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import private_engines
import pytest
from cases import HANG, fails_with

import corral
from corral.core.plugins import get_host
from corral.core.settings import load_settings

ENGINES = {"docker": "CORRALTEST_DOCKER_URL", "podman": "CORRALTEST_PODMAN_URL"}


@pytest.fixture(params=[pytest.param(name, marks=getattr(pytest.mark, name)) for name in ENGINES])
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def proxy(engine: str, shared_tmp: Path) -> Iterator[private_engines.EngineProxy]:
    """A proxy in front of the shared engine (it only slows or records answers)."""
    url = os.environ.get(ENGINES[engine])
    if not url:
        pytest.fail(f"{ENGINES[engine]} is not set; run the suite through ./scripts/test")
    made = private_engines.EngineProxy(url, shared_tmp)
    yield made
    get_host().close()  # the proxied clients' pooled connections, before the proxy goes
    made.stop()


# -- T77: no engine, or one that never answers -------------------------------------------------


def _stale_socket(folder: Path) -> str:
    """A socket file nobody listens on any more (an engine that died)."""
    path = folder / "stale.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.close()
    return str(path)


def _regular_file(path: Path) -> str:
    path.write_text("not a socket\n")
    return str(path)


@pytest.mark.parametrize("where", ["missing", "stale", "not-a-socket"])
def test_no_engine_at_the_socket_is_a_clear_retryable_error(engine, settings_of, shared_tmp, where):
    path = {
        "missing": lambda: str(shared_tmp / "absent.sock"),
        "stale": lambda: _stale_socket(shared_tmp),
        "not-a-socket": lambda: _regular_file(shared_tmp / "engine.sock"),
    }[where]()
    settings = settings_of(engine, url=f"unix://{path}", timeout="5s")
    error = fails_with(
        corral.BackendUnavailableError, lambda: corral.create(backend=engine, settings=settings)
    )
    assert error.retryable and error.category == "unavailable"
    assert error.backend == engine
    assert path in str(error)
    assert "fix: " in str(error)  # the hint: how to get an engine there
    assert "Traceback" not in str(error)
    # The twin: the same settings with the engine's real socket work.
    with corral.create(backend=engine, settings=settings_of(engine)) as sb:
        assert sb.exec(["echo", "ok"]).text == "ok\n"


def test_an_engine_that_never_answers_times_out_as_unavailable(engine, settings_of, shared_tmp):
    silent = private_engines.SilentSocket(shared_tmp)
    try:
        settings = settings_of(engine, url=silent.url, timeout="2s")
        error = fails_with(
            corral.BackendUnavailableError, lambda: corral.create(backend=engine, settings=settings)
        )
    finally:
        get_host().close()
        silent.stop()
    assert error.retryable
    assert str(silent.path) in str(error)


# -- an engine that answers slowly --------------------------------------------------------


def test_a_slow_engine_within_the_timeout_still_works(engine, proxy, settings_of):
    proxy.delay = 0.3  # every answer
    with corral.create(backend=engine, settings=settings_of(engine, url=proxy.url)) as sb:
        sb.write_file("/workspace/a", b"slow but fine")
        assert sb.read_file("/workspace/a") == b"slow but fine"
        assert sb.exec(["echo", "ok"]).text == "ok\n"


def test_an_engine_slower_than_the_timeout_is_a_retryable_timeout_and_recovers(
    engine, proxy, settings_of
):
    settings = settings_of(engine, url=proxy.url, timeout="3s")
    sb = corral.create(backend=engine, settings=settings)
    try:
        proxy.delay, proxy.slow = 3600.0, r"/exec$|/archive"  # held until the proxy stops
        for call in (
            lambda: sb.exec(["echo", "never"]),
            lambda: sb.write_file("/workspace/a", b"never"),
        ):
            error = fails_with(corral.TimeoutError, call)
            assert error.retryable and error.category == "timeout"
            assert error.sandbox_id == sb.id
        # The engine answers in time again: the same handle works.
        proxy.delay = 0.0
        assert sb.exec(["echo", "back"]).text == "back\n"
        sb.write_file("/workspace/a", b"back")
        assert sb.read_file("/workspace/a") == b"back"
    finally:
        sb.close()


def test_a_create_slower_than_the_timeout_leaves_no_container(
    engine, proxy, settings_of, raw_client_of
):
    # The engine makes the container; its answer comes too late, and the clean-up
    # (whose answers are not slowed) removes what the engine made.
    proxy.delay, proxy.slow = 3600.0, r"^POST .*/containers/create"
    settings = settings_of(engine, url=proxy.url, timeout="3s")
    error = fails_with(
        corral.TimeoutError,
        lambda: corral.create(backend=engine, settings=settings, labels={"t": "slow"}),
    )
    assert error.retryable
    assert any(r.startswith("DELETE ") for r in proxy.requests), proxy.requests
    client = raw_client_of(engine)
    try:
        assert client.containers(all=True, filters={"label": "t=slow"}) == []
    finally:
        client.close()


# -- T82: an image that is not there ---------------------------------------------------------

_PULLS = ("/images/create", "/images/pull")


def test_a_missing_image_is_not_found_without_any_pull(engine, proxy, settings_of, test_image):
    settings = settings_of(engine, url=proxy.url, pull="never")
    image = "corral-test/no-such-image:1"
    error = fails_with(
        corral.NotFoundError, lambda: corral.create(image, backend=engine, settings=settings)
    )
    assert image in str(error) and "'never'" in str(error)
    assert not error.retryable
    assert not [r for r in proxy.requests if any(p in r for p in _PULLS)], proxy.requests
    assert not [r for r in proxy.requests if "/containers/create" in r]  # nothing made
    # The twin: an image the engine has, under the same policy.
    with corral.create(test_image, backend=engine, settings=settings) as sb:
        assert sb.exec(["echo", "ok"]).text == "ok\n"


def test_a_pull_from_an_unreachable_registry_is_not_found(engine, proxy, settings_of):
    # A registry on loopback where nothing listens: the pull is tried and refused,
    # and nothing leaves the machine.
    image = "127.0.0.1:9/corral-test/nowhere:1"
    settings = settings_of(engine, url=proxy.url, pull="always")
    error = fails_with(
        corral.NotFoundError, lambda: corral.create(image, backend=engine, settings=settings)
    )
    assert image in str(error) and "'always'" in str(error)
    assert [r for r in proxy.requests if any(p in r for p in _PULLS)], "no pull was tried"
    assert not [r for r in proxy.requests if "/containers/create" in r]


# -- T78 and the rest: a private engine stopped, restarted ------------------------------------


@pytest.fixture
def private(engine: str, request: pytest.FixtureRequest) -> private_engines.PrivateEngine:
    return private_engines.private_engine(engine, request.config)


@pytest.fixture
def private_settings(
    engine: str, private: private_engines.PrivateEngine, state_dir: Path, mount_root: Path
) -> corral.Settings:
    return load_settings(
        {
            "mount_roots": [str(mount_root)],
            "backends": {
                engine: {
                    "url": private.url,
                    "pull": "never",
                    "default_image": private_engines.IMAGE,
                    "timeout": "10s",
                }
            },
        },
        cwd=state_dir,
        environ={},
    )


def _private_leftovers(engine: str, settings: corral.Settings) -> list[str]:
    return [i.id for i in corral.list(backend=engine, settings=settings)]


@pytest.fixture
def on_private(engine, private, private_settings) -> Iterator[Callable[..., corral.Sandbox]]:
    """``on_private(**keywords)``: a sandbox on the private engine; at the end the engine
    is running again and holds no sandbox of corral's."""
    made: list[corral.Sandbox] = []

    def _make(**keywords: Any) -> corral.Sandbox:
        made.append(corral.create(backend=engine, settings=private_settings, **keywords))
        return made[-1]

    yield _make
    private.start()
    for sb in made:
        sb.close()
    assert _private_leftovers(engine, private_settings) == []


@pytest.mark.destructive
def test_a_stopped_engine_is_unavailable_and_recovers_when_it_is_back(
    engine, private, private_settings, on_private
):
    sb = on_private()
    assert sb.exec(["echo", "up"]).text == "up\n"
    private.stop()
    for call in (
        lambda: sb.exec(["echo", "down"]),
        lambda: sb.write_file("/workspace/a", b"down"),
        lambda: corral.create(backend=engine, settings=private_settings),
    ):
        error = fails_with(corral.BackendUnavailableError, call)
        assert error.retryable
        assert private.url in str(error)
    private.start()
    if engine == "podman":
        # Daemonless: conmon kept the container through the service's absence.
        assert sb.exec(["echo", "still here"]).text == "still here\n"
    else:
        # Without live-restore, dockerd stops its containers when it stops.
        with pytest.raises(corral.NotFoundError) as gone:
            sb.exec(["true"])
        assert not gone.value.retryable
    sb.close()
    sb.close()
    # Recovered: the same settings make and use a new sandbox.
    fresh = on_private()
    fresh.write_file("/workspace/a", b"back")
    assert fresh.read_file("/workspace/a") == b"back"


@pytest.mark.destructive
def test_an_engine_restart_during_a_streaming_exec(engine, private, on_private):
    sb = on_private()
    ticks = 0

    def consume() -> None:
        nonlocal ticks
        for event in sb.stream(["sh", "-c", "while true; do echo tick; sleep 0.2; done"]):
            if isinstance(event, corral.OutputChunk):
                ticks += 1
                if ticks == 3:
                    threading.Thread(target=private.restart, daemon=True).start()

    error = fails_with(corral.SandboxError, consume, HANG + 30)  # a restart takes a while
    assert ticks >= 3
    # The stream broke with the engine: unavailable (it was down), or the exec (and
    # on Docker the container) gone once it was back; never a hang, never a result.
    assert isinstance(error, (corral.BackendUnavailableError, corral.NotFoundError)), repr(error)
    assert error.sandbox_id == sb.id
    deadline = time.monotonic() + HANG
    while not private.running() or not _answers(private):
        assert time.monotonic() < deadline, "the private engine did not come back"
        time.sleep(0.2)
    if engine == "podman":
        # The container survived the service's restart, and the broken exec's command
        # did not: an exec owns its processes even when its stream is cut.
        ps = sb.exec(["ps", "-o", "args"]).text
        assert "while true" not in ps, ps
    else:
        with pytest.raises(corral.NotFoundError):
            sb.exec(["true"])
    sb.close()
    sb.close()


def _answers(private: private_engines.PrivateEngine) -> bool:
    return private_engines._answers(private.socket, private.ping)
