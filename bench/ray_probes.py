"""The Ray benchmarks' probes: memory per sandbox (in a fresh driver process), and
``ray.experimental.sandbox``: what it needs, whether it runs here, what an actor per
sandbox costs.

The memory probe runs as ``python bench/ray_probes.py memory BACKEND N ADDRESS RUN_ID``
and prints its figures as JSON. Process memory is read from /proc, so the cluster's
nodes must run on this machine (as the suite's do).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from backend_local import private_state_dir  # noqa: E402
from common import RUN_LABEL  # noqa: E402
from ray_batches import (  # noqa: E402
    NAMESPACE,
    Batch,
    Cycle,
    bounded,
    connect,
    corral_cycle,
    open_sandbox,
    run_batch,
    settings_for,
)

import corral  # noqa: E402

KIB, MIB = 1024, 1024**2


def rss_of(pid: int | str = "self", field: str = "VmRSS:") -> int | None:
    """Resident set size in bytes of a process of this machine (``RssAnon:``: its
    anonymous part alone); None if unreadable."""
    return _proc_field(f"/proc/{pid}/status", field)


def pss_of(pid: int | str) -> int | None:
    """Proportional set size in bytes: pages shared with other processes (the Python
    and Ray libraries every worker maps) count divided among them."""
    return _proc_field(f"/proc/{pid}/smaps_rollup", "Pss:")


def _proc_field(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * KIB
    except OSError:
        return None
    return None


def ray_worker_count(address: str) -> int:
    """Worker processes (``ray::...``) of the cluster at ``address``: those whose parent
    is one of its raylets (other clusters may run on this machine too)."""
    commands, parents = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    commands[int(entry)] = f.read()
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
                parents[int(entry)] = int(text[text.rindex(")") + 2 :].split()[1])
    flag = f"--gcs-address={address}".encode()
    raylets = {pid for pid, c in commands.items() if b"raylet" in c.split(b"\0")[0] and flag in c}
    return sum(
        1 for pid, c in commands.items() if c.startswith(b"ray::") and parents.get(pid) in raylets
    )


def agent_pids() -> dict[str, int]:
    """The node agents' pids by node id (an agent answers ``ping`` with its pid)."""
    import ray

    from corral.backends.ray.agent import agent_name

    pids = {}
    for node in ray.nodes():
        if node["Alive"]:
            with contextlib.suppress(Exception):
                handle = ray.get_actor(agent_name(node["NodeID"]), namespace=NAMESPACE)
                pids[node["NodeID"]] = ray.get(handle.ping.remote(), timeout=30)
    return pids


def _agents_rss(pids: dict[str, int]) -> int | None:
    """The agents' anonymous RSS summed, the median of a few readings. Anonymous only:
    the kernel's reclaim (DAMON runs on these machines) takes file pages back and forth,
    which moves the whole RSS by megabytes from one moment to the next."""
    readings = []
    for _ in range(5):
        sizes = [rss_of(pid, "RssAnon:") for pid in pids.values()]
        if not sizes or None in sizes:
            return None
        readings.append(sum(s for s in sizes if s is not None))
        time.sleep(0.2)
    return int(statistics.median(readings))


# -- memory per sandbox, in a fresh driver ---------------------------------------------


