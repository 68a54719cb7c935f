"""A hundred sandboxes driven at once from a hundred threads, on every backend: the sync
API is thread-safe and the shared engine clients carry the load without errors or leaks."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

import corral

SANDBOXES = 100


def _life(number: int, backend: str, settings: corral.Settings, mark: dict[str, str]) -> str:
    """One sandbox's whole life; returns what it read back (proof that it really ran)."""
    with corral.create(backend=backend, settings=settings, lifetime="10m", labels=mark) as sb:
        sb.write_file("/tmp/n", str(number).encode())
        result = sb.exec(["cat", "/tmp/n"])
        assert result.exit_code == 0, result
        return result.text


def _drive(backend: str, settings: corral.Settings) -> None:
    mark = {"test.run": uuid.uuid4().hex}  # an engine may be shared with other test runs
    with ThreadPoolExecutor(SANDBOXES) as threads:
        futures = [threads.submit(_life, n, backend, settings, mark) for n in range(SANDBOXES)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        assert errors == [], f"{len(errors)} of {SANDBOXES} failed; first: {errors[0]!r}"
        assert [f.result() for f in futures] == [str(n) for n in range(SANDBOXES)]
    left = [
        info.id
        for info in corral.list(backend=backend, settings=settings)
        if info.labels.get("test.run") == mark["test.run"]
    ]
    assert left == [], "a sandbox leaked"


@pytest.mark.local
def test_a_hundred_local_sandboxes_at_once(settings):
    _drive("local", settings)


def test_a_hundred_engine_sandboxes_at_once(engine, engine_settings, caplog):
    _drive(engine, engine_settings)
    # Every thread reused a pooled connection: none was opened and thrown away.
    assert "Connection pool is full" not in caplog.text
