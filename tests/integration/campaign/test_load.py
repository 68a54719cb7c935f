"""THREATS.md B10, load (T85): fifty sandboxes alive at once, a create/destroy storm with
failures thrown in, and a closed sandbox refusing every call without asking the
backend. Zero leaks, no errors but the provoked ones, no deadlock.

The figures (wall time per phase, errors) are printed (``-s``) and written to
``bench/results/campaign-load-<backend>.json``; nothing here asserts on time.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import private_engines
import pytest

import corral
from corral.core.plugins import get_host

AT_ONCE = 50
STORM_THREADS = 8
STORM_ROUNDS = 5
RESULTS = Path(__file__).resolve().parents[3] / "bench" / "results"
# Generous: a barrier or a worker still waiting this long is a deadlock, not slowness.
DEADLOCK = 600


class Provoked(Exception):
    """The storm's own failure, thrown inside a sandbox's ``with`` block."""


def record(backend: str, case: str, figures: dict[str, Any]) -> None:
    print(f"\n[{case} on {backend}] " + json.dumps(figures))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"campaign-load-{backend}.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing[case] = {**figures, "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.write_text(json.dumps(existing, indent=2) + "\n")


def test_fifty_sandboxes_alive_at_once(backend, backend_settings):
    """Created, used (an exec, a file written and read) and destroyed from 50 threads,
    all 50 alive together between the phases."""
    created = threading.Barrier(AT_ONCE, timeout=DEADLOCK)
    used = threading.Barrier(AT_ONCE, timeout=DEADLOCK)
    phases: dict[str, list[float]] = {"create": [], "use": [], "destroy": []}
    ids: set[str] = set()
    lock = threading.Lock()

    def timed(phase: str, start: float) -> None:
        with lock:
            phases[phase].append(time.monotonic() - start)

    def life(n: int) -> str:
        start = time.monotonic()
        try:
            sb = corral.create(backend=backend, settings=backend_settings, lifetime="10m")
        except BaseException:
            created.abort()  # the others stop waiting; this error is the case's
            raise
        with lock:
            ids.add(sb.id)
        try:
            timed("create", start)
            created.wait()
            start = time.monotonic()
            sb.write_file("/workspace/n", f"sandbox {n}")
            text = sb.exec(["cat", "/workspace/n"]).text
            assert sb.read_file("/workspace/n") == f"sandbox {n}".encode()
            timed("use", start)
            used.wait()
            return text
        except BaseException:
            created.abort()  # nobody waits for a sandbox that failed
            used.abort()
            raise
        finally:
            start = time.monotonic()
            sb.close()
            timed("destroy", start)

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=AT_ONCE) as pool:
        futures = [pool.submit(life, n) for n in range(AT_ONCE)]
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result(timeout=DEADLOCK))
            except Exception as e:  # collected, so that the figures show every error
                outcomes.append(e)
    wall = time.monotonic() - start
    errors = [repr(o) for o in outcomes if isinstance(o, Exception)]
    record(
        backend,
        "fifty-at-once",
        {
            "sandboxes": AT_ONCE,
            "wall_seconds": round(wall, 2),
            "errors": errors,
            **{
                f"{phase}_seconds_median": round(sorted(times)[len(times) // 2], 3)
                for phase, times in phases.items()
                if times
            },
            **{
                f"{phase}_seconds_max": round(max(times), 3)
                for phase, times in phases.items()
                if times
            },
        },
    )
    assert errors == []
    assert outcomes == [f"sandbox {n}" for n in range(AT_ONCE)]
    assert len(ids) == AT_ONCE
    # (The shared engines may hold other tests' sandboxes: only these must be gone.)
    assert ids & {i.id for i in corral.list(backend=backend, settings=backend_settings)} == set()


def test_create_destroy_storm_with_failures_thrown_in(backend, backend_settings):
    """Threads by rounds of create → exec → destroy; a third of the rounds raise inside the
    ``with`` block. Only those provoked errors come out, every sandbox is gone, and the
    client's threads are back to where they were."""
    threads_before = threading.active_count()
    rng = random.Random(85)
    plan = [[rng.random() < 1 / 3 for _ in range(STORM_ROUNDS)] for _ in range(STORM_THREADS)]
    ids: list[str] = []
    lock = threading.Lock()

    def rounds(fail_at: list[bool]) -> list[str]:
        outcome = []
        for fail in fail_at:
            try:
                with corral.create(backend=backend, settings=backend_settings) as sb:
                    with lock:
                        ids.append(sb.id)
                    if fail:
                        raise Provoked(sb.id)
                    outcome.append(sb.exec(["echo", sb.id]).text.strip())
            except Provoked:
                outcome.append("provoked")
        return outcome

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=STORM_THREADS) as pool:
        futures = [pool.submit(rounds, fail_at) for fail_at in plan]
        results, errors = [], []
        for future in futures:
            try:
                results.append(future.result(timeout=DEADLOCK))
            except Exception as e:
                errors.append(repr(e))
    wall = time.monotonic() - start
    provoked = sum(fail for row in plan for fail in row)
    record(
        backend,
        "storm",
        {
            "threads": STORM_THREADS,
            "rounds": STORM_ROUNDS,
            "provoked": provoked,
            "wall_seconds": round(wall, 2),
            "errors": errors,
        },
    )
    assert errors == []
    assert len(ids) == len(set(ids)) == STORM_THREADS * STORM_ROUNDS  # no name clash
    for fail_at, outcome in zip(plan, results, strict=True):
        assert [o == "provoked" for o in outcome] == fail_at
        assert all(o == "provoked" or len(o) == 16 for o in outcome)
    left = {i.id for i in corral.list(backend=backend, settings=backend_settings)}
    assert left & set(ids) == set()
    deadline = time.monotonic() + 30
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.1)  # stream and feeder threads end just after their calls
    assert threading.active_count() <= threads_before