async def _memory(
    backend: str, n: int, address: str, settings: corral.Settings, run_id: str
) -> dict:
    labels = {RUN_LABEL: run_id}
    # Warm first: corral.aio's threads, the connection to the cluster, every agent.
    await run_batch(20, 20, corral_cycle(backend, settings, labels))
    pids = agent_pids() if backend == "ray" else {}
    workers_before = ray_worker_count(address)
    gc.collect()
    tracemalloc.start()
    before, heap_before = rss_of(), tracemalloc.get_traced_memory()[0]
    # The agents' RSS at 0, n/8, ... n open sandboxes: its slope is what a sandbox costs
    # them (two readings alone would be within their noise).
    points: list[tuple[int, int]] = []
    handles = []
    try:
        for i in range(n + 1):
            if pids and i % max(1, n // 8) == 0 and (rss := _agents_rss(pids)) is not None:
                points.append((i, rss))
            if i < n:  # one at a time, as probes.py does: no extra threads at work
                handles.append(await open_sandbox(backend, settings, labels))
        gc.collect()
        after, heap_after = rss_of(), tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        workers_with = ray_worker_count(address)
    finally:
        await asyncio.gather(*(h.close() for h in handles), return_exceptions=True)
    if before is None or after is None:
        raise RuntimeError("cannot read this process's RSS from /proc/self/status")
    # The median of the slopes between every two readings (Theil-Sen): a reading
    # caught in the middle of an allocator's growth moves it little.
    slopes = [(b[1] - a[1]) / (b[0] - a[0]) for i, a in enumerate(points) for b in points[i + 1 :]]
    per_sandbox = statistics.median(slopes) if slopes else None
    return {
        "n": n,
        "driver_rss_per_handle": (after - before) / n,
        "driver_heap_per_handle": (heap_after - heap_before) / n,
        "agents": len(pids),
        "agents_rss": points,
        "agent_rss_per_sandbox": per_sandbox,
        "ray_workers": [workers_before, workers_with],
    }


def memory(backend: str, n: int, address: str, run_id: str) -> dict:
    """Driver memory per open handle (and, for ray, the agents' per sandbox), measured in
    a fresh Python process so that its RSS is the driver's alone; ``{"error": ...}``
    if it failed."""
    done = subprocess.run(
        [sys.executable, __file__, "memory", backend, str(n), address, run_id],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=HERE,
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _memory_main(backend: str, n: int, address: str, run_id: str) -> None:
    state_dir = private_state_dir()
    settings = settings_for(address, state_dir)
    try:
        if backend == "ray":
            connect(address)
        print(json.dumps(asyncio.run(_memory(backend, n, address, settings, run_id))))
    finally:
        with contextlib.suppress(Exception):
            corral.gc(backend="local", settings=settings, everything=True)
        shutil.rmtree(state_dir, ignore_errors=True)


# -- ray.experimental.sandbox ----------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({type(e).__name__})"
    return ((done.stdout + done.stderr).strip().splitlines() or [""])[0]


def _apt_candidate(package: str) -> str | None:
    """The version apt would install here (read from the local package lists)."""
    if shutil.which("apt-cache") is None:
        return None
    out = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, timeout=30
    ).stdout
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            return line.split(":", 1)[1].strip()
    return None


def sandbox_tools() -> dict[str, Any]:
    """What ray.experimental.sandbox needs on a node, as found on this machine: runsc,
    and an mkfs.erofs that builds from a tar (``--tar``: erofs-utils 1.7 or later,
    checked as Ray checks it, in ``image_utils.mkfs_erofs_path``)."""
    found: dict[str, Any] = {}
    try:
        import ray.experimental.sandbox  # noqa: F401

        found["importable"] = True
    except Exception as e:
        found["importable"] = f"{type(e).__name__}: {e}"
    runsc = shutil.which("runsc")
    found["runsc"] = runsc and _first_line([runsc, "--version"])
    found["runsc_apt_candidate"] = _apt_candidate("runsc")
    mkfs = shutil.which("mkfs.erofs")
    found["mkfs_erofs"] = mkfs and _first_line([mkfs, "--help"])
    found["mkfs_erofs_tar"] = False
    if mkfs:
        helped = subprocess.run([mkfs, "--help"], capture_output=True, text=True, timeout=30)
        found["mkfs_erofs_tar"] = "--tar" in helped.stdout + helped.stderr
    found["erofs_utils_apt_candidate"] = _apt_candidate("erofs-utils")
    found["runs"] = bool(runsc and found["mkfs_erofs_tar"])
    return found


def saved_image(docker_url: str, image: str, folder: str) -> str | None:
    """``image`` as a ``docker save`` tar in ``folder``: its image manager takes one
    without a registry (none is reachable here). None where the engine does not answer."""
    try:
        import docker

        client = docker.DockerClient(base_url=docker_url, timeout=60)
        path = os.path.join(folder, "image.tar")
        try:
            with open(path, "wb") as f:
                for chunk in client.images.get(image).save():
                    f.write(chunk)
        finally:
            client.close()
        os.chmod(folder, 0o755)
        return path
    except Exception:
        return None


def sandbox_attempt(image_tar: str) -> str:
    """Create one ray.experimental.sandbox: ``created``, or the error it answered."""
    import ray
    from ray.experimental import sandbox

    handle = sandbox.create(image=image_tar, timeout_seconds=60)
    try:
        ray.get(handle.get_instance_id.remote(), timeout=180)
        return "created"
    except Exception as e:
        text = str(e).strip()
        marker = "SandboxCreationError: "
        if marker in text:
            return marker + text.split(marker, 1)[1].strip().splitlines()[0]
        return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}"
    finally:
        with contextlib.suppress(Exception):
            handle.delete.remote()
        ray.kill(handle)


