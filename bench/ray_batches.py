"""What the Ray benchmarks share: the run's settings, concurrent batches of cycles timed
step by step, and the leak checks on a Ray cluster that others may be using too.

A cycle is one sandbox created, given ``exec true`` and destroyed through corral.aio
(or one plain Ray task running ``true``); a batch runs many, a bounded number at once,
and counts errors instead of raising them. Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import RUN_LABEL

import corral
import corral.aio as aio

# Small enough that 200 sandboxes fit the suite's cluster (3 nodes of 4 GiB of Ray
# memory): a ray sandbox reserves its memory limit on its node.
SANDBOX_MEMORY = "32MiB"
LIFETIME = "15m"  # what a crashed run leaves behind expires on its own
OP_TIMEOUT = 120.0  # seconds one create, exec or destroy may take: a hang is an error
NAMESPACE = "corral"


@dataclass
class Batch:
    """Cycles of one kind: their step latencies in seconds, wall time, errors, the ids
    of the sandboxes made, and what was left behind."""

    n: int = 0
    wall: float = 0.0
    create: list[float] = field(default_factory=list)
    exec: list[float] = field(default_factory=list)
    destroy: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    first_traceback: str = ""
    ids: set[str] = field(default_factory=set)
    leaks: list[str] = field(default_factory=list)
    cpu_machine: float = 0.0  # busy CPU seconds of the whole machine over the batch
    cpu_driver: float = 0.0  # ... of this process and the children it reaped
    cpu_by: dict[str, float] = field(default_factory=dict)  # ... by program (comm)

    def merge(self, other: Batch) -> None:
        self.n += other.n
        self.wall += other.wall
        self.cpu_machine += other.cpu_machine
        self.cpu_driver += other.cpu_driver
        for name, seconds in other.cpu_by.items():
            self.cpu_by[name] = self.cpu_by.get(name, 0.0) + seconds
        for name in ("create", "exec", "destroy", "errors", "leaks"):
            getattr(self, name).extend(getattr(other, name))
        self.first_traceback = self.first_traceback or other.first_traceback
        self.ids |= other.ids

    @property
    def per_second(self) -> float | None:
        return self.n / self.wall if self.wall else None


Cycle = Callable[[Batch], Awaitable[None]]


async def bounded(awaitable: Awaitable[Any], what: str) -> Any:
    """``awaitable``, or a TimeoutError naming ``what`` once OP_TIMEOUT passes (a hang)."""
    try:
        return await asyncio.wait_for(awaitable, OP_TIMEOUT)
    except asyncio.TimeoutError:
        raise TimeoutError(f"{what} did not finish within {OP_TIMEOUT:g} s") from None


async def run_batch(n: int, limit: int, cycle: Cycle) -> Batch:
    """``n`` cycles, at most ``limit`` at once; errors counted, not raised."""
    batch = Batch(n=n)
    gate = asyncio.Semaphore(limit)

    async def one() -> None:
        async with gate:
            try:
                await cycle(batch)
            except Exception as e:
                batch.errors.append(f"{type(e).__name__}: {e}")
                sandbox_id = getattr(e, "sandbox_id", None)
                if sandbox_id:  # a create that failed may have left its sandbox's parts
                    batch.ids.add(sandbox_id)
                if not batch.first_traceback:
                    batch.first_traceback = traceback.format_exc()

    machine, driver, processes = machine_busy(), driver_busy(), process_busy()
    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    batch.wall = time.perf_counter() - started
    batch.cpu_machine, batch.cpu_driver = machine_busy() - machine, driver_busy() - driver
    batch.cpu_by = busy_by_program(processes, process_busy())
    return batch


def machine_busy() -> float:
    """CPU seconds the machine has been busy since boot (all CPUs, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait; guest time is in user already
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_busy() -> dict[int, tuple[str, float]]:
    """Every process's program and CPU seconds, its reaped children's included (a node
    agent's bwraps count as the agent's; orphans count as pid 1's)."""
    tick, found = os.sysconf("SC_CLK_TCK"), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = text[text.rindex(")") + 2 :].split()
        seconds = sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
        found[int(entry)] = (
            _program(int(entry), text[text.index("(") + 1 : text.rindex(")")]),
            seconds,
        )
    return found


def _program(pid: int, name: str) -> str:
    if pid == os.getpid():
        return "driver"
    if pid == 1:
        return "pid 1 (with the orphans it reaped)"
    return name.split("/")[0] if name.startswith("kworker") else name  # kworker/u8:2-...


def busy_by_program(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds spent between two ``process_busy`` snapshots, by program (a process
    that ended unreaped by one seen here is not counted)."""
    spent: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        used = seconds - before[pid][1] if pid in before else seconds
        if used > 0:
            spent[name] = spent.get(name, 0.0) + used
    return spent


def driver_busy() -> float:
    """CPU seconds of this process and its reaped children (the local backend's)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


async def open_sandbox(
    backend: str, settings: corral.Settings, labels: dict[str, str]
) -> aio.AsyncSandbox:
    return await bounded(
        aio.create(
            backend=backend,
            settings=settings,
            labels=labels,
            memory=SANDBOX_MEMORY,
            lifetime=LIFETIME,
        ),
        "create",
    )


def corral_cycle(backend: str, settings: corral.Settings, labels: dict[str, str]) -> Cycle:
    """create, exec true, destroy through corral.aio, each step timed."""

    async def cycle(batch: Batch) -> None:
        started = time.perf_counter()
        sandbox = await open_sandbox(backend, settings, labels)
        made = time.perf_counter()
        batch.create.append(made - started)
        batch.ids.add(sandbox.id)
        try:
            result = await bounded(sandbox.exec(["true"]), f"exec in {sandbox.id}")
            batch.exec.append(time.perf_counter() - made)
            if result.exit_code != 0:
                raise RuntimeError(f"true exited {result.exit_code}: {result.stderr!r}")
        finally:
            closing = time.perf_counter()
            await bounded(sandbox.close(), f"destroy of {sandbox.id}")
            batch.destroy.append(time.perf_counter() - closing)

    return cycle


def ray_true(ray: Any) -> Any:
    """A plain Ray task (default options: 1 CPU) that runs ``true`` in a subprocess.
    Defined in a function, not at module level, so that Ray ships it by value: the
    workers cannot import this folder's modules."""

    def run_true() -> int:
        import subprocess

        return subprocess.run(["true"], check=False).returncode

    return ray.remote(run_true)


def task_cycle(remote: Any) -> Cycle:
    async def cycle(batch: Batch) -> None:
        started = time.perf_counter()
        code = await bounded(remote.remote(), "a plain Ray task")
        batch.exec.append(time.perf_counter() - started)
        if code != 0:
            raise RuntimeError(f"true exited {code} in a Ray task")

    return cycle


def settings_for(address: str, state_dir: str) -> corral.Settings:
    """The ray backend at ``address`` with local node backends, and a local backend
    whose state lives in the run's private folder (out of the suite's sight)."""
    return corral.load_settings(
        {
            "backends": {
                "local": {"state_dir": state_dir},
                "ray": {"address": address, "node_backend": "local"},
            }
        },
        cwd=Path(state_dir),
        environ={},
    )


def connect(address: str) -> Any:
    """This process as a driver of the cluster (the ray backend then uses it as it is)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address=address,
            namespace=NAMESPACE,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    return ray


# -- leaks: the cluster is shared, so only the run's own count --------------------------


def standing_groups() -> dict[str, tuple[str, str]]:
    """corral's placement groups not removed: group id -> (sandbox id, group name)."""
    from ray.util.placement_group import placement_group_table

    found = {}
    for gid, group in placement_group_table().items():
        name = group.get("name", "")
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "corral" and group["state"] != "REMOVED":
            found[gid] = (parts[1], name)
    return found


def ray_leftovers(
    settings: corral.Settings, run_id: str, ids: set[str], before: set[str]
) -> list[str]:
    """The run's sandboxes the cluster still lists, and ``corral.*`` placement groups
    still standing that are the run's, or new since ``before`` and no listed sandbox's
    (a failed create's group names a sandbox id the driver never saw)."""
    listed = corral.list(backend="ray", settings=settings)
    ours = [f"sandbox {i.id}" for i in listed if i.labels.get(RUN_LABEL) == run_id]
    everyone = {i.id for i in listed}
    groups = [
        f"placement group {name}"
        for gid, (sid, name) in standing_groups().items()
        if sid in ids or (gid not in before and sid not in everyone)
    ]
    return ours + groups


def local_leftovers(settings: corral.Settings, run_id: str, root: str) -> list[str]:
    listed = corral.list(backend="local", settings=settings)
    found = [f"sandbox {i.id}" for i in listed if i.labels.get(RUN_LABEL) == run_id]
    with contextlib.suppress(FileNotFoundError):
        found += [f"folder {name}" for name in os.listdir(root)]
    return found


def remove_ray_leftovers(settings: corral.Settings, run_id: str, ids: set[str]) -> None:
    """Remove what the run left on the cluster, and only that."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for info in corral.list(backend="ray", settings=settings):
        if info.labels.get(RUN_LABEL) == run_id:
            with contextlib.suppress(corral.SandboxError):
                corral.attach(info.id, backend="ray", settings=settings).close()
    for gid, (sid, _) in standing_groups().items():
        if sid in ids:
            with contextlib.suppress(Exception):
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(gid))))


def free_memory_gib() -> float:
    """Ray memory free on the whole cluster: what sandboxes can still reserve."""
    import ray

    return float(ray.available_resources().get("memory", 0.0)) / 1024**3


def unheld_memory() -> dict[str, float]:
    """By node, the Ray memory in use that no standing placement group holds, in
    bytes: resources a removed group did not give back (the cluster's other users
    hold theirs in groups too; a task or actor that reserves memory would count here)."""
    import ray
    from ray._private.state import available_resources_per_node  # as the backend does
    from ray.util.placement_group import placement_group_table

    totals = {n["NodeID"]: n["Resources"].get("memory", 0.0) for n in ray.nodes() if n["Alive"]}
    free = available_resources_per_node()
    held = dict.fromkeys(totals, 0.0)
    for group in placement_group_table().values():
        if group["state"] == "REMOVED":
            continue
        for index, bundle in group["bundles"].items():
            node = group["bundles_to_node_id"].get(index)
            if node in held:
                held[node] += bundle.get("memory", 0.0)
    return {
        node: total - free.get(node, {}).get("memory", 0.0) - held[node]
        for node, total in totals.items()
    }


def memory_not_given_back(before: dict[str, float]) -> list[str]:
    """What ``unheld_memory`` grew by since ``before``, node by node."""
    return [
        f"{(now - before.get(node, 0.0)) / 1024**2:.0f} MiB of Ray memory on node "
        f"{node[:8]} held by no placement group"
        for node, now in unheld_memory().items()
        if now - before.get(node, 0.0) > 0
    ]
