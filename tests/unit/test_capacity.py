"""The capacity cap (THREATS T42): slots per backend, counted from create to close."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import attrs
import pytest

import corral
from corral.core import capacity
from corral.testing import FakeBackend

Make = Callable[..., corral.Sandbox]


def _settings(max_sandboxes: int | None = None, capacity_wait: float = 0.0) -> corral.Settings:
    return corral.load_settings(
        {"max_sandboxes": max_sandboxes, "capacity_wait": capacity_wait}, environ={}
    )


def _backend() -> str:
    """A backend name of the test's own: the counts are per process and per name."""
    return f"test-{uuid.uuid4().hex[:8]}"


def _claim(backend: str, settings: corral.Settings, lifetime: float = 3600.0) -> str:
    sandbox_id = uuid.uuid4().hex[:16]
    capacity.claim(backend, sandbox_id, time.time() + lifetime, settings)
    return sandbox_id


# -- settings and the error -----------------------------------------------------------------


def test_no_cap_and_no_wait_by_default() -> None:
    settings = corral.load_settings(environ={})
    assert (settings.max_sandboxes, settings.capacity_wait) == (None, 0.0)


def test_the_settings_come_from_variables_too() -> None:
    environ = {"CORRAL_MAX_SANDBOXES": "32", "CORRAL_CAPACITY_WAIT": "1m"}
    settings = corral.load_settings(environ=environ)
    assert (settings.max_sandboxes, settings.capacity_wait) == (32, 60.0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_sandboxes": 0}, "max_sandboxes"),
        ({"max_sandboxes": -3}, "max_sandboxes"),
        ({"max_sandboxes": "32"}, "max_sandboxes"),
        ({"max_sandboxes": True}, "max_sandboxes"),
        ({"capacity_wait": -1}, "capacity_wait"),
        ({"capacity_wait": "soon"}, "capacity_wait"),
        ({"capacity_wait": "2d"}, "capacity_wait"),
    ],
)
def test_bad_values_are_refused_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(corral.ConfigError, match=field):
        corral.load_settings(overrides, environ={})


def test_the_error_is_a_retryable_resource_limit() -> None:
    error = corral.CapacityError("full", backend="docker")
    assert isinstance(error, corral.ResourceLimitError)
    assert error.retryable and error.category == "resource_limit"
    assert "CapacityError" in corral.__all__


# -- the slots --------------------------------------------------------------------------------


def test_past_the_cap_a_claim_fails_at_once_and_a_release_frees_a_slot() -> None:
    backend, settings = _backend(), _settings(2)
    first, _ = _claim(backend, settings), _claim(backend, settings)
    started = time.monotonic()
    with pytest.raises(corral.CapacityError, match="max_sandboxes") as refused:
        _claim(backend, settings)
    assert time.monotonic() - started < 0.5, "no capacity_wait: no waiting"
    assert refused.value.backend == backend and refused.value.retryable
    assert capacity.held(backend) == 2
    capacity.release(backend, first)
    capacity.release(backend, first)  # twice, or an id that never claimed: nothing
    capacity.release(backend, "never-claimed")
    assert capacity.held(backend) == 1
    _claim(backend, settings)
    assert capacity.held(backend) == 2


def test_each_backend_has_its_own_slots() -> None:
    one, other, settings = _backend(), _backend(), _settings(1)
    _claim(one, settings)
    _claim(other, settings)  # not refused: another backend's slot
    with pytest.raises(corral.CapacityError):
        _claim(one, settings)


def test_without_a_cap_every_claim_is_counted() -> None:
    backend = _backend()
    ids = [_claim(backend, _settings()) for _ in range(50)]
    assert capacity.held(backend) == 50
    # A cap set later counts the sandboxes already open.
    with pytest.raises(corral.CapacityError):
        _claim(backend, _settings(50))
    for sandbox_id in ids:
        capacity.release(backend, sandbox_id)
    assert capacity.held(backend) == 0


def test_a_waiting_claim_takes_the_slot_a_close_frees() -> None:
    backend = _backend()
    held = _claim(backend, _settings(1))
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_claim, backend, _settings(1, capacity_wait=30))
        time.sleep(0.3)
        assert not waiting.done(), "the waiter must wait while the slot is taken"
        released = time.monotonic()
        capacity.release(backend, held)
        waiting.result(timeout=10)
        assert time.monotonic() - released < 1.0, "woken by the release, not a poll"
    assert capacity.held(backend) == 1


def test_a_wait_that_ends_without_a_close_raises() -> None:
    backend = _backend()
    _claim(backend, _settings(1))
    started = time.monotonic()
    with pytest.raises(corral.CapacityError, match=r"waited 0\.3s"):
        _claim(backend, _settings(1, capacity_wait=0.3))
    assert 0.3 <= time.monotonic() - started < 2.0


def test_a_sandbox_never_closed_stops_counting_when_its_lifetime_ends() -> None:
    # Its backend removes it then; a dropped handle must not hold a slot for ever.
    backend = _backend()
    _claim(backend, _settings(1), lifetime=0.3)
    with pytest.raises(corral.CapacityError):
        _claim(backend, _settings(1))
    _claim(backend, _settings(1, capacity_wait=5))  # woken by the end of the lifetime
    assert capacity.held(backend) == 1


