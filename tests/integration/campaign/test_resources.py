"""THREATS.md B5, resource exhaustion (T33-T42), on every backend it applies to.

Every bomb runs under small limits (tens of MiB, tens of processes, MiB-sized
filesystems, seconds of time) so that no case can hurt the shared host, and each is
paired with a harmless twin under the same limits that must succeed. Nothing here
writes more than a few MiB to the host's disk: fills go to capped tmpfs folders, or are
stopped by a file-size limit, or are refused before anything is created.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import attrs
import private_engines
import pytest
from cases import RW_OPT_IN, gone, host_processes, refused, tagged, token

import corral
from corral.core import capacity
from corral.core.plugins import get_host

MiB = 1024**2
ENGINE_URLS = {"docker": "CORRALTEST_DOCKER_URL", "podman": "CORRALTEST_PODMAN_URL"}
# The fewest processes a sandbox here is given: on the engines, runc's exec helper joins
# the sandbox's pids cgroup with its threads, and with pids=8 an exec failed at random
# ("OCI runtime exec failed: read init-p: connection reset by peer", exit 126).
FEW_PIDS = 32


def engine_host_config(raw_client_of: Callable, backend: str, sandbox_id: str) -> dict:
    client = raw_client_of(backend)
    try:
        return client.inspect_container(f"corral-{sandbox_id}")["HostConfig"]
    finally:
        client.close()


def engines_only(*names: str) -> pytest.MarkDecorator:
    """Run a case on the engines only (``backend`` comes from the campaign's fixture)."""
    return pytest.mark.parametrize(
        "backend",
        [pytest.param(n, marks=getattr(pytest.mark, n)) for n in names],
        indirect=True,
    )


# -- T33 ------------------------------------------------------------------------------


@pytest.mark.through_ray
def test_t33_a_fork_bomb_hits_the_pids_limit_and_nothing_of_it_survives(sandbox):
    sb = sandbox(memory="64MiB", pids=48)
    neighbour = sandbox(memory="32MiB", pids=FEW_PIDS)
    # The twin first: a normal fork of a few children works under the same limit.
    few = sb.exec(["sh", "-c", "for i in 1 2 3 4 5 6 7 8; do sleep 0 & done; wait; echo forked"])
    assert few.ok and few.text == "forked\n"
    mark = token()
    bomb = "b() { b | b & }; b; sleep 5"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(sb.exec, ["sh", "-c", bomb, mark], timeout=4, max_output="64KiB")
        # A parallel sandbox keeps working while the bomb goes off.
        assert neighbour.exec(["echo", "ok"], timeout=60).text == "ok\n"
        peak = 0
        while not running.done():
            peak = max(peak, sb.usage().pids or 0)
            time.sleep(0.05)
        result = running.result()
    assert peak <= 48, f"the sandbox reached {peak} processes"
    assert result.timed_out or result.exit_code != 0
    assert b"fork" in result.stderr.lower(), "fork is refused inside the sandbox"
    assert gone(lambda: host_processes(mark)) == [], "bomb processes outlived the exec"
    assert sb.exec(["echo", "still usable"], timeout=60).text == "still usable\n"


# -- T34 ------------------------------------------------------------------------------

# dd fills its whole buffer: one read of bs bytes from /dev/zero touches every page.
ALLOCATE = "dd if=/dev/zero of=/dev/null bs={size} count=1 2>/dev/null && echo allocated"


def _swap_limit(backend: str, sb: corral.Sandbox, raw_client_of: Callable) -> int | None:
    """Memory plus swap the sandbox may use, as the engine or the host's cgroup says."""
    if backend != "local":
        return engine_host_config(raw_client_of, backend, sb.id)["MemorySwap"]
    memsw = Path(f"/sys/fs/cgroup/memory/corral/corral-{sb.id}/memory.memsw.limit_in_bytes")
    if memsw.exists():
        return int(memsw.read_text())
    # Without swap accounting the host must have no swap at all for "no swap" to hold.
    swap = Path("/proc/meminfo").read_text().split("SwapTotal:")[1].split()[0]
    return 32 * MiB if swap == "0" else None


@pytest.mark.through_ray
def test_t34_a_memory_bomb_is_oom_killed_and_reported_so(sandbox, kind, raw_client_of):
    sb = sandbox(memory="32MiB", pids=FEW_PIDS)
    assert _swap_limit(kind, sb, raw_client_of) == 32 * MiB, "swap would double the limit"
    under = sb.exec(["sh", "-c", ALLOCATE.format(size="8M")], timeout=60)
    assert under.ok and under.text == "allocated\n" and not under.oom_killed
    bomb = sb.exec(["sh", "-c", "exec " + ALLOCATE.format(size="256M")], timeout=60)
    assert bomb.exit_code == 137 and bomb.signal == 9
    assert bomb.oom_killed and not bomb.timed_out
    # The framework and the sandbox go on.
    after = sb.exec(["sh", "-c", ALLOCATE.format(size="8M")], timeout=60)
    assert after.ok and not after.oom_killed


# -- T35 ------------------------------------------------------------------------------


@pytest.mark.through_ray
def test_t35_an_oom_kill_belongs_to_the_exec_it_happened_in(sandbox):
    sb = sandbox(memory="32MiB", pids=FEW_PIDS)
    # The twin: a fresh sandbox's exec that allocates under the limit counts nothing.
    under = sb.exec(["sh", "-c", ALLOCATE.format(size="8M")], timeout=60)
    assert under.ok and (under.oom_killed, under.oom_events) == (False, 0)
    # A child is OOM-killed; the parent carries on and exits 0: an OOM event in this
    # exec, not an OOM-killed exec.
    child = sb.exec(
        ["sh", "-c", ALLOCATE.format(size="256M") + "; echo parent-survived; exit 0"], timeout=60
    )
    assert child.exit_code == 0 and child.text == "parent-survived\n"
    assert not child.oom_killed and child.oom_events == 1, child
    # The sandbox's OOM count is now above zero: later execs must not inherit it.
    normal = sb.exec(["echo", "ok"])
    assert normal.ok and (normal.oom_killed, normal.oom_events) == (False, 0), normal
    killed = sb.exec(["sh", "-c", "kill -9 $$"])
    assert killed.exit_code == 137 and not killed.oom_killed, "SIGKILL alone is not an OOM"
    assert killed.oom_events == 0
    again = sb.exec(["sh", "-c", "exec " + ALLOCATE.format(size="256M")], timeout=60)
    assert again.oom_killed and again.oom_events == 1, "a second OOM in the same sandbox is seen"
    assert sb.exec(["true"]).oom_events == 0


# -- T36 ------------------------------------------------------------------------------

FILL = "dd if=/dev/zero of={path} bs=1M count={mib} 2>&1; echo size=$(wc -c < {path})"


@pytest.mark.through_ray
def test_t36_a_tmpfs_fills_up_at_its_size_not_the_hosts_memory(sandbox):
    sb = sandbox(memory="64MiB", mounts=[corral.Tmpfs("/tmp", size="8MiB")])
    twin = sb.exec(["sh", "-c", FILL.format(path="/tmp/small", mib=2)], timeout=60)
    assert twin.ok and "size=2097152" in twin.text
    before = sb.usage().memory_bytes
    fill = sb.exec(["sh", "-c", FILL.format(path="/tmp/fill", mib=64)], timeout=60)
    assert "No space left on device" in fill.text
    size = int(fill.text.rsplit("size=", 1)[1])
    assert 6 * MiB <= size <= 8 * MiB, f"the fill stopped at {size} bytes, not at the cap"
    # The memory cgroup pays for what the tmpfs holds (it outlives the exec everywhere).
    after = sb.usage().memory_bytes
    assert before is not None and after is not None
    assert after - before >= 3 * MiB, (before, after)
    # Freed, the tmpfs takes writes again.
    assert sb.exec(["sh", "-c", "rm -f /tmp/fill; " + FILL.format(path="/tmp/again", mib=2)]).ok


@engines_only("docker", "podman")
@pytest.mark.through_ray
def test_t36_the_default_tmp_of_an_engine_sandbox_has_a_size(sandbox):
    sb = sandbox()
    mounts = sb.exec(["cat", "/proc/mounts"]).text
    line = next(m for m in mounts.splitlines() if m.split()[1] == "/tmp")
    assert line.split()[2] == "tmpfs" and "size=65536k" in line, line


@pytest.mark.local
@pytest.mark.skipif(os.geteuid() != 0, reason="the local folder cap is a tmpfs, mounted as root")
def test_t36_a_local_sandbox_fills_its_own_capped_folder_not_the_hosts_disk(state_dir):
    settings = corral.load_settings(
        {"backends": {"local": {"state_dir": str(state_dir), "disk_size": "24MiB"}}},
        environ={},
    )
    free = os.statvfs(state_dir).f_bavail
    with corral.create(backend="local", settings=settings, memory="128MiB") as sb:
        # The workspace and /tmp share the cap: together they hold 24 MiB, not 64.
        script = FILL.format(path="/workspace/a", mib=16) + "; "
        fill = sb.exec(["sh", "-c", script + FILL.format(path="/tmp/b", mib=48)])
        assert "No space left on device" in fill.text, fill
        sizes = [int(part.split()[0]) for part in fill.text.split("size=")[1:]]
        assert sizes[0] == 16 * 1024**2 and sum(sizes) <= 24 * 1024**2, sizes
        with pytest.raises(corral.ResourceLimitError):  # the host side meets the cap too
            sb.write_file("/workspace/c", b"x" * 16 * 1024**2)
        assert sb.exec(["sh", "-c", "rm /tmp/b; echo ok > /tmp/d; cat /tmp/d"]).text == "ok\n"
    # The host's disk did not pay for it (a tolerance for everything else on the machine).
    assert free - os.statvfs(state_dir).f_bavail < (16 * 1024**2) // os.statvfs(state_dir).f_frsize


# -- T37 ------------------------------------------------------------------------------


@pytest.mark.through_ray
def test_t37_a_read_only_root_refuses_a_fill_at_once(sandbox):
    sb = sandbox()
    fill = sb.exec(["sh", "-c", "dd if=/dev/zero of=/bigfile bs=1M count=1024"], timeout=60)
    assert fill.exit_code != 0
    assert "Read-only file system" in fill.stderr_text
    assert sb.exec(["sh", "-c", "test ! -e /bigfile"]).ok
    # The twin: the workspace is where writing is meant to go.
    small = sb.exec(["sh", "-c", FILL.format(path="small", mib=1)], timeout=60)
    assert small.ok and "size=1048576" in small.text


@pytest.mark.through_ray
def test_t37_a_disk_limit_the_backend_cannot_enforce_is_refused(sandbox):
    # No backend here can cap a writable layer (overlay2 needs xfs with pquota): fail
    # closed, before anything exists (the harness proves nothing was created).
    with pytest.raises(corral.CapabilityError, match=r"sandbox\.limits\.disk needs DISK_LIMIT"):
        sandbox(disk="1GiB")


@pytest.mark.through_ray
def test_t37_a_writable_root_is_bounded_per_file_by_the_file_size_limit(sandbox):
    # As root in the sandbox, in a folder of the image (root's, mode 755; Podman makes
    # "/" itself 555, and all capabilities are still dropped).
    sb = sandbox(
        security={"read_only_root": False, "allow_unsafe": ["read_only_root"]},
        file_size="4MiB",
        user="0:0",
    )
    fill = sb.exec(["sh", "-c", FILL.format(path="/etc/bigfile", mib=64)], timeout=60)
    assert "File too large" in fill.text or "File size limit" in fill.text, fill
    assert "size=4194304" in fill.text
    small = sb.exec(["sh", "-c", FILL.format(path="/etc/small", mib=1)], timeout=60)
    assert small.ok and "size=1048576" in small.text
    sb.close()  # destroying a sandbox that filled its root still works


# -- T38 ------------------------------------------------------------------------------


@pytest.mark.through_ray
def test_t38_a_rw_mount_fill_stops_at_the_file_size_limit_and_stays_inside(sandbox, mount_root):
    repo = mount_root / "repo"
    repo.mkdir()
    os.chmod(repo, 0o777)  # the sandbox user (an unprivileged uid) writes here
    sb = sandbox(
        mounts=[corral.Mount(str(repo), "/repo", read_only=False)],
        security=RW_OPT_IN,
        file_size="2MiB",
    )
    twin = sb.exec(["sh", "-c", FILL.format(path="/repo/small", mib=1)], timeout=60)
    assert twin.ok and (repo / "small").stat().st_size == MiB
    fill = sb.exec(["sh", "-c", FILL.format(path="/repo/big", mib=64)], timeout=60)
    assert "size=2097152" in fill.text, fill
    assert (repo / "big").stat().st_size == 2 * MiB
    assert sorted(p.name for p in mount_root.rglob("*")) == ["big", "repo", "small"]


@pytest.mark.through_ray
def test_t38_a_rw_mount_needs_its_opt_in_and_a_free_space_reserve(
    backend, api_backend, backend_settings, mount_root, settings_of, shared_tmp
):
    repo = mount_root / "repo"
    repo.mkdir()
    os.chmod(repo, 0o777)
    rw = [corral.Mount(str(repo), "/repo", read_only=False)]
    # Without the opt-in: refused, naming the mount and the fix, and nothing made.
    error = refused(
        api_backend, backend_settings, corral.PolicyError, "unbounded_rw_mounts", mounts=rw
    )
    assert "sandbox.mounts[0]" in str(error) and str(repo) in str(error)
    if backend in ENGINE_URLS:  # (through ray, this process asks no engine anything)
        # Refused before anything is asked of the engine: through a proxy that records
        # every request, only reads (its ping and version) went by.
        proxy = private_engines.EngineProxy(os.environ[ENGINE_URLS[backend]], shared_tmp)
        try:
            watched = settings_of(backend, url=proxy.url)
            refused(backend, watched, corral.PolicyError, "unbounded_rw_mounts", mounts=rw)
        finally:
            get_host().close()
            proxy.stop()
        assert [r for r in proxy.requests if not r.startswith("GET ")] == [], proxy.requests
    # Opted in, but the mount's filesystem has less free than the reserve: refused.
    greedy = attrs.evolve(backend_settings, rw_mount_reserve="1000TiB")
    error = refused(
        api_backend,
        greedy,
        corral.ResourceLimitError,
        "rw_mount_reserve",
        mounts=rw,
        security=RW_OPT_IN,
    )
    assert "sandbox.mounts[0]" in str(error)
    # Read-only binds, tmpfs and volumes need neither.
    with corral.create(
        backend=api_backend,
        settings=greedy,
        mounts=[corral.Mount(str(repo), "/ro"), corral.Tmpfs("/scratch", size="1MiB")],
        lifetime="5m",
    ) as plain:
        assert plain.exec(["sh", "-c", "ls /ro && echo x > /scratch/x"]).ok
        assert "unbounded_rw_mounts" not in plain.info.labels.get("corral.loosened", "")
    # The twin: opted in, the write reaches the host, and the loosening is on record.
    with corral.create(
        backend=api_backend,
        settings=backend_settings,
        mounts=rw,
        security=RW_OPT_IN,
        lifetime="5m",
    ) as sb:
        assert sb.exec(["sh", "-c", "echo made > /repo/out"]).ok
        assert (repo / "out").read_text() == "made\n"
        assert sb.info.labels["corral.loosened"] == "unbounded_rw_mounts"
        found = [
            i for i in corral.list(backend=api_backend, settings=backend_settings) if i.id == sb.id
        ]
        assert found and found[0].labels["corral.loosened"] == "unbounded_rw_mounts"


# -- T40 ------------------------------------------------------------------------------


def test_t40_the_cpu_quota_holds_and_usage_reads_while_throttled(sandbox):
    sb = sandbox(cpus=0.5, memory="32MiB", pids=FEW_PIDS)
    neighbour = sandbox(memory="32MiB", pids=FEW_PIDS)
    spin = "timeout 4 sh -c 'while :; do :; done' & timeout 4 sh -c 'while :; do :; done' & wait"
    with ThreadPoolExecutor(1) as pool:
        start = sb.usage()
        started = time.monotonic()
        running = pool.submit(sb.exec, ["sh", "-c", spin], timeout=60)
        samples = []
        while not running.done():
            samples.append(sb.usage())  # numbers, not exceptions, while throttled
            time.sleep(0.2)
        assert neighbour.exec(["echo", "ok"], timeout=60).text == "ok\n"
        assert running.result().exit_code in (0, 124, 143)
        wall = time.monotonic() - started
    end = sb.usage()
    assert start.cpu_seconds is not None and end.cpu_seconds is not None
    assert all(s.cpu_seconds is not None for s in samples)
    used = end.cpu_seconds - start.cpu_seconds
    # Two spinners for about 4 s under half a CPU: at most about 0.5 CPU-s per second
    # (a loaded host only lowers it). Some CPU must have been used: throttled, not frozen.
    assert 0 < used <= 0.65 * wall, f"{used:.2f} CPU-s in {wall:.2f} s"


# -- T41 ------------------------------------------------------------------------------


@engines_only("docker", "podman")
def test_t41_a_main_process_log_flood_is_not_kept_by_the_engine(sandbox, backend, raw_client_of):
    flood = "yes corral-log-flood | head -c 20000000; echo flooded > /tmp/done; exec sleep 600"
    sb = sandbox(command=["sh", "-c", flood], memory="32MiB", pids=FEW_PIDS)
    deadline = time.monotonic() + 60
    while not sb.exec(["sh", "-c", "test -e /tmp/done"]).ok and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sb.exec(["cat", "/tmp/done"]).text == "flooded\n"
    config = engine_host_config(raw_client_of, backend, sb.id)
    assert config["LogConfig"]["Type"] in ("none", ""), config["LogConfig"]
    client = raw_client_of(backend)
    try:
        log_path = client.inspect_container(f"corral-{sb.id}").get("LogPath") or ""
    finally:
        client.close()
    if log_path and os.path.exists(log_path):
        assert os.path.getsize(log_path) < MiB, f"{log_path} kept the flood"


# -- T42 ------------------------------------------------------------------------------


@pytest.mark.through_ray
def test_t42_many_sandboxes_at_once_are_distinct_and_all_go_away(sandbox):
    count = 8  # a 2-core shared machine: enough to race, not to overload
    with ThreadPoolExecutor(count) as pool:
        made = list(pool.map(lambda _: sandbox(memory="16MiB", pids=FEW_PIDS), range(count)))
        said = list(pool.map(lambda sb: sb.exec(["sh", "-c", "echo $$"], timeout=60), made))
    assert len({sb.id for sb in made}) == count
    assert [r for r in said if not r.ok] == []
    for sb in made:
        sb.close()
    # The campaign harness then proves no container, volume, folder or process is left.


# 64 creates at once against a cap of 32, as the catalogue has it; each sandbox small.
RUSH, CAP = 64, 32


def _rush(sandbox: Callable, settings: corral.Settings, tag: str) -> list:
    """``RUSH`` creates released at once from as many threads: each a Sandbox or the
    CapacityError it raised."""
    start = threading.Barrier(RUSH)

    def one(_: int) -> corral.Sandbox | corral.CapacityError:
        start.wait()
        try:
            return sandbox(
                settings=settings, memory="16MiB", pids=FEW_PIDS, labels={"campaign.case": tag}
            )
        except corral.CapacityError as e:
            return e

    with ThreadPoolExecutor(RUSH) as pool:
        return list(pool.map(one, range(RUSH)))


def _close_all(sandboxes: list[corral.Sandbox]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda sb: sb.close(), sandboxes))


