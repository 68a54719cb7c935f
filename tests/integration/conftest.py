"""Fixtures for tests that run real sandboxes: private settings, leak checks."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral.backends.local import LocalBackend, LocalSettings
from corral.core.settings import load_settings


def _cgroup_leftovers(sandbox_ids: set[str]) -> list[str]:
    found = []
    for folder in Path("/sys/fs/cgroup").glob("*/corral/corral-*"):
        if folder.name.removeprefix("corral-") in sandbox_ids:
            found.append(str(folder))
    return found


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary folder that the sandboxes' unprivileged host user can reach.

    (pytest's tmp_path lives under a folder private to the user running the tests,
    and as root the local backend runs sandboxes as nobody.)
    """
    folder = Path(tempfile.mkdtemp(prefix="corral-test-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def state_dir(shared_tmp: Path) -> Path:
    folder = shared_tmp / "state"
    folder.mkdir()
    return folder


@pytest.fixture
def mount_root(shared_tmp: Path) -> Path:
    folder = shared_tmp / "mounts"
    folder.mkdir()
    os.chmod(folder, 0o755)
    return folder


@pytest.fixture
def settings(state_dir: Path, mount_root: Path) -> corral.Settings:
    """Settings of the test's own: nothing from the developer's files or variables."""
    return load_settings(
        {
            "mount_roots": [str(mount_root)],
            "backends": {"local": {"state_dir": str(state_dir)}},
        },
        cwd=state_dir,
        environ={},
    )


@pytest.fixture
def local_backend(settings: corral.Settings) -> LocalBackend:
    from corral.core.convert import structure

    return LocalBackend(structure(settings.backends["local"], LocalSettings))


@pytest.fixture
def make(settings: corral.Settings, state_dir: Path) -> Iterator:
    """``make(**keywords)`` creates a local sandbox; at the end, proves nothing leaked."""
    made: list[corral.Sandbox] = []

    def _make(**keywords: object) -> corral.Sandbox:
        keywords.setdefault("settings", settings)
        sandbox = corral.create(backend="local", **keywords)
        made.append(sandbox)
        return sandbox

    yield _make
    for sandbox in made:
        sandbox.close()
    ids = {s.id for s in made}
    local_root = state_dir / "local"
    assert not (local_root.exists() and any(local_root.iterdir())), "a sandbox folder leaked"
    assert _cgroup_leftovers(ids) == [], "a cgroup leaked"
