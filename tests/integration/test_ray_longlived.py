"""Long-lived sandboxes (issue 15) through the ray backend, on the suite's cluster.

Each case runs with the nodes making sandboxes with ``local`` and with ``docker``:
background processes kept by corral's keeper on the sandbox's node (fed, read, found
again from another program, killed), idle timeouts, pause, resume and extend (the
node agent's own sweep moved too), snapshots that stay on their node and the sandboxes
started from them, changes, a published port, and nothing left on the node after close.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from ray_cluster import address, ray_settings

import corral
from corral.core.backend import Backend, Capability
from corral.core.plugins import get_host
from corral.core.results import Change

pytestmark = pytest.mark.ray

PATIENCE = 60.0  # seconds a step may take before the test calls it stuck
KEEPER = "corral.core.keeper"


@pytest.fixture(params=["local", "docker"])
def node_backend(request: pytest.FixtureRequest) -> str:
    if request.param == "docker" and not os.environ.get("CORRALTEST_DOCKER_URL"):
        pytest.skip("needs the suite's Docker engine on the nodes (CORRALTEST_DOCKER_URL)")
    return str(request.param)


@pytest.fixture
def settings(shared_tmp: Path, node_backend: str) -> corral.Settings:
    return ray_settings(shared_tmp, node_backend=node_backend)


@pytest.fixture
def made(settings: corral.Settings) -> Iterator[list[corral.Sandbox]]:
    """Sandboxes a test made, closed at its end; then none is listed, and no keeper of
    theirs runs (on any node: all are on this machine)."""
    sandboxes: list[corral.Sandbox] = []
    yield sandboxes
    for sb in sandboxes:
        sb.close()
    ids = {sb.id for sb in sandboxes}
    listed = {i.id for i in corral.list(backend="ray", settings=settings)}
    assert listed.isdisjoint(ids), "a ray sandbox leaked"
    # A keeper lets go of its folder before its interpreter has quite ended.
    ours = lambda: [k for k in keepers() if any(i in k[1] for i in ids)]  # noqa: E731
    until(lambda: not ours(), "the sandboxes' keepers gone after close", patience=10)
    left = [p for p in Path(tempfile.gettempdir()).glob("corral-*/processes/*/*") if p.name in ids]
    assert not left, "a process folder outlived close"


@pytest.fixture
def create(settings: corral.Settings, made: list[corral.Sandbox]) -> Callable[..., corral.Sandbox]:
    def _create(chosen: corral.Settings | None = None, **keywords: object) -> corral.Sandbox:
        sb = corral.create(backend="ray", settings=chosen or settings, **keywords)  # type: ignore[arg-type]
        made.append(sb)
        return sb

    return _create


def ray_backend(settings: corral.Settings) -> Backend:
    host = get_host()
    host.configure(settings)
    return host.backend("ray", settings)


@pytest.fixture
def needs(settings: corral.Settings, node_backend: str) -> Callable[[Capability], None]:
    """Skip a case whose feature the nodes' backend does not declare (yet)."""

    def _needs(capability: Capability) -> None:
        if capability not in ray_backend(settings).capabilities():
            pytest.skip(f"{node_backend} on the nodes does not declare {capability.name}")

    return _needs


def keepers() -> list[tuple[int, str]]:
    """Every keeper process of this machine: (pid, its folder)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        argv = process.info["cmdline"] or []
        if KEEPER in argv and len(argv) > argv.index(KEEPER) + 1:
            found.append((process.info["pid"], argv[argv.index(KEEPER) + 1]))
    return found


def until(check: Callable[[], object], what: str, patience: float = PATIENCE) -> None:
    deadline = time.monotonic() + patience
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {patience:g} s: {what}")
        time.sleep(0.1)


def read_until(process: corral.Process, wanted: bytes) -> bytes:
    """The process's output from its start until ``wanted`` is in it (it runs on)."""
    seen = b""
    for chunk in process.output(timeout=PATIENCE):
        seen += chunk.data
        if wanted in seen:
            return seen
    raise AssertionError(f"the process ended before printing {wanted!r}: {seen!r}")


ATTACHED = """
    import sys
    import corral

    settings = corral.load_settings(
        {"backends": {"ray": {"address": ADDRESS, "node_backend": NODE_BACKEND}}}, environ={}
    )
    sb = corral.attach(sys.argv[1], backend="ray", settings=settings)
    process = sb.process(sys.argv[2])
    process.write("two\\n")
    seen = b""
    for chunk in process.output(timeout=60):
        seen += chunk.data
        if b"got two" in seen:
            break
    print("running" if process.running else "ended", seen.decode().split())
    sb.detach()
"""