def sandbox_cycle(image_tar: str) -> Cycle:
    """The same cycle through ray.experimental.sandbox (run only where it works)."""
    import ray
    from ray.experimental import sandbox

    async def cycle(batch: Batch) -> None:
        started = time.perf_counter()
        handle = sandbox.create(image=image_tar, timeout_seconds=60)
        try:
            await bounded(handle.get_instance_id.remote(), "ray.experimental.sandbox create")
            made = time.perf_counter()
            batch.create.append(made - started)
            result = await bounded(handle.exec.remote(["true"]), "its exec")
            batch.exec.append(time.perf_counter() - made)
            if result.exit_code != 0:
                raise RuntimeError(f"true exited {result.exit_code}: {result.stderr!r}")
            closing = time.perf_counter()
            await bounded(handle.delete.remote(), "its delete")
            batch.destroy.append(time.perf_counter() - closing)
        finally:
            ray.kill(handle)

    return cycle


def actor_costs(count: int, calls: int) -> dict[str, Any]:
    """What an actor per sandbox costs before any runsc: ``count`` idle actors that
    import ray.experimental.sandbox (as its Sandbox actor does), started one at a
    time. Their start (to the first answer), each one's worker process (pid, RSS, PSS),
    and an actor call running ``true`` in a subprocess (the floor of its exec)."""
    import ray

    class SandboxLikeActor:
        def __init__(self) -> None:
            import ray.experimental.sandbox  # noqa: F401

        def pid(self) -> int:
            import os

            return os.getpid()

        def run_true(self) -> int:
            import subprocess

            return subprocess.run(["true"], check=False).returncode

    remote = ray.remote(SandboxLikeActor)
    actors, starts, pids = [], [], []
    try:
        for _ in range(count):
            started = time.perf_counter()
            actor = remote.remote()
            actors.append(actor)
            pids.append(ray.get(actor.pid.remote(), timeout=180))
            starts.append(time.perf_counter() - started)
        time.sleep(1.0)  # each worker settled after its start
        rss = [rss_of(pid) for pid in pids]
        pss = [pss_of(pid) for pid in pids]
        call_times = []
        for i in range(calls):
            started = time.perf_counter()
            ray.get(actors[i % len(actors)].run_true.remote(), timeout=60)
            call_times.append(time.perf_counter() - started)
    finally:
        for actor in actors:
            ray.kill(actor)
    return {
        "actors": count,
        "distinct_pids": len(set(pids)),
        "start_p50": statistics.median(starts),
        "starts": starts,
        "call_p50": statistics.median(call_times),
        "rss_mib": [None if r is None else r / MIB for r in rss],
        "pss_mib": [None if p is None else p / MIB for p in pss],
    }


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "memory":
        raise SystemExit("usage: ray_probes.py memory ray|local N ADDRESS RUN_ID")
    _memory_main(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
