"""The ray backend on the suite's real three-node Ray cluster (scripts/cluster).

Placement (spread, pack, max_per_node, reserved CPUs, impossible specs), where a
sandbox runs, large outputs and files in chunks, other drivers (attach, a SIGKILLed
driver), the CLI, corral.aio and Pool, and the faults: a node killed in the middle of
a batch, an agent that restarts, a node whose backend is broken.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ray_cluster import ExtraNode, OwnHead, address, alive_nodes, connect, ray_settings

import corral

pytestmark = pytest.mark.ray

MiB = 1024**2


@pytest.fixture
def folder(shared_tmp: Path) -> Path:
    return shared_tmp


@pytest.fixture
def settings_with(folder: Path) -> Callable[..., corral.Settings]:
    return lambda **ray: ray_settings(folder, **ray)


@pytest.fixture
def made(settings_with: Callable[..., corral.Settings]) -> Iterator[list[corral.Sandbox]]:
    """Sandboxes a test made, closed at its end; then none of them is listed any more."""
    sandboxes: list[corral.Sandbox] = []
    yield sandboxes
    for sb in sandboxes:
        sb.close()
    listed = {i.id for i in corral.list(backend="ray", settings=settings_with())}
    assert listed.isdisjoint({sb.id for sb in sandboxes}), "a ray sandbox leaked"


def _nodes_of(sandboxes: list[corral.Sandbox], settings: corral.Settings) -> Counter[str]:
    listed = {i.id: i for i in corral.list(backend="ray", settings=settings)}
    return Counter(listed[sb.id].node.id for sb in sandboxes)  # type: ignore[union-attr]


def test_a_batch_spreads_over_the_nodes(settings_with, made) -> None:
    settings = settings_with(strategy="spread")
    for _ in range(6):
        made.append(corral.create(backend="ray", settings=settings))
    counts = _nodes_of(made, settings)
    assert len(counts) >= 3 and max(counts.values()) == 2  # evenly, over the three nodes
    info = next(i for i in corral.list(backend="ray", settings=settings) if i.id == made[0].id)
    assert info.node is not None and info.node.id in alive_nodes()
    assert info.node.address and info.backend == "ray"
    assert made[0].info.node == info.node  # the handle create returns knows it too


def test_pack_fills_a_node_before_the_next(settings_with, made) -> None:
    settings = settings_with(strategy="pack", max_per_node=3)
    for _ in range(4):
        made.append(corral.create(backend="ray", settings=settings))
    assert sorted(_nodes_of(made, settings).values()) == [1, 3]


def test_max_per_node_holds_and_a_full_cluster_is_a_capacity_error(settings_with, made) -> None:
    """C02: across drivers, the node agent counts."""
    settings = settings_with(max_per_node=1, placement_timeout="1s")
    for _ in range(3):
        made.append(corral.create(backend="ray", settings=settings))
    assert sorted(_nodes_of(made, settings).values()) == [1, 1, 1]
    with pytest.raises(corral.CapacityError, match="max_per_node") as caught:
        made.append(corral.create(backend="ray", settings=settings))
    assert caught.value.retryable


def test_cpus_are_reserved_on_the_node(settings_with, made) -> None:
    # Each node has 4 logical CPUs: one sandbox of 3 fits per node, a fourth nowhere.
    settings = settings_with(placement_timeout="1s")
    for _ in range(3):
        made.append(corral.create(backend="ray", cpus=3, settings=settings))
    assert len(_nodes_of(made, settings)) == 3
    with pytest.raises(corral.CapacityError, match="CPU"):
        corral.create(backend="ray", cpus=3, settings=settings)
    made.pop().close()  # its CPUs are free again
    made.append(corral.create(backend="ray", cpus=3, settings=settings))


@pytest.mark.parametrize(
    ("keywords", "ray", "named"),
    [
        ({"cpus": 64}, {}, "64 of CPU"),
        ({"memory": "64GiB"}, {}, "of memory"),
        ({}, {"resources": {"no_such_slot": 1}}, "of no_such_slot"),
    ],
)
def test_a_spec_no_node_can_host_fails_at_once(settings_with, keywords, ray, named) -> None:
    """C01."""
    settings = settings_with(placement_timeout="10m", **ray)  # refused without waiting
    with pytest.raises(corral.CapacityError, match=named):
        corral.create(backend="ray", settings=settings, **keywords)


def test_a_backend_no_node_has_is_refused_clearly(settings_with) -> None:
    with pytest.raises(corral.BackendUnavailableError, match="no_such_backend"):
        corral.create(backend="ray", settings=settings_with(node_backend="no_such_backend"))


def test_large_output_is_capped_on_the_node(settings_with, made) -> None:
    """C08: only the cap travels when nobody streams; a stream sees every byte."""
    sb = corral.create(backend="ray", settings=settings_with())
    made.append(sb)
    result = sb.exec(["sh", "-c", "head -c 200000000 /dev/zero"], max_output="1MiB")
    assert result.exit_code == 0 and result.truncated and len(result.stdout) == MiB
    seen = 0
    for chunk in sb.stream(["sh", "-c", "head -c 30000000 /dev/zero"], max_output="1MiB"):
        if isinstance(chunk, corral.OutputChunk):
            seen += len(chunk.data)
        else:
            assert chunk.truncated and len(chunk.stdout) == MiB
    assert seen == 30000000  # a stream sees every byte, as on one host


def test_output_streams_as_it_comes(settings_with, made) -> None:
    sb = corral.create(backend="ray", settings=settings_with())
    made.append(sb)
    script = "echo one; sleep 1; echo two >&2; exit 3"
    events = list(sb.stream(["sh", "-c", script]))
    assert [(e.stream, e.data) for e in events[:-1]] == [("stdout", b"one\n"), ("stderr", b"two\n")]
    assert events[-1].exit_code == 3


def test_files_travel_in_chunks(settings_with, made, folder: Path) -> None:
    sb = corral.create(backend="ray", settings=settings_with())
    made.append(sb)
    data = os.urandom(5 * MiB + 17)
    sb.write_file("/tmp/big.bin", data)
    assert (
        sb.exec(["sha256sum", "/tmp/big.bin"]).text.split()[0] == hashlib.sha256(data).hexdigest()
    )
    assert sb.read_file("/tmp/big.bin") == data
    tree = folder / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("a")
    sb.exec(["mkdir", "/tmp/up"])
    sb.upload(tree, "/tmp/up")
    sb.download("/tmp/up", folder / "back")
    assert [p.read_text() for p in (folder / "back").rglob("a.txt")] == ["a"]


def test_timeouts_and_the_usual_api(settings_with, made) -> None:
    sb = corral.create(backend="ray", settings=settings_with(), env={"A": "1"})
    made.append(sb)
    assert sb.exec(["sh", "-c", "echo $A"]).text == "1\n"
    slow = sb.exec(["sleep", "30"], timeout=1)
    assert slow.timed_out
    assert sb.usage().memory_limit_bytes is not None
    assert sb.health().status == "none"


def _driver(code: str, settings_folder: Path) -> subprocess.Popen[str]:
    """Another program on the cluster: a Python driver of its own."""
    prologue = f"""
        import sys, corral
        settings = corral.load_settings(
            {{"mount_roots": [{str(settings_folder)!r}],
              "backends": {{"ray": {{"address": {address()!r}}}}}}},
            environ={{}},
        )
    """
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(prologue) + textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_attach_from_another_driver(settings_with, made, folder: Path) -> None:
    other = _driver(
        """
        sb = corral.create(backend="ray", settings=settings, lifetime="2m")
        sb.write_file("/tmp/note", b"from the first driver")
        print(sb.id, flush=True)
        sb.detach()
        """,
        folder,
    )
    out, _ = other.communicate(timeout=120)
    sandbox_id = out.split()[-1]
    sb = corral.attach(sandbox_id, backend="ray", settings=settings_with())
    made.append(sb)
    assert sb.read_file("/tmp/note") == b"from the first driver"
    assert sb.exec(["echo", "ok"]).text == "ok\n"


def _beating(sb: corral.Sandbox) -> bool:
    """Whether the command that rewrites /tmp/beat a few times a second still runs
    (a file, as a process probe could miss it: on local, execs that run at the same
    time may be in pid namespaces of their own)."""
    first = sb.exec(["sh", "-c", "cat /tmp/beat 2>/dev/null"]).text
    time.sleep(1)
    return sb.exec(["sh", "-c", "cat /tmp/beat 2>/dev/null"]).text not in ("", first)


def test_a_sigkilled_driver_leaves_nothing_once_lifetimes_pass(settings_with, folder) -> None:
    """C04: the dead driver's running command is killed on its node once its Ray job is
    dead; its sandboxes live until their lifetime and then go, reservations included."""
    settings = settings_with()
    other = _driver(
        """
        busy = corral.create(backend="ray", settings=settings, lifetime="2m")
        idle = corral.create(backend="ray", settings=settings, lifetime="6s")
        print(busy.id, idle.id, flush=True)
        busy.exec(["sh", "-c", "while :; do date +%s%N > /tmp/beat; sleep 0.2; done"])
        """,
        folder,
    )
    assert other.stdout is not None
    busy_id, idle_id = other.stdout.readline().split()
    busy = corral.attach(busy_id, backend="ray", settings=settings)
    try:
        deadline = time.monotonic() + 30
        while not _beating(busy) and time.monotonic() < deadline:
            pass
        assert _beating(busy)  # the driver's command runs
        other.kill()  # SIGKILL: no close, no cleanup
        other.wait(30)
        deadline = time.monotonic() + 60
        while _beating(busy) and time.monotonic() < deadline:
            pass
        assert not _beating(busy), "the dead driver's command still runs"
        deadline = time.monotonic() + 40
        while idle_id in _listed(settings) and time.monotonic() < deadline:
            time.sleep(1)
        assert idle_id not in _listed(settings), "a sandbox outlived its lifetime"
        assert idle_id not in _groups()
    finally:
        busy.close()
        other.stdout.close()
    assert busy_id not in _groups()


def _listed(settings: corral.Settings) -> set[str]:
    return {i.id for i in corral.list(backend="ray", settings=settings)}


def _groups() -> set[str]:
    """The sandboxes whose placement group stands (namespace ``corral``)."""
    from corral.backends.ray.agent import standing_groups

    connect()
    return {sandbox_id for sandbox_id, _ in standing_groups("corral").values()}


def test_cli_runs_and_lists_with_the_node(folder: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")},
        "CORRAL_BACKENDS__RAY__ADDRESS": address(),
    }
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral",
            "run",
            "--backend",
            "ray",
            "--",
            "sh",
            "-c",
            "echo hi; exit 4",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,
        timeout=120,
    )
    assert (run.returncode, run.stdout) == (4, "hi\n"), run.stderr
    sb = corral.create(backend="ray", settings=ray_settings(folder))
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "corral", "ls", "--backend", "ray", "--json"],
            capture_output=True,
            text=True,
            env=env,
            cwd=folder,
            timeout=120,
        )
        mine = next(i for i in json.loads(listed.stdout) if i["id"] == sb.id)
        assert mine["node"]["id"] in alive_nodes()
        table = subprocess.run(
            [sys.executable, "-m", "corral", "ls", "--backend", "ray"],
            capture_output=True,
            text=True,
            env=env,
            cwd=folder,
            timeout=120,
        )
        assert "NODE" in table.stdout.splitlines()[0] and sb.id in table.stdout
    finally:
        sb.close()


def test_aio_and_pool(settings_with) -> None:
    import asyncio

    import corral.aio

    settings = settings_with()

    async def main() -> list[int]:
        async def one(i: int) -> int:
            async with await corral.aio.create(backend="ray", settings=settings) as sb:
                result = await sb.exec(["sh", "-c", f"exit {i}"])
                return result.exit_code

        return await asyncio.gather(*(one(i) for i in range(5)))

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]
    with corral.Pool(backend="ray", size=2, settings=settings) as pool, pool.acquire() as sb:
        assert sb.exec(["echo", "pooled"]).text == "pooled\n"


# -- faults -----------------------------------------------------------------------------


def test_a_node_killed_mid_batch(settings_with, made, shared_tmp: Path) -> None:
    """C03. The victim keeps its local sandboxes in a folder of its own, as a machine
    of its own would: nothing else of the cluster sees them until the machine's next
    node starts."""
    machine = {"CORRAL_BACKENDS__LOCAL__STATE_DIR": str(shared_tmp / "victim")}
    victim = ExtraNode("corral_victim", env=machine)
    reborn = None
    try:
        pinned = settings_with(resources={"corral_victim": 1}, call_timeout="20s")
        doomed = [corral.create(backend="ray", settings=pinned) for _ in range(3)]
        made.extend(doomed)
        others = settings_with()
        made.extend(corral.create(backend="ray", settings=others) for _ in range(2))
        # An exec is running on the node when it dies.
        running: list[BaseException] = []

        def long_exec() -> None:
            try:
                doomed[1].exec(["sleep", "600"])
            except BaseException as e:
                running.append(e)

        in_flight = threading.Thread(target=long_exec)
        in_flight.start()
        time.sleep(1)
        victim.kill()
        # Calls on its sandboxes fail, retryable and naming the node, and do not hang:
        # the exec in flight too (well before its node call's own bound, 20 s).
        caught = _first_failure(doomed[0], within=60)
        assert caught.retryable and victim.id[:12] in str(caught)
        in_flight.join(30)
        assert not in_flight.is_alive(), "an exec on a dead node hangs"
        assert isinstance(running[0], corral.BackendUnavailableError), running
        assert running[0].retryable and victim.id[:12] in str(running[0])
        # The rest of the batch goes on, on the other nodes.
        for _ in range(3):
            sb = corral.create(backend="ray", settings=others)
            made.append(sb)
            assert sb.exec(["echo", "on"]).text == "on\n"
        listed = {i.id: i for i in corral.list(backend="ray", settings=others)}
        assert {listed[sb.id].status for sb in doomed} == {corral.core.results.LOST}
        assert listed[doomed[0].id].node.id == victim.id  # type: ignore[union-attr]
        removed = corral.gc(backend="ray", settings=others)
        assert {sb.id for sb in doomed} <= set(removed)
        assert _groups().isdisjoint({sb.id for sb in doomed})
        assert len(_node_side(victim.id, machine)) == 3  # on its machine, until ...
        # ... the machine's next node starts: its agent removes what the dead one left.
        reborn = ExtraNode("corral_reborn", env=machine)
        corral.list(backend="ray", settings=others)  # starts the new node's agent
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _node_side(victim.id, machine):
            time.sleep(1)
        assert _node_side(victim.id, machine) == []
    finally:
        victim.stop()
        if reborn is not None:
            reborn.stop()


def _first_failure(sb: corral.Sandbox, within: float) -> corral.BackendUnavailableError:
    """The error a sandbox's calls raise once its node is gone (never a hang)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            sb.exec(["true"])
        except corral.BackendUnavailableError as e:
            return e
        time.sleep(0.2)
    raise AssertionError(f"calls on {sb.id} still succeed {within} s after its node died")


