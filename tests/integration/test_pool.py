"""Warm pools against real sandboxes: filling, hand-out, exhaustion, health, shutdown."""

from __future__ import annotations

import ast
import gc
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

import corral
from corral.core.pool import PoolStats

DEADLINE = 60.0  # generous: a slow machine is not a failure, a pool that never fills is


def _until(pool: corral.Pool, check: Callable[[PoolStats], bool]) -> PoolStats:
    """Poll the pool's stats until ``check`` holds; fail past the deadline."""
    end = time.monotonic() + DEADLINE
    while True:
        stats = pool.stats()
        if check(stats):
            return stats
        assert time.monotonic() < end, f"the pool never got there: {stats}"
        time.sleep(0.02)


def _filled(pool: corral.Pool) -> PoolStats:
    return _until(pool, lambda s: s.ready == pool.size)


def _ids(backend: str, settings: corral.Settings, mark: str | None = None) -> set[str]:
    """Ids of the backend's sandboxes; with ``mark``, only those labelled with it (an engine
    may be shared with other test runs)."""
    return {
        info.id
        for info in corral.list(backend=backend, settings=settings)
        if mark is None or info.labels.get("test.pool") == mark
    }


@pytest.fixture
def pool(settings: corral.Settings) -> Iterator[Callable[..., corral.Pool]]:
    """``pool(size, **keywords)`` makes a local pool; at the end, proves nothing leaked."""
    made: list[corral.Pool] = []

    def _pool(size: int, **keywords: object) -> corral.Pool:
        keywords.setdefault("settings", settings)
        made.append(corral.Pool(size, backend="local", **keywords))
        return made[-1]

    yield _pool
    for p in made:
        p.close()
    assert _ids("local", settings) == set(), "a pooled sandbox leaked"


# -- local backend -----------------------------------------------------------------------


@pytest.mark.local
def test_fills_to_size_and_hands_out_working_sandboxes(pool, settings):
    p = pool(3)
    stats = _filled(p)
    assert (stats.in_use, stats.failures, stats.last_error) == (0, 0, None)
    assert len(_ids("local", settings)) == 3
    with p.acquire() as sandbox:
        assert sandbox.exec(["echo", "hi"]).text == "hi\n"
        assert sandbox.id in _ids("local", settings)
        assert p.stats().in_use == 1
    assert sandbox.closed
    assert sandbox.id not in _ids("local", settings)
    stats = _filled(p)  # refilled in the background
    assert (stats.in_use, stats.created, stats.destroyed) == (0, 4, 1)


@pytest.mark.local
def test_nothing_leaks_from_one_user_to_the_next(pool):
    p = pool(1)
    with p.acquire() as first:
        first.write_file("/tmp/secret", b"mine")
        assert first.read_file("/tmp/secret") == b"mine"
    with p.acquire() as second:
        assert second.id != first.id
        assert second.exec(["test", "-e", "/tmp/secret"]).exit_code == 1


@pytest.mark.local
def test_an_error_in_the_block_still_destroys_the_sandbox(pool, settings):
    p = pool(1)
    with pytest.raises(RuntimeError, match="user's own"), p.acquire() as sandbox:
        raise RuntimeError("the user's own error")
    assert sandbox.closed and sandbox.id not in _ids("local", settings)
    assert p.stats().in_use == 0


# A mount of /etc passes the up-front checks but is refused by policy at every creation:
# the surest way to keep a pool from ever filling.
REFUSED = {"mounts": [corral.Mount("/etc", "/mnt/etc")]}


@pytest.mark.local
def test_fail_policy_raises_at_once_when_empty(pool):
    p = pool(1, on_empty="fail", **REFUSED)
    with pytest.raises(corral.ResourceLimitError, match="no ready sandbox"), p.acquire():
        pass
    stats = _until(p, lambda s: s.failures >= 1)
    assert "PolicyError" in (stats.last_error or "")
    with pytest.raises(corral.ResourceLimitError, match="PolicyError"), p.acquire():
        pass


@pytest.mark.local
def test_wait_policy_times_out_when_the_pool_cannot_fill(pool):
    p = pool(1, on_empty="wait", **REFUSED)
    with pytest.raises(corral.TimeoutError) as caught, p.acquire(timeout=0.3):
        pass
    assert caught.value.retryable
    stats = _until(p, lambda s: s.failures >= 1)
    assert stats.ready == 0 and stats.created == 0
    with pytest.raises(corral.TimeoutError, match="PolicyError"), p.acquire(timeout=0.1):
        pass


@pytest.mark.local
def test_the_pool_is_bounded_and_refills_behind_held_sandboxes(pool):
    p = pool(1)
    _filled(p)
    with p.acquire() as first, p.acquire(timeout=DEADLINE) as second:
        assert first.id != second.id
        stats = _filled(p)  # handed-out sandboxes do not count against the size
        time.sleep(0.2)  # the refill thread had its chance to overfill
        stats = p.stats()
        assert (stats.ready, stats.in_use, stats.created) == (1, 2, 3)


@pytest.mark.local
def test_a_sandbox_removed_behind_the_pools_back_is_not_handed_out(pool, settings):
    p = pool(2)
    _filled(p)
    gone = _ids("local", settings)
    for victim in gone:
        corral.attach(victim, backend="local", settings=settings).close()
    with p.acquire() as sandbox:
        assert sandbox.id not in gone
        assert sandbox.exec(["true"]).exit_code == 0
    assert p.stats().destroyed == 3  # the two dead ones, then the used one


