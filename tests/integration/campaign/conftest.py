"""The THREATS.md campaign: every case against every backend it applies to, each ending
with proof that nothing leaked and the host is untouched.

``backend`` runs a test once per backend (local, docker, podman; each with its marker);
``sandbox(**keywords)`` creates one on it. A case marked ``through_ray`` runs also
through the ray backend, once per kind of node backend ("ray-local", "ray-docker",
"ray-podman": markers ``ray`` and the kind's), on the suite's Ray cluster; there
``kind`` is the node backend (what ``backend`` names elsewhere) and ``api_backend`` is
"ray" (the name corral's calls take). The autouse ``nothing_leaked`` fixture
snapshots, before the test, what a sandbox could leave behind and compares after it:
the containers, volumes and networks of the sandboxes the case made (other suites share
the engines, so only those are the case's; through ray too, as the node agents label
them alike), and for a ray case what the cluster still lists, reserves or holds on the
nodes' local backend for them, child processes of the test
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
import ray_cluster
from cases import NODE_LOCAL_ROOT

import corral
from corral.core.plugins import get_host
from corral.core.settings import load_settings

# The engines of tests/integration/conftest.py (whose fixtures this folder inherits),
# by the variable scripts/engines sets to each one's socket.
ENGINES = {"docker": "CORRALTEST_DOCKER_URL", "podman": "CORRALTEST_PODMAN_URL"}
BACKENDS = ["local", *ENGINES]
# A through_ray case's extra runs are named this plus the kind of the nodes' backend.
RAY = "ray-"
# Host files a sandbox must never change, hashed before and after each case.
HOST_FILES = ("/etc/passwd", "/etc/shadow", "/etc/hosts", "/etc/resolv.conf")
# Leftovers get this long to disappear: removal by an engine is not instantaneous.
SETTLE = 10.0


def _backend_param(name: str) -> Any:
    """``name`` as a value of ``backend``, with the markers that select it."""
    kind = name.removeprefix(RAY)
    marks = [getattr(pytest.mark, kind)] + ([pytest.mark.ray] if name != kind else [])
    return pytest.param(name, marks=marks)


def _backends_parametrized(mark: pytest.Mark) -> list[str] | None:
    """The backends a ``parametrize("backend", ...)`` mark lists; None for another mark."""
    if mark.name != "parametrize" or not mark.args:
        return None
    names = mark.args[0]
    names = names.split(",") if isinstance(names, str) else list(names)
    if "backend" not in [n.strip() for n in names]:
        return None
    if len(names) != 1:
        raise pytest.UsageError("through_ray needs `backend` parametrized on its own")
    return [getattr(value, "values", (value,))[0] for value in mark.args[1]]


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A ``through_ray`` case runs on its backends and, through ray, on nodes whose
    backend is each of them (``through_ray("docker")``: that kind only, through ray).

    Its ``backend`` becomes a direct parametrization of both (the fixture's params, or
    the case's own ``parametrize("backend", ...)``, replaced on this case's definition
    only, with that mark's other arguments such as ``indirect``), in the same place
    among its marks, so that the test ids stay as they were. First of the hooks, so
    that pytest's own ones see the replacement."""
    through = metafunc.definition.get_closest_marker("through_ray")
    if through is None or "backend" not in metafunc.fixturenames:
        return
    own = metafunc.definition.own_markers
    given = next((m for m in own if _backends_parametrized(m) is not None), None)
    kinds = _backends_parametrized(given) if given is not None else BACKENDS
    assert kinds is not None
    wanted = through.args or kinds
    names = kinds + [RAY + kind for kind in kinds if kind in wanted]
    keywords = dict(given.kwargs) if given is not None else {}
    params = [_backend_param(name) for name in names]
    mark = pytest.mark.parametrize("backend", params, **keywords).mark
    if given is not None:
        own[own.index(given)] = mark
    else:  # the fixture's params come before the case's own parametrizations
        own.insert(0, mark)


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
def kind(backend: str) -> str:
    """The backend that makes the case's sandboxes: ``backend``, or for a ray case the
    nodes' backend ("local" for "ray-local"). What a check of the sandbox itself, or of
    its engine, branches on."""
    return backend.removeprefix(RAY)


@pytest.fixture
def api_backend(backend: str) -> str:
    """The name corral's calls take for ``backend``: "ray" for a ray case."""
    return "ray" if backend.startswith(RAY) else backend


@pytest.fixture
def backend_settings(
    backend: str, request: pytest.FixtureRequest, state_dir: Path, mount_root: Path
) -> corral.Settings:
    """The test's own settings for ``backend`` (an engine or the Ray cluster missing
    fails under CI). Through ray, the nodes' own environment configures their backend;
    bind sources come from the same mount root, which the nodes accept from the driver."""
    if backend.startswith(RAY):
        ray = {"address": ray_cluster.address(), "node_backend": backend.removeprefix(RAY)}
        overrides = {"mount_roots": [str(mount_root)], "backends": {"ray": ray}}
        return load_settings(overrides, cwd=state_dir, environ={})
    if backend == "local":
        return request.getfixturevalue("settings")
    return request.getfixturevalue("settings_of")(backend)