def _node_side(node: str, environ: dict[str, str]) -> list[str]:
    """The local sandboxes a machine of the nodes (its settings, from ``environ``) still
    holds for ``node``."""
    settings = corral.load_settings({}, environ=environ)
    return [
        i.id
        for i in corral.list(backend="local", settings=settings)
        if i.labels.get("corral.ray.node") == node
    ]


def test_an_agent_that_restarts_keeps_what_is_reserved_and_removes_the_rest(
    settings_with, made
) -> None:
    """C05."""
    settings = settings_with(max_per_node=None)
    kept = corral.create(backend="ray", settings=settings)
    stray = corral.create(backend="ray", settings=settings)
    made.extend([kept, stray])
    ray = connect()
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    listed = {i.id: i for i in corral.list(backend="ray", settings=settings)}
    # The stray's reservation goes behind corral's back, then the agents of both
    # sandboxes' nodes die.
    gid = listed[stray.id].labels["corral.ray.group"]
    remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(gid))))
    for node in {listed[stray.id].node.id, listed[kept.id].node.id}:  # type: ignore[union-attr]
        ray.kill(ray.get_actor(f"corral-agent-{node}", namespace="corral"))
    # The first call may see the old agent gone (retryable); a retry reaches the new one.
    retried = []
    for _ in range(20):
        try:
            assert kept.exec(["echo", "kept"]).text == "kept\n"
            break
        except corral.BackendUnavailableError as e:
            retried.append(e)
            time.sleep(0.5)
    else:
        raise AssertionError("the restarted agent never answered")
    assert all(e.retryable for e in retried)
    with pytest.raises(corral.NotFoundError):
        corral.attach(stray.id, backend="ray", settings=settings)


