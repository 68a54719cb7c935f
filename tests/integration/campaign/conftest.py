"""The THREATS.md campaign: every case against every backend it applies to, each ending
with proof that nothing leaked and the host is untouched.

``backend`` runs a test once per backend (local, docker, podman; each with its marker);
``sandbox(**keywords)`` creates one on it. The autouse ``nothing_leaked`` fixture
snapshots, before the test, what a sandbox could leave behind and compares after it:
the containers, volumes and networks of the sandboxes the case made (other suites share
the engines, so only those are the case's), child processes of the test
process, the client's open file descriptors, corral's temporary folders, and canary
files on the host. Destructive cases (marker ``destructive``) run only with
``CORRALTEST_DESTRUCTIVE=1``, which ``scripts/test`` sets under CI.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import corral
from corral.core.plugins import get_host

# The engines of tests/integration/conftest.py (whose fixtures this folder inherits),
# by the variable scripts/engines sets to each one's socket.
ENGINES = {"docker": "CORRALTEST_DOCKER_URL", "podman": "CORRALTEST_PODMAN_URL"}
BACKENDS = ["local", *ENGINES]
# Host files a sandbox must never change, hashed before and after each case.
HOST_FILES = ("/etc/passwd", "/etc/shadow", "/etc/hosts", "/etc/resolv.conf")
# Leftovers get this long to disappear: removal by an engine is not instantaneous.
SETTLE = 10.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CORRALTEST_DESTRUCTIVE") == "1":
        return
    skip = pytest.mark.skip(
        reason="destructive case: set CORRALTEST_DESTRUCTIVE=1 on a disposable machine"
    )
    for item in items:
        if "destructive" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=[pytest.param(name, marks=getattr(pytest.mark, name)) for name in BACKENDS])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def backend_settings(backend: str, request: pytest.FixtureRequest) -> corral.Settings:
    """The test's own settings for ``backend`` (an engine missing fails under CI)."""
    if backend == "local":
        return request.getfixturevalue("settings")
    return request.getfixturevalue("settings_of")(backend)


@pytest.fixture
def sandbox(
    backend: str, backend_settings: corral.Settings
) -> Iterator[Callable[..., corral.Sandbox]]:
    """``sandbox(**keywords)`` creates a sandbox on ``backend``, closed at the end."""
    made: list[corral.Sandbox] = []

    def _sandbox(**keywords: object) -> corral.Sandbox:
        keywords.setdefault("settings", backend_settings)
        keywords.setdefault("lifetime", "10m")
        made.append(corral.create(backend=backend, **keywords))
        return made[-1]

    yield _sandbox
    for sb in made:
        sb.close()


def _hash(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class _MadeHere:
    """The ids of the sandboxes this process makes during a case: other suites share the
    engines, so only containers, volumes and networks labelled with one of these are the
    case's."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    @corral.hookimpl
    def corral_sandbox_creating(self, spec: object, sandbox_id: str, backend: str) -> None:
        self.ids.add(sandbox_id)


def _ours(labels: dict[str, str] | None, ids: set[str]) -> bool:
    return (labels or {}).get("corral.sandbox") in ids


def _engine_leftovers(ids: set[str]) -> dict[str, set[str]]:
    """Every container (by id), volume and network of the sandboxes in ``ids``, per engine."""
    import docker

    found: dict[str, set[str]] = {}
    for engine, variable in ENGINES.items():
        if not os.environ.get(variable):
            continue
        # A pinned API version: version="auto" asks /version first, which takes seconds
        # on a busy Podman, twice per case. Both engines speak 1.41.
        client: Any = docker.APIClient(base_url=os.environ[variable], version="1.41")
        try:
            containers = client.containers(all=True, filters={"label": "corral.managed=true"})
            volumes = client.volumes()["Volumes"] or []
            networks = _networks(engine, client)
        except Exception:  # an engine a fault case stopped: the case itself reports it
            continue
        finally:
            client.close()
        found[engine] = (
            {c["Id"] for c in containers if _ours(c.get("Labels"), ids)}
            | {f"volume:{v['Name']}" for v in volumes if _ours(v.get("Labels"), ids)}
            | {f"network:{n['Name']}" for n in networks if _ours(n.get("Labels"), ids)}
        )
    return found


def _networks(engine: str, client: Any) -> list[dict[str, Any]]:
    """corral's networks on the engine, as ``{"Name", "Labels"}``. Podman's are asked of
    its own API: its Docker API strips ``isolate`` from the service's copy of a network
    it lists (Podman 4.3), so a check running beside a create would weaken that sandbox."""
    if engine == "docker":
        return client.networks(filters={"label": "corral.managed=true"})
    response = client.get(
        client.base_url + "/v4.0.0/libpod/networks/json",
        params={"filters": json.dumps({"label": ["corral.managed=true"]})},
    )
    try:
        response.raise_for_status()
        return [{"Name": n["name"], "Labels": n.get("labels") or {}} for n in response.json()]
    finally:
        response.close()


def _corral_temp_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("corral-*") if "test" not in p.name}


def _snapshot(canaries: dict[Path, str | None], ids: set[str]) -> dict[str, object]:
    # The shared backends' engine clients are closed first: their pooled connections are
    # meant to outlive a sandbox, so only with them closed is "back to baseline" exact.
    get_host().close()
    me = psutil.Process()
    return {
        "engines": _engine_leftovers(ids),
        "children": {p.pid for p in me.children(recursive=True) if p.is_running()},
        "fds": me.num_fds(),
        "temp": _corral_temp_folders(),
        "canaries": {path: _hash(path) for path in canaries},
    }


def _leaks(before: dict[str, object], after: dict[str, object]) -> list[str]:
    problems = []
    for engine, ids in after["engines"].items():  # type: ignore[union-attr]
        new = ids - before["engines"].get(engine, set())  # type: ignore[union-attr]
        if new:
            problems.append(f"{engine} kept {sorted(new)}")
    new_children = after["children"] - before["children"]  # type: ignore[operator]
    alive = [pid for pid in new_children if psutil.pid_exists(pid)]
    if alive:
        problems.append(f"host processes left: {alive}")
    if after["fds"] > before["fds"]:  # type: ignore[operator]
        problems.append(f"client file descriptors {before['fds']} -> {after['fds']}")
    new_temp = after["temp"] - before["temp"]  # type: ignore[operator]
    if new_temp:
        problems.append(f"temporary folders left: {sorted(new_temp)}")
    changed = [str(p) for p, h in after["canaries"].items() if before["canaries"][p] != h]  # type: ignore[union-attr,index]
    if changed:
        problems.append(f"host files changed: {changed}")
    return problems


@pytest.fixture
def canary(shared_tmp: Path) -> Path:
    """A host file next to the test's mount root; a case may hand its path to the attack."""
    path = shared_tmp / "canary.txt"
    path.write_bytes(b"canary " + os.urandom(16).hex().encode())
    return path


@pytest.fixture(autouse=True)
def nothing_leaked(canary: Path) -> Iterator[None]:
    """After each case: no container, volume or network of its sandboxes, host process, client fd,
    temporary folder or changed host file more than before it (waiting out engine removal)."""
    canaries = {canary: None, **{Path(p): None for p in HOST_FILES}}
    made = _MadeHere()
    host = get_host()
    host.pm.register(made)
    before = _snapshot(canaries, made.ids)
    try:
        yield
    finally:
        host.pm.unregister(made)
    deadline = time.monotonic() + SETTLE
    while True:
        problems = _leaks(before, _snapshot(canaries, made.ids))
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert problems == [], "the case leaked or touched the host: " + "; ".join(problems)