def test_t42_past_max_sandboxes_a_create_fails_at_once_and_nothing_leaks(
    sandbox, backend, backend_settings
):
    assert capacity.held(backend) == 0, "an earlier case left a sandbox of this process open"
    settings = attrs.evolve(backend_settings, max_sandboxes=CAP)
    tag = uuid.uuid4().hex
    outcomes = _rush(sandbox, settings, tag)
    made = [o for o in outcomes if isinstance(o, corral.Sandbox)]
    refused = [o for o in outcomes if isinstance(o, corral.CapacityError)]
    assert (len(made), len(refused)) == (CAP, RUSH - CAP), outcomes
    assert all(e.retryable and e.backend == backend for e in refused)
    # No collisions: distinct ids, each a live sandbox of its own, exactly these listed.
    assert len({sb.id for sb in made}) == CAP
    assert sorted(tagged(backend, settings, tag)) == sorted(sb.id for sb in made)
    with ThreadPoolExecutor(8) as pool:
        said = list(pool.map(lambda sb: sb.exec(["cat", "/proc/sys/kernel/hostname"]), made))
    assert [r for r in said if not r.ok] == []
    # Still full: the twin of the refusal is a create that succeeds once one is closed.
    with pytest.raises(corral.CapacityError):
        sandbox(settings=settings, labels={"campaign.case": tag})
    made[0].close()
    made.append(sandbox(settings=settings, memory="16MiB", pids=FEW_PIDS))
    _close_all(made)
    assert tagged(backend, settings, tag) == [], "the label filter must come back empty"
    assert capacity.held(backend) == 0
    # The campaign harness then proves no container, volume, folder or process is left.