def test_racing_claims_never_pass_the_cap() -> None:
    backend, settings = _backend(), _settings(32)
    barrier = threading.Barrier(64)

    def one(_: int) -> str:
        barrier.wait()
        try:
            _claim(backend, settings)
            return "ok"
        except corral.CapacityError:
            return "refused"

    with ThreadPoolExecutor(64) as pool:
        outcomes = list(pool.map(one, range(64)))
    assert (outcomes.count("ok"), outcomes.count("refused")) == (32, 32)
    assert capacity.held(backend) == 32


# -- through corral.create, on the fake backend ---------------------------------------------------


@pytest.fixture
def capped(
    fake_backend: FakeBackend, clean_settings: corral.Settings
) -> Callable[..., corral.Settings]:
    """Settings allowing ``room`` more fake sandboxes than this process holds now (other
    tests may have left some unclosed)."""

    def settings(room: int, **more: object) -> corral.Settings:
        return attrs.evolve(clean_settings, max_sandboxes=capacity.held("fake") + room, **more)

    return settings


def _creates(fake_backend: FakeBackend) -> int:
    return sum(1 for c in fake_backend.calls if c.method == "create")


def test_create_past_the_cap_creates_nothing_and_close_frees_a_slot(
    fake_backend: FakeBackend, capped: Callable[..., corral.Settings]
) -> None:
    settings = capped(2)
    first = corral.create(backend="fake", settings=settings)
    second = corral.create(backend="fake", settings=settings)
    with pytest.raises(corral.CapacityError):
        corral.create(backend="fake", settings=settings)
    assert _creates(fake_backend) == 2, "a refused create never reaches the backend"
    first.close()
    first.close()  # idempotent: frees one slot, once
    third = corral.create(backend="fake", settings=settings)
    with pytest.raises(corral.CapacityError):
        corral.create(backend="fake", settings=settings)
    for sb in (second, third):
        sb.close()


def test_a_failed_create_gives_its_slot_back(
    fake_backend: FakeBackend, capped: Callable[..., corral.Settings], monkeypatch
) -> None:
    settings = capped(1)

    def broken(sandbox_id: str, spec: object, labels: object) -> None:
        raise corral.InternalError("the engine broke", backend="fake")

    with monkeypatch.context() as patch:
        patch.setattr(fake_backend, "create", broken)
        for _ in range(3):
            with pytest.raises(corral.InternalError):
                corral.create(backend="fake", settings=settings)
    corral.create(backend="fake", settings=settings).close()


class _RefusesCreated:
    @corral.hookimpl
    def corral_sandbox_created(self, sandbox: corral.Sandbox) -> None:
        raise RuntimeError("an observer broke")


def test_a_failed_created_hook_gives_its_slot_back(
    fake_backend: FakeBackend, capped: Callable[..., corral.Settings]
) -> None:
    from corral.core.plugins import get_host

    settings = capped(1)
    refuser = _RefusesCreated()
    get_host().pm.register(refuser)
    try:
        for _ in range(3):
            # A plugin's bug reaches the caller as corral's InternalError, chained.
            with pytest.raises(corral.InternalError) as failed:
                corral.create(backend="fake", settings=settings)
            assert isinstance(failed.value.__cause__, RuntimeError)
    finally:
        get_host().pm.unregister(refuser)
    corral.create(backend="fake", settings=settings).close()


def test_an_attached_handle_holds_no_slot_and_frees_none(
    fake_backend: FakeBackend, capped: Callable[..., corral.Settings]
) -> None:
    settings = capped(1)
    made = corral.create(backend="fake", settings=settings)
    attached = corral.attach(made.id, backend="fake", settings=settings)
    with pytest.raises(corral.CapacityError):
        corral.create(backend="fake", settings=settings)
    made.close()
    attached.close()  # the sandbox is gone already; its slot was given back once
    corral.create(backend="fake", settings=settings).close()


def test_a_pool_counts_against_the_cap(
    fake_backend: FakeBackend, capped: Callable[..., corral.Settings]
) -> None:
    settings = capped(2)
    with corral.Pool(4, backend="fake", settings=settings) as pool:
        deadline = time.monotonic() + 10
        while (pool.stats().ready < 2 or pool.stats().failures == 0) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.02)
        stats = pool.stats()
        assert stats.ready == 2 and "CapacityError" in (stats.last_error or ""), stats
        with pytest.raises(corral.CapacityError):
            corral.create(backend="fake", settings=settings)
    # The pool's close destroyed its ready sandboxes and gave their slots back.
    corral.create(backend="fake", settings=settings).close()
    corral.create(backend="fake", settings=settings).close()


def test_a_pool_at_the_cap_refills_soon_after_a_close_and_closes_without_waiting(
    fake_backend: FakeBackend, capped: Callable[..., corral.Settings]
) -> None:
    settings = capped(2, capacity_wait=600.0)  # the refill thread must not wait this long
    outside = corral.create(backend="fake", settings=settings)
    pool = corral.Pool(2, backend="fake", settings=settings)
    try:
        _wait_for(lambda: pool.stats().ready == 1 and pool.stats().failures >= 2)
        outside.close()  # a slot frees: the pool takes it within its first backoff
        _wait_for(lambda: pool.stats().ready == 2, within=3.0)
    finally:
        started = time.monotonic()
        pool.close()
    assert time.monotonic() - started < 5.0


def _wait_for(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(0.02)