def test_a_process_runs_on_the_node_and_is_found_again(create, needs, node_backend) -> None:
    needs(Capability.PROCESSES)
    sb = create()
    process = sb.spawn(["sh", "-c", "while read line; do echo got $line; done"])
    process.write("one\n")
    assert b"got one\n" in read_until(process, b"got one")
    # Kept by a keeper with the node's own backend (not the driver's, not ray's).
    kept = [k for k in keepers() if k[1].endswith(f"/{node_backend}/{sb.id}")]
    assert len(kept) == 1, keepers()
    assert not [k for k in keepers() if k[1].endswith(f"/ray/{sb.id}")]
    pid, folder = kept[0]
    assert psutil.Process(pid).ppid() != os.getpid()
    assert [p.id for p in sb.processes()] == [process.id] and process.running

    # Another program finds it through attach, feeds it and reads it.
    script = textwrap.dedent(ATTACHED).replace("ADDRESS", repr(address()))
    script = script.replace("NODE_BACKEND", repr(node_backend))
    other = subprocess.run(
        [sys.executable, "-c", script, sb.id, process.id],
        capture_output=True,
        text=True,
        timeout=PATIENCE * 2,
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == "running ['got', 'one', 'got', 'two']"

    process.kill()
    result = process.wait(timeout=PATIENCE)
    assert not result.timed_out and result.exit_code != 0
    assert result.stdout == b"got one\ngot two\n"
    assert not process.running
    assert [(p.id, p.running) for p in sb.processes()] == [(process.id, False)]

    sb.close()
    until(lambda: not psutil.pid_exists(pid), "the node's keeper gone after close")
    assert not Path(folder).exists()  # the process folder on the node, removed


def test_a_process_on_a_terminal_gets_its_size(create, needs) -> None:
    needs(Capability.TTY)
    sb = create()
    process = sb.spawn(["sh", "-c", "test -t 0 && echo tty; read go; stty size"], tty=True)
    read_until(process, b"tty")
    process.resize(41, 103)
    process.write("go\n")
    result = process.wait(timeout=PATIENCE)
    assert result.exit_code == 0, result
    assert b"41 103" in result.stdout


def test_idle_timeouts(create, needs) -> None:
    sb = create()
    idle = sb.exec(["sleep", "30"], idle_timeout=1, timeout=PATIENCE)
    assert idle.timed_out and idle.timed_out_by == "idle_timeout"
    chatty = sb.exec(
        ["sh", "-c", "for i in 1 2 3 4 5 6; do echo $i; sleep 0.5; done"], idle_timeout=3
    )
    assert chatty.ok and chatty.text.split() == ["1", "2", "3", "4", "5", "6"]
    needs(Capability.PROCESSES)
    spawned = sb.spawn(["sleep", "30"], idle_timeout=1)
    result = spawned.wait(timeout=PATIENCE)
    assert result.timed_out and result.timed_out_by == "idle_timeout"


def _listed(sb: corral.Sandbox, settings: corral.Settings) -> corral.SandboxInfo | None:
    return next((i for i in corral.list(backend="ray", settings=settings) if i.id == sb.id), None)


def test_pause_and_resume(create, settings, needs) -> None:
    needs(Capability.PAUSE)
    sb = create()
    sb.exec(["sh", "-c", "echo kept > /workspace/file"])
    sb.pause()
    assert sb.status == "paused"
    listed = _listed(sb, settings)
    assert listed is not None and listed.status == "paused"
    with pytest.raises(corral.ConflictError, match="paused"):
        sb.backend.exec(sb.id, corral.ExecRequest(argv=["true"]), corral.OutputSink(1024))
    assert sb.usage() is not None  # usage works on a paused sandbox
    sb.resume()
    assert sb.status == "running"
    assert _listed(sb, settings).status == "running"  # type: ignore[union-attr]
    assert sb.exec(["cat", "/workspace/file"]).text == "kept\n"


def test_a_paused_sandbox_is_swept_at_its_end(create, settings, needs) -> None:
    needs(Capability.PAUSE)
    sb = create(lifetime="3s")
    sb.pause()  # a container's own PID 1 timer is frozen: the node agent's sweep removes it
    assert _listed(sb, settings).status == "paused"  # type: ignore[union-attr]
    until(lambda: _listed(sb, settings) is None, "the paused sandbox swept", patience=30)


def test_extend_moves_the_end_and_the_node_agents_sweep(create, settings, needs) -> None:
    needs(Capability.EXTEND)
    sb = create(lifetime="4s")
    first = sb.expires
    new = sb.extend(120)
    assert new > first + 100
    listed = _listed(sb, settings)
    assert listed is not None and abs(listed.expires - new) < 1.5
    attached = corral.attach(sb.id, backend="ray", settings=settings)
    assert abs(attached.expires - new) < 1.5
    attached.detach()
    # Past the first end, the node's own grace and two sweeps: still there.
    time.sleep(max(0.0, first - time.time()) + 7)
    assert _listed(sb, settings) is not None, "swept at its first end"
    assert sb.exec(["echo", "still"]).text == "still\n"


def test_a_snapshot_stays_on_its_node(create, settings, shared_tmp, needs, node_backend) -> None:
    needs(Capability.SNAPSHOTS)
    sb = create()
    sb.exec(["sh", "-c", "echo captured > /workspace/note && echo tmp > /tmp/also"])
    snap = sb.snapshot()
    node = sb.info.node
    assert node is not None
    assert snap.info.backend == "ray" and snap.info.labels["corral.ray.node"] == node.id
    assert snap.id in {s.id for s in corral.snapshots(backend="ray", settings=settings)}
    forks: list[corral.Sandbox] = []
    try:
        # Spread would put these on the other nodes: a snapshot's sandboxes go home.
        spread = ray_settings(shared_tmp, node_backend=node_backend, strategy="spread")
        forks.extend(create(spread, image=snap) for _ in range(2))
        for fork in forks:
            assert fork.info.node == node
            assert _listed(fork, settings).node.id == node.id  # type: ignore[union-attr]
            assert fork.exec(["cat", "/workspace/note", "/tmp/also"]).text == "captured\ntmp\n"
        forks[0].exec(["sh", "-c", "echo changed > /workspace/note"])
        assert forks[1].exec(["cat", "/workspace/note"]).text == "captured\n"
    finally:
        for fork in forks:  # a snapshot in use stays (ConflictError on docker)
            fork.close()
        snap.remove()
    assert snap.id not in {s.id for s in corral.snapshots(backend="ray", settings=settings)}
    snap.remove()  # idempotent
    with pytest.raises(corral.NotFoundError, match=snap.id):
        corral.create(backend="ray", settings=settings, image=snap.image)


def test_a_snapshots_full_node_is_a_capacity_error(create, shared_tmp, needs, node_backend) -> None:
    """The other nodes have room; the one holding the snapshot has none."""
    needs(Capability.SNAPSHOTS)
    one = ray_settings(shared_tmp, node_backend=node_backend, max_per_node=1)
    sb = create(one)
    snap = sb.snapshot()
    try:
        short = ray_settings(
            shared_tmp, node_backend=node_backend, max_per_node=1, placement_timeout="1s"
        )
        with pytest.raises(corral.CapacityError, match=f"snapshot {snap.id}"):
            create(short, image=snap)
    finally:
        snap.remove()


def test_gc_removes_expired_snapshots_on_their_nodes(create, settings, needs) -> None:
    needs(Capability.SNAPSHOTS)
    sb = create()
    expiring = sb.snapshot(lifetime="1s")
    kept = sb.snapshot(lifetime="10m")
    try:
        until(lambda: time.time() > expiring.expires + 1, "the snapshot's end")
        removed = corral.gc(backend="ray", settings=settings)
        assert expiring.id in removed and kept.id not in removed
        listed = {s.id for s in corral.snapshots(backend="ray", settings=settings)}
        assert expiring.id not in listed and kept.id in listed
    finally:
        kept.remove()
        expiring.remove()


def test_changes(create, needs) -> None:
    needs(Capability.CHANGES)
    sb = create()
    assert sb.changes() == []
    sb.exec(["sh", "-c", "echo new > /workspace/new && echo t > /tmp/t"])
    changes = sb.changes()
    assert Change("/workspace/new", "added") in changes
    assert Change("/tmp/t", "added") in changes
    assert changes == sorted(changes, key=lambda c: c.path)


def test_a_published_port_answers(create, needs) -> None:
    needs(Capability.PORTS)
    sb = create(network="bridge", ports=[8000])
    sb.exec(["sh", "-c", "mkdir -p /workspace/www && echo hello > /workspace/www/index.html"])
    sb.spawn(["httpd", "-f", "-p", "8000", "-h", "/workspace/www"])
    host, port = sb.port(8000)

    def answers() -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/index.html", timeout=5) as r:
                return bytes(r.read())
        except OSError:
            return None

    until(lambda: answers() == b"hello\n", "the server answering")
    assert sb.exec(["echo", "beside"]).text == "beside\n"
    with pytest.raises(corral.NotFoundError, match="9000"):
        sb.backend.port(sb.id, 9000)


def test_the_local_node_backend_publishes_no_ports(settings, node_backend: str) -> None:
    if node_backend != "local":
        pytest.skip("about the local backend")
    backend = ray_backend(settings)
    assert Capability.PORTS not in backend.capabilities()
    with pytest.raises(corral.CapabilityError, match="PORTS"):
        corral.create(backend="ray", settings=settings, network="bridge", ports=[8000])