def test_a_node_whose_backend_is_broken_gets_no_sandboxes(settings_with, made) -> None:
    """C06."""
    broken = ExtraNode(
        "corral_broken",
        env={"CORRAL_BACKENDS__DOCKER__URL": "unix:///nonexistent/docker.sock"},
    )
    try:
        if not os.environ.get("CORRALTEST_DOCKER_URL"):
            pytest.skip("needs the suite's Docker engine on the other nodes")
        settings = settings_with(node_backend="docker", strategy="spread")
        for _ in range(4):
            made.append(corral.create(backend="ray", settings=settings))
        assert broken.id not in _nodes_of(made, settings)
        pinned = settings_with(node_backend="docker", resources={"corral_broken": 1})
        with pytest.raises(corral.BackendUnavailableError, match="docker"):
            corral.create(backend="ray", settings=pinned)
    finally:
        for sb in made:
            sb.close()
        made.clear()
        broken.stop()


HEAD_DRIVER = """
    import time
    import corral

    settings = corral.load_settings(
        {"backends": {"ray": {"address": ADDRESS, "call_timeout": "10s"}}}, environ={}
    )
    sb = corral.create(backend="ray", settings=settings, lifetime="20s")
    print("id", sb.id, flush=True)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            sb.exec(["true"])
            print("ok", flush=True)
        except corral.SandboxError as e:
            print("error", type(e).__name__, e.retryable, flush=True)
            break
        time.sleep(0.3)
"""


