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


# -- container engines -------------------------------------------------------------------

# Each engine backend, the variable scripts/engines sets to its socket, and its marker.
ENGINES = {"docker": "CORRALTEST_DOCKER_URL", "podman": "CORRALTEST_PODMAN_URL"}
TEST_IMAGE = os.environ.get("CORRALTEST_IMAGE", "corral-test/busybox:latest")


def _unavailable(reason: str) -> None:
    """Without an engine a developer's run skips, loudly; CI must never skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI needs this engine: {reason}")
    pytest.skip(reason)


def engine_settings_for(
    engine: str, state_dir: Path, mount_root: Path, **backend: object
) -> corral.Settings:
    url = os.environ.get(ENGINES[engine])
    if not url:
        _unavailable(f"{ENGINES[engine]} is not set; run the suite through ./scripts/test")
    return load_settings(
        {
            "mount_roots": [str(mount_root)],
            "backends": {
                engine: {"url": url, "pull": "never", "default_image": TEST_IMAGE, **backend}
            },
        },
        cwd=state_dir,
        environ={},
    )


@pytest.fixture(params=[pytest.param(name, marks=getattr(pytest.mark, name)) for name in ENGINES])
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def engine_url(engine: str) -> str:
    return os.environ.get(ENGINES[engine], "")


@pytest.fixture
def test_image() -> str:
    return TEST_IMAGE


@pytest.fixture
def settings_for(engine: str, state_dir: Path, mount_root: Path):
    """``settings_for(**backend_options)``: engine settings with some options changed."""
    return lambda **backend: engine_settings_for(engine, state_dir, mount_root, **backend)


@pytest.fixture
def engine_settings(engine: str, state_dir: Path, mount_root: Path) -> corral.Settings:
    settings = engine_settings_for(engine, state_dir, mount_root)
    from corral.core.plugins import get_host

    availability = get_host().availability(engine, settings)
    if not availability.ok:
        _unavailable(f"the {engine} backend is unavailable: {availability}")
    return settings


@pytest.fixture
def box(engine: str, engine_settings: corral.Settings) -> Iterator:
    """``box(**keywords)`` creates a sandbox on the engine; at the end, proves nothing leaked."""
    made: list[corral.Sandbox] = []
    client = raw_client(engine)
    volumes_before = {v["Name"] for v in client.volumes()["Volumes"] or []}

    def _box(**keywords: object) -> corral.Sandbox:
        keywords.setdefault("settings", engine_settings)
        sandbox = corral.create(backend=engine, **keywords)
        made.append(sandbox)
        return sandbox

    yield _box
    for sandbox in made:
        sandbox.close()
    ids = {s.id for s in made}
    left = [i.id for i in corral.list(backend=engine, settings=engine_settings) if i.id in ids]
    assert left == [], "a container leaked"
    try:
        # Anonymous volumes carry no labels: compare the engine's whole list.
        volumes_after = {v["Name"] for v in client.volumes()["Volumes"] or []}
        assert volumes_after <= volumes_before, f"volumes leaked: {volumes_after - volumes_before}"
    finally:
        client.close()


def raw_client(engine: str):
    """The engine's own client, to check from outside what corral did (inspect, leaks).

    docker-py for both: Podman's service also speaks the Docker API.
    """
    import docker

    return docker.APIClient(base_url=os.environ[ENGINES[engine]], version="auto")


@pytest.fixture
def settings_of(state_dir: Path, mount_root: Path):
    """``settings_of(engine, **backend_options)``: the test's own settings for an engine."""
    return lambda engine, **backend: engine_settings_for(engine, state_dir, mount_root, **backend)


@pytest.fixture
def raw_client_of():
    """``raw_client_of(engine)``: a docker-py APIClient on that engine (close it after)."""
    return raw_client


@pytest.fixture
def engine_client(engine: str, engine_settings: corral.Settings):
    client = raw_client(engine)
    yield client
    client.close()