@pytest.mark.local
def test_a_sandbox_past_its_lifetime_is_replaced(pool):
    p = pool(1, lifetime=2)
    first = _filled(p)
    time.sleep(2.3)
    with p.acquire() as sandbox:
        assert sandbox.expires > time.time()
        assert sandbox.exec(["true"]).exit_code == 0
    assert p.stats().created > first.created


@pytest.mark.local
def test_close_destroys_everything_and_acquire_then_raises(pool, settings):
    p = pool(3)
    _filled(p)
    with p.acquire() as held:
        p.close()
        assert _ids("local", settings) == {held.id}  # a held sandbox stays its user's
        assert held.exec(["true"]).exit_code == 0
        with pytest.raises(corral.SandboxClosedError), p.acquire():
            pass
    assert _ids("local", settings) == set()
    stats = p.stats()
    assert (stats.ready, stats.in_use, stats.creating) == (0, 0, 0)
    assert stats.created == stats.destroyed
    p.close()  # idempotent


@pytest.mark.local
def test_the_pool_as_a_context_manager(settings):
    with corral.Pool(2, backend="local", settings=settings) as p:
        _filled(p)
        with p.acquire() as sandbox:
            assert sandbox.exec(["true"]).exit_code == 0
    assert p.closed and _ids("local", settings) == set()


@pytest.mark.local
def test_a_forgotten_pool_cleans_up_after_itself(settings):
    p = corral.Pool(2, backend="local", settings=settings)
    _filled(p)
    thread = p._core.thread
    del p
    gc.collect()
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert _ids("local", settings) == set()


@pytest.mark.local
def test_a_program_that_forgets_its_pool_leaves_nothing_behind(settings, state_dir):
    script = f"""
import time
from pathlib import Path
import corral
from corral.core.settings import load_settings

folder = {str(state_dir)!r}
settings = load_settings(
    {{"backends": {{"local": {{"state_dir": folder}}}}}}, cwd=Path(folder), environ={{}}
)
pool = corral.Pool(2, backend="local", settings=settings)
while pool.stats().ready < 2:
    time.sleep(0.02)
print(sorted(info.id for info in corral.list(backend="local", settings=settings)))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=DEADLINE
    )
    assert done.returncode == 0, done.stderr
    assert len(ast.literal_eval(done.stdout)) == 2  # the pool had filled
    assert _ids("local", settings) == set()


@pytest.mark.local
def test_concurrent_acquires_get_distinct_sandboxes(pool):
    p = pool(8, acquire_timeout=DEADLINE)
    _filled(p)
    got: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8, timeout=DEADLINE)

    def user() -> None:
        try:
            barrier.wait()
            with p.acquire() as sandbox:
                assert sandbox.exec(["true"]).exit_code == 0
                got.append(sandbox.id)
                barrier.wait()  # all eight held at once
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=user) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert errors == []
    assert len(got) == 8 and len(set(got)) == 8


@pytest.mark.local
def test_bad_arguments_are_refused_up_front(settings):
    with pytest.raises(TypeError, match="nonsense"):
        corral.Pool(1, backend="local", settings=settings, nonsense=1)
    with pytest.raises(corral.ConfigError, match="size"):
        corral.Pool(0, backend="local", settings=settings)
    with pytest.raises(corral.ConfigError, match="on_empty"):
        corral.Pool(1, backend="local", settings=settings, on_empty="block")  # type: ignore[arg-type]
    with pytest.raises(corral.ConfigError, match="memory"):
        corral.Pool(1, backend="local", settings=settings, memory="lots")


# -- container engines -------------------------------------------------------------------


def test_pool_on_an_engine(engine, engine_settings, engine_client):
    mark = uuid.uuid4().hex
    labels = {"test.pool": mark}
    with corral.Pool(2, backend=engine, settings=engine_settings, labels=labels) as p:
        _filled(p)
        ids = _ids(engine, engine_settings, mark)
        assert len(ids) == 2
        with p.acquire() as sandbox:
            assert sandbox.exec(["echo", "hi"]).text == "hi\n"
            sandbox.write_file("/tmp/secret", b"mine")
        assert sandbox.id not in _ids(engine, engine_settings, mark)
        with p.acquire() as sandbox:
            assert sandbox.exec(["test", "-e", "/tmp/secret"]).exit_code == 1
        # Containers removed behind the pool's back are never handed out.
        _filled(p)
        gone = _ids(engine, engine_settings, mark)
        for victim in gone:
            engine_client.remove_container(f"corral-{victim}", force=True)
        with p.acquire() as sandbox:
            assert sandbox.id not in gone
            assert sandbox.exec(["true"]).exit_code == 0
        # Nor are ones paused or stopped behind its back (seen from the host, not asked
        # of the engine).
        _filled(p)
        paused, stopped = sorted(_ids(engine, engine_settings, mark))
        engine_client.pause(f"corral-{paused}")
        engine_client.kill(f"corral-{stopped}")
        with p.acquire() as sandbox:
            assert sandbox.id not in (paused, stopped)
            assert sandbox.exec(["true"]).exit_code == 0
    assert p.closed and _ids(engine, engine_settings, mark) == set()