AFTER_RESTART = """
    import sys, time
    import corral

    settings = corral.load_settings({"backends": {"ray": {"address": ADDRESS}}}, environ={})
    with corral.create(backend="ray", settings=settings) as sb:
        print(sb.exec(["echo", "again"]).text, flush=True)
    local = corral.load_settings({}, environ={})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with corral.create(backend="ray", settings=settings):
            pass
        if sys.argv[1] not in {i.id for i in corral.list(backend="local", settings=local)}:
            print("swept")
            break
        time.sleep(2)
"""


def test_the_head_restarting(settings_with, made, folder: Path) -> None:
    """C07: without GCS fault tolerance a head that dies ends its cluster: the driver's
    next call fails, retryable and soon, and a new head serves new drivers; what the old
    cluster made is gone once its lifetime passed. C09: the two clusters share this
    machine (its engines, the local backend's folder), and neither touches the other's
    sandboxes (the other cluster's agents reconcile at their start)."""
    neighbour = corral.create(backend="ray", settings=settings_with())
    made.append(neighbour)
    head = OwnHead()
    head.start()
    driver = None
    try:
        code = textwrap.dedent(HEAD_DRIVER).replace("ADDRESS", repr(head.address))
        driver = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert driver.stdout is not None
        sandbox_id = driver.stdout.readline().split()[-1]
        assert driver.stdout.readline().strip() == "ok"
        head.kill()
        # The driver's next call: a corral error, retryable, well within its timeout.
        lines = [line.split() for line in driver.stdout]
        driver.wait(60)
        assert ["error", "BackendUnavailableError", "True"] in lines, lines
        head.start()
        # A new driver (this test process stays a driver of the suite's cluster only).
        # Each of its creates also runs the node backend's sweep of expired sandboxes,
        # which removes the old cluster's once its lifetime passed.
        code = textwrap.dedent(AFTER_RESTART).replace("ADDRESS", repr(head.address))
        again = subprocess.run(
            [sys.executable, "-c", code, sandbox_id],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.stdout.split() == ["again", "swept"], again.stderr[-2000:]
        assert neighbour.exec(["echo", "untouched"]).text == "untouched\n"
    finally:
        if driver is not None:
            if driver.poll() is None:
                driver.kill()
            driver.wait(30)
            if driver.stdout is not None:
                driver.stdout.close()
        head.kill()