def test_t42_with_capacity_wait_the_extra_creates_queue_for_a_slot(
    sandbox, backend, backend_settings
):
    assert capacity.held(backend) == 0, "an earlier case left a sandbox of this process open"
    settings = attrs.evolve(backend_settings, max_sandboxes=CAP, capacity_wait=600.0)
    tag = uuid.uuid4().hex
    start = threading.Barrier(RUSH)

    def one(_: int) -> corral.Sandbox:
        start.wait()
        return sandbox(
            settings=settings, memory="16MiB", pids=FEW_PIDS, labels={"campaign.case": tag}
        )

    with ThreadPoolExecutor(RUSH) as pool:
        pending = {pool.submit(one, n) for n in range(RUSH)}
        first: list[corral.Sandbox] = []
        while len(first) < CAP:
            done, pending = wait(pending, timeout=300, return_when=FIRST_COMPLETED)
            assert done, "creates under the cap did not finish"
            first += [f.result() for f in done]
        assert len(first) == CAP
        # The others wait: none gets a sandbox while every slot is held.
        time.sleep(1.0)
        assert not any(f.done() for f in pending), "a create passed the cap"
        assert capacity.held(backend) == CAP
        assert len(tagged(backend, settings, tag)) == CAP
        # Each close lets one waiter in.
        _close_all(first)
        rest = [f.result(timeout=600) for f in pending]
    assert len(rest) == RUSH - CAP
    assert len({sb.id for sb in first + rest}) == RUSH, "names collided"
    assert sorted(tagged(backend, settings, tag)) == sorted(sb.id for sb in rest)
    _close_all(rest)
    assert tagged(backend, settings, tag) == [], "the label filter must come back empty"
    assert capacity.held(backend) == 0