@pytest.fixture
def sandbox(
    api_backend: str, backend_settings: corral.Settings
) -> Iterator[Callable[..., corral.Sandbox]]:
    """``sandbox(**keywords)`` creates a sandbox on ``backend``, closed at the end."""
    made: list[corral.Sandbox] = []

    def _sandbox(**keywords: object) -> corral.Sandbox:
        keywords.setdefault("settings", backend_settings)
        keywords.setdefault("lifetime", "10m")
        made.append(corral.create(backend=api_backend, **keywords))
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


def _ray_leftovers(settings: corral.Settings | None, ids: set[str]) -> set[str]:
    """What the Ray cluster still has of the sandboxes in ``ids``: one the ray backend
    lists, a placement group reserving a node's resources for one, or a folder or
    cgroup of one on the nodes' local backend (the engines' containers are found by
    their labels, as for any case). Nothing for a case that does not go through ray."""
    if settings is None or not ids:
        return set()
    from corral.backends.ray.agent import standing_groups

    namespace = settings.backends["ray"].get("namespace", "corral")
    listed = {info.id for info in corral.list(backend="ray", settings=settings)}
    reserved = {sandbox_id for sandbox_id, _ in standing_groups(namespace).values()}
    folders = {p.name for p in NODE_LOCAL_ROOT.glob("*")}
    cgroups = {  # (cgroup v2 alone, or a folder per v1 controller beside it)
        p.name.removeprefix("corral-")
        for pattern in ("corral/corral-*", "*/corral/corral-*")
        for p in Path("/sys/fs/cgroup").glob(pattern)
    }
    return (
        {f"listed: {i}" for i in listed & ids}
        | {f"placement group: {i}" for i in reserved & ids}
        | {f"local folder: {NODE_LOCAL_ROOT / i}" for i in folders & ids}
        | {f"cgroup: corral-{i}" for i in cgroups & ids}
    )


def _ray_connections(me: psutil.Process) -> int:
    """This process's TCP connections with the Ray cluster's nodes: the driver's pool,
    which opens one more to a node (and that node one more to it) the first time an
    object larger than Ray sends inline travels between them, and keeps it."""
    import ray

    nodes = {node["NodeManagerAddress"] for node in ray.nodes()}
    count = 0
    for connection in me.net_connections(kind="tcp"):
        ends = {
            end.ip.removeprefix("::ffff:") for end in (connection.laddr, connection.raddr) if end
        }
        count += bool(ends & nodes)
    return count


def _snapshot(
    canaries: dict[Path, str | None], ids: set[str], ray: corral.Settings | None
) -> dict[str, object]:
    # The shared backends' engine clients are closed first: their pooled connections are
    # meant to outlive a sandbox, so only with them closed is "back to baseline" exact.
    get_host().close()
    me = psutil.Process()
    return {
        "engines": _engine_leftovers(ids),
        "ray": _ray_leftovers(ray, ids),
        "children": {p.pid for p in me.children(recursive=True) if p.is_running()},
        # Through ray, the driver's connections with the nodes are Ray's own, not a case's.
        "fds": me.num_fds() - (_ray_connections(me) if ray is not None else 0),
        "temp": _corral_temp_folders(),
        "canaries": {path: _hash(path) for path in canaries},
    }


def _leaks(before: dict[str, object], after: dict[str, object]) -> list[str]:
    problems = []
    for engine, ids in after["engines"].items():  # type: ignore[union-attr]
        new = ids - before["engines"].get(engine, set())  # type: ignore[union-attr]
        if new:
            problems.append(f"{engine} kept {sorted(new)}")
    new_ray = after["ray"] - before["ray"]  # type: ignore[operator]
    if new_ray:
        problems.append(f"the Ray cluster kept {sorted(new_ray)}")
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
def nothing_leaked(canary: Path, request: pytest.FixtureRequest) -> Iterator[None]:
    """After each case: no container, volume or network of its sandboxes, host process, client fd,
    temporary folder or changed host file more than before it (waiting out engine removal);
    through ray, nothing of them left in the cluster either."""
    canaries = {canary: None, **{Path(p): None for p in HOST_FILES}}
    ray = None
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and str(callspec.params.get("backend", "")).startswith(RAY):
        ray = request.getfixturevalue("backend_settings")
        # Joins the cluster before the baseline: the driver's connection (its sockets)
        # stays for the rest of the session, and is no case's leak.
        corral.list(backend="ray", settings=ray)
    made = _MadeHere()
    host = get_host()
    host.pm.register(made)
    before = _snapshot(canaries, made.ids, ray)
    try:
        yield
    finally:
        host.pm.unregister(made)
    deadline = time.monotonic() + SETTLE
    while True:
        problems = _leaks(before, _snapshot(canaries, made.ids, ray))
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert problems == [], "the case leaked or touched the host: " + "; ".join(problems)