def _closed_calls(sb: corral.Sandbox, tmp: Path) -> dict[str, Callable[[], object]]:
    (tmp / "up").mkdir()
    return {
        "exec": lambda: sb.exec(["true"]),
        "stream": lambda: list(sb.stream(["true"])),
        "write_file": lambda: sb.write_file("/workspace/a", b"x"),
        "read_file": lambda: sb.read_file("/workspace/a"),
        "upload": lambda: sb.upload(tmp / "up", "/workspace"),
        "download": lambda: sb.download("/workspace/a", tmp / "down"),
        "usage": sb.usage,
        "health": sb.health,
    }


def test_a_closed_sandbox_refuses_every_call_without_asking_the_backend(
    backend, backend_settings, settings_of, shared_tmp
):
    proxy = None
    settings = backend_settings
    if backend != "local":
        # Every request the backend sends passes through this proxy, and is listed.
        url = os.environ[
            {"docker": "CORRALTEST_DOCKER_URL", "podman": "CORRALTEST_PODMAN_URL"}[backend]
        ]
        proxy = private_engines.EngineProxy(url, shared_tmp)
        settings = settings_of(backend, url=proxy.url)
    try:
        sb = corral.create(backend=backend, settings=settings)
        sb.write_file("/workspace/a", b"x")
        assert sb.read_file("/workspace/a") == b"x"  # the twin: open, every call works
        sb.close()
        if proxy is not None:
            proxy.requests.clear()
        for name, call in _closed_calls(sb, shared_tmp).items():
            with pytest.raises(corral.SandboxClosedError) as info:
                call()
            assert info.value.sandbox_id == sb.id, name
        sb.close()  # still idempotent
        if proxy is not None:
            assert proxy.requests == [], "a closed sandbox asked the engine"
        # Nothing was made again by accident.
        assert sb.id not in {i.id for i in corral.list(backend=backend, settings=settings)}
        if backend == "local":
            assert not (Path(sb.backend.root) / sb.id).exists()  # type: ignore[attr-defined]
    finally:
        if proxy is not None:
            get_host().close()
            proxy.stop()
