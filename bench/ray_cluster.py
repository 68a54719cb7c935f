"""Issue 14's benchmarks: corral's ray backend on a Ray cluster, from one corral.aio driver.

    .venv/bin/python bench/ray_cluster.py [--ray-address HOST:PORT] [--ray-sandboxes N]
    .venv/bin/python bench/run.py --only ray [--ray-address HOST:PORT] [--ray-sandboxes N]

N sandboxes (default 1000) each created, given ``exec true`` and destroyed, at most 100
alive at once, on the ray backend (node backend: local) and on the local backend in
this process, and N plain Ray tasks each running ``true`` as the floor, in rounds whose
order alternates so that the three see the same machine. Then the same steps one at a
time; the driver's memory per open sandbox handle and the node agents' memory per
sandbox (in a fresh driver); and ``ray.experimental.sandbox``: whether it runs here, and
what an actor per sandbox costs. Leaks are counted after each batch: the run's
sandboxes still listed, its placement groups still standing, and Ray memory that no
placement group holds any more. Writes bench/results/ray_cluster.md and .json. Not a
test: never asserts on time.

The address defaults to $CORRALTEST_RAY_ADDRESS (the suite's cluster, scripts/cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ray_probes  # noqa: E402
from backend_local import private_state_dir  # noqa: E402
from common import RUN_LABEL  # noqa: E402
from measure import settled  # noqa: E402
from ray_batches import (  # noqa: E402
    SANDBOX_MEMORY,
    Batch,
    Cycle,
    connect,
    corral_cycle,
    free_memory_gib,
    local_leftovers,
    memory_not_given_back,
    open_sandbox,
    ray_leftovers,
    ray_true,
    remove_ray_leftovers,
    run_batch,
    settings_for,
    standing_groups,
    task_cycle,
    unheld_memory,
)

import corral  # noqa: E402

ALIVE_AT_ONCE = 100
MEMORY_HANDLES = 200
ONE_AT_A_TIME = 30  # rounds of the unloaded measurements
KINDS = ("ray", "local", "task")
KIB = 1024


@dataclass
class Options:
    address: str
    sandboxes: int = 1000
    rounds: int = 4
    docker_url: str = "unix:///run/corral-test/docker.sock"
    image: str = "corral-test/busybox:latest"
    out: str = str(HERE / "results")


@dataclass
class Figure:
    """One row of the table: its cells as shown, and their numbers for the JSON."""

    name: str
    ray: str
    local: str = "-"
    floor: str = "-"
    ratio: str = "-"
    target: str = ""
    met: bool | None = None
    note: str = ""
    data: dict = field(default_factory=dict)
    peer: bool = False  # a row of ray.experimental.sandbox's table: its figure in ``floor``


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Run:
    """One run: the three kinds of batch in alternating rounds, then one at a time."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.run_id = uuid.uuid4().hex[:12]
        self.state_dir = private_state_dir()
        self.settings = settings_for(options.address, self.state_dir)
        self.labels = {RUN_LABEL: self.run_id}
        self.ray = connect(options.address)
        self.remote_true = ray_true(self.ray)
        self.batches = {kind: Batch() for kind in KINDS}
        self.free_memory: list[float] = []
        self.unheld: dict[str, float] = {}  # Ray memory held by nothing, before the batches
        self.not_given_back: list[str] = []

    def cycle(self, kind: str) -> Cycle:
        if kind == "task":
            return task_cycle(self.remote_true)
        return corral_cycle(kind, self.settings, self.labels)

    def batch(self, kind: str, n: int) -> Batch:
        before = set(standing_groups())
        got = asyncio.run(run_batch(n, ALIVE_AT_ONCE, self.cycle(kind)))
        if kind == "ray":
            got.leaks = settled(lambda: ray_leftovers(self.settings, self.run_id, got.ids, before))
            remove_ray_leftovers(self.settings, self.run_id, got.ids)
        elif kind == "local":
            root = os.path.join(self.state_dir, "local")
            got.leaks = settled(lambda: local_leftovers(self.settings, self.run_id, root))
        return got

    def warm(self) -> None:
        """Agents on every node, worker processes for the tasks, the local backend's
        probes: all started before anything is timed."""
        for kind, n in (("ray", 12), ("local", 4), ("task", 24)):
            got = self.batch(kind, n)
            if got.errors:
                log(f"warm-up {kind}: {len(got.errors)} errors, first: {got.errors[0]}")
                log(got.first_traceback)

    def batches_in_rounds(self) -> None:
        n, rounds = self.options.sandboxes, max(1, self.options.rounds)
        sizes = [n // rounds + (1 if i < n % rounds else 0) for i in range(rounds)]
        self.free_memory.append(free_memory_gib())
        self.unheld = unheld_memory()
        for i, size in enumerate(s for s in sizes if s):
            for kind in KINDS if i % 2 == 0 else KINDS[::-1]:
                log(f"round {i + 1}/{rounds}: {size} x {kind}")
                got = self.batch(kind, size)
                rate = got.per_second or 0
                log(f"  {rate:.1f}/s, {len(got.errors)} errors, {len(got.leaks)} leaks")
                if got.first_traceback:
                    log(got.first_traceback)
                self.batches[kind].merge(got)
        self.not_given_back = settled(lambda: memory_not_given_back(self.unheld))
        self.batches["ray"].leaks += self.not_given_back
        self.free_memory.append(free_memory_gib())

    def one_at_a_time(self, rounds: int) -> dict[str, list[float]]:
        """Unloaded: a create (closed untimed) on each backend, an exec true in a sandbox
        of each kept open, and one plain task; the kinds alternating round by round."""
        times: dict[str, list[float]] = {
            k: [] for k in ("ray create", "local create", "ray", "local", "task")
        }

        async def measure() -> None:
            kept = {b: await open_sandbox(b, self.settings, self.labels) for b in ("ray", "local")}
            try:
                for box in kept.values():  # a first exec differs from the later ones
                    await box.exec(["true"])
                for _ in range(rounds):
                    for backend in ("ray", "local"):
                        started = time.perf_counter()
                        fresh = await open_sandbox(backend, self.settings, self.labels)
                        times[f"{backend} create"].append(time.perf_counter() - started)
                        await fresh.close()
                    for backend, box in kept.items():
                        started = time.perf_counter()
                        await box.exec(["true"])
                        times[backend].append(time.perf_counter() - started)
                    started = time.perf_counter()
                    await self.remote_true.remote()
                    times["task"].append(time.perf_counter() - started)
            finally:
                for box in kept.values():
                    await box.close()

        asyncio.run(measure())
        return times

    def close(self) -> None:
        try:
            remove_ray_leftovers(self.settings, self.run_id, self.batches["ray"].ids)
        except Exception as e:
            log(f"removing the run's ray leftovers failed: {type(e).__name__}: {e}")
        try:
            corral.gc(backend="local", settings=self.settings, everything=True)
        except Exception as e:
            log(f"removing the run's local sandboxes failed: {type(e).__name__}: {e}")
        shutil.rmtree(self.state_dir, ignore_errors=True)


# -- the table ---------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def kib(size: float | None) -> str:
    return "-" if size is None else f"{size / KIB:.1f} KiB"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def plus(ours: float | None, theirs: float | None) -> float | None:
    """How many milliseconds ``ours`` (seconds) takes beyond ``theirs``."""
    return None if ours is None or theirs is None else (ours - theirs) * 1000


def batch_figures(run: Run) -> list[Figure]:
    r, lo, t = (run.batches[k] for k in KINDS)
    rate = {k: b.per_second for k, b in run.batches.items()}
    ratio = rate["ray"] / rate["local"] if rate["ray"] and rate["local"] else None
    figures = [
        Figure(
            f"{r.n} sandboxes (create, exec true, destroy; {ALIVE_AT_ONCE} at once): per second",
            f"{rate['ray'] or 0:.1f}/s",
            f"{rate['local'] or 0:.1f}/s",
            f"{rate['task'] or 0:.1f}/s",
            "-" if ratio is None else f"{ratio:.2f}x",
            "≥ 0.8x node-local",
            None if ratio is None else ratio >= 0.8,
            "ratio = ray / node-local; plain Ray task: one task running `true` per sandbox "
            "(default options, 1 CPU: 12 run at once on the cluster, the others queue in Ray)",
            {"per_second": rate, "walls": {k: b.wall for k, b in run.batches.items()}},
        )
    ]
    figures.append(cpu_figure(run))
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        ours, local = pct(r.create, q), pct(lo.create, q)
        figures.append(
            Figure(
                f"create {label}",
                ms(ours),
                ms(local),
                ratio="-" if plus(ours, local) is None else f"{plus(ours, local):+.1f} ms",
                data={"ray": ours, "local": local},
            )
        )
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        ours, local, task = pct(r.exec, q), pct(lo.exec, q), pct(t.exec, q)
        diff, judged = plus(ours, local), q == 0.5
        figures.append(
            Figure(
                f"exec true {label}",
                ms(ours),
                ms(local),
                ms(task),
                "-" if diff is None else f"{diff:+.1f} ms",
                "≤ node-local + 3 ms" if judged else "",
                (diff is not None and diff <= 3.0) if judged else None,
                "each sandbox's first exec, in the batch; plain Ray task: submit to result"
                if judged
                else "",
                {"ray": ours, "local": local, "task": task},
            )
        )
    ours, local = pct(r.destroy, 0.5), pct(lo.destroy, 0.5)
    figures.append(
        Figure(
            "destroy p50",
            ms(ours),
            ms(local),
            ratio="-" if plus(ours, local) is None else f"{plus(ours, local):+.1f} ms",
            data={"ray": ours, "local": local},
        )
    )
    figures.append(errors_figure(run))
    return figures


def cpu_figure(run: Run) -> Figure:
    """What a cycle costs in CPU: on 2 cores, what bounds the batch's throughput."""

    def cell(b: Batch) -> str:
        if not b.n:
            return "-"
        return f"{b.cpu_machine / b.n * 1000:.1f} ms ({b.cpu_driver / b.n * 1000:.1f} ms)"

    r, lo, t = (run.batches[k] for k in KINDS)
    ratio = "-"
    if r.n and lo.n and lo.cpu_machine:
        ratio = f"{(r.cpu_machine / r.n) / (lo.cpu_machine / lo.n):.2f}x"

    def top(b: Batch) -> str:
        ranked = sorted(b.cpu_by.items(), key=lambda item: -item[1])[:6]
        return ", ".join(f"{name} {seconds / b.n * 1000:.1f}" for name, seconds in ranked)

    return Figure(
        "CPU per sandbox, whole machine (driver process)",
        cell(r),
        cell(lo),
        cell(t),
        ratio,
        note="busy CPU time of all processes over the batches (/proc/stat), and of the "
        "driver with the children it reaped, divided by the sandboxes (tasks); ms per "
        f"sandbox by program, ray: {top(r) if r.n else '-'}; node-local: "
        f"{top(lo) if lo.n else '-'}",
        data={
            k: {"machine": b.cpu_machine, "driver": b.cpu_driver, "by": b.cpu_by, "n": b.n}
            for k, b in run.batches.items()
        },
    )


def errors_figure(run: Run) -> Figure:
    errors = {k: len(b.errors) for k, b in run.batches.items()}
    leaks = {k: len(b.leaks) for k, b in run.batches.items() if k != "task"}
    notes = []
    for kind, b in run.batches.items():
        if b.errors:
            notes.append(f"first {kind} error: {b.errors[0][:300]}")
        if b.leaks:
            notes.append(f"{kind} leaks: {', '.join(b.leaks[:5])}")
    if len(run.free_memory) == 2:
        unheld = sum(run.unheld.values()) / 1024**2
        notes.append(
            f"Ray memory free on the cluster {run.free_memory[0]:.2f} GiB before the batches "
            f"({unheld:.0f} MiB of it in use by no placement group), "
            f"{run.free_memory[1]:.2f} GiB after"
        )
    notes.append(
        "leaks: the run's sandboxes still listed and its placement groups still standing "
        "15 s after each batch, and Ray memory that no placement group holds and was free "
        "before; a killed node is the suite's case (test_ray.py), not run here"
    )
    return Figure(
        "errors, leaks",
        f"{errors['ray']} errors, {leaks['ray']} leaks",
        f"{errors['local']} errors, {leaks['local']} leaks",
        f"{errors['task']} errors",
        target="0 errors, 0 leaks",
        met=errors["ray"] == 0 and leaks["ray"] == 0,
        note="; ".join(notes),
        data={"errors": errors, "leaks": leaks, "free_memory_gib": run.free_memory},
    )


def unloaded_figures(alone: dict[str, list[float]]) -> list[Figure]:
    p50 = {k: statistics.median(v) if v else None for k, v in alone.items()}
    create, execs = plus(p50["ray create"], p50["local create"]), plus(p50["ray"], p50["local"])
    note = f"median of {len(alone['ray'])}, the kinds alternating"
    return [
        Figure(
            "create p50, one at a time",
            ms(p50["ray create"]),
            ms(p50["local create"]),
            ratio="-" if create is None else f"{create:+.1f} ms",
            note=note,
            data={"ray": p50["ray create"], "local": p50["local create"]},
        ),
        Figure(
            "exec true p50, one at a time in an open sandbox",
            ms(p50["ray"]),
            ms(p50["local"]),
            ms(p50["task"]),
            "-" if execs is None else f"{execs:+.1f} ms",
            "≤ node-local + 3 ms",
            None if execs is None else execs <= 3.0,
            note + "; after a first exec (local: the sandbox's agent forks each later command)",
            {"ray": p50["ray"], "local": p50["local"], "task": p50["task"]},
        ),
    ]


def memory_figures(ray_mem: dict, local_mem: dict) -> list[Figure]:
    note = "RSS growth of a fresh driver per open handle"
    for name, got in (("ray", ray_mem), ("local", local_mem)):
        if "error" in got:
            note += f"; {name} failed: {got['error']}"
        else:
            heap = kib(got["driver_heap_per_handle"])
            note += f"; Python heap per handle (tracemalloc) {name} {heap}"
    per_handle = ray_mem.get("driver_rss_per_handle")
    n = ray_mem.get("n", "?")
    workers = ray_mem.get("ray_workers", ["?", "?"])
    points = ray_mem.get("agents_rss", [])
    size = ", ".join(f"{rss / KIB**2:.1f}" for _, rss in points) or "?"
    return [
        Figure(
            f"driver memory per open sandbox handle ({n} open)",
            kib(per_handle),
            kib(local_mem.get("driver_rss_per_handle")),
            target="< 50 KiB",
            met=None if per_handle is None else per_handle < 50 * KIB,
            note=note,
            data={"ray": ray_mem, "local": local_mem},
        ),
        Figure(
            "node agent memory per sandbox",
            kib(ray_mem.get("agent_rss_per_sandbox")),
            target="stated",
            note=f"anonymous RSS of the {ray_mem.get('agents', '?')} agents (one per node) "
            f"summed: {size} MiB with 0, 1/8, 2/8 ... all {n} idle sandboxes open; the "
            "median slope between two readings",
        ),
        Figure(
            f"Ray worker processes added by {n} open sandboxes",
            "-" if "?" in workers else str(workers[1] - workers[0]),
            note=f"the cluster's `ray::` processes: {workers[0]} without, {workers[1]} with "
            "them: one agent per node serves every sandbox of its node",
        ),
    ]


def sandbox_figures(
    tools: dict, attempt: str, costs: dict, alone: dict, agent: float | None
) -> list[Figure]:
    """ray.experimental.sandbox's rows: why it cannot run here (or that it can), and
    what its design costs per sandbox that can be measured without runsc."""
    runsc = tools["runsc"] or "not on PATH"
    mkfs = tools["mkfs_erofs"] or "not on PATH"
    why = (
        f"runsc: {runsc} (apt candidate {tools['runsc_apt_candidate']}); "
        f"mkfs.erofs: {mkfs}{'' if tools['mkfs_erofs_tar'] else ', without --tar'} "
        f"(apt candidate erofs-utils {tools['erofs_utils_apt_candidate']}; --tar came "
        "with 1.7)"
    )
    figures = [
        Figure(
            "ray.experimental.sandbox: runs here?",
            "-",
            floor="yes" if tools["runs"] else "no",
            note=f"import: {tools['importable']}; {why}; one create, tried: {attempt}",
            data={"tools": tools, "attempt": attempt},
        )
    ]
    if "error" in costs:
        figures.append(Figure("ray.experimental.sandbox: actor costs", "-", note=costs["error"]))
        return _peer(figures)
    rss = [v for v in costs["rss_mib"] if v is not None]
    pss = [v for v in costs["pss_mib"] if v is not None]
    create = statistics.median(alone["ray create"]) if alone["ray create"] else None
    execs = statistics.median(alone["ray"]) if alone["ray"] else None
    figures += [
        Figure(
            "ray.experimental.sandbox: processes per sandbox",
            "0 (one agent per node)",
            floor=f"1 actor worker ({costs['distinct_pids']} processes for {costs['actors']} "
            "actors) + runsc's",
            note="its Sandbox is a Ray actor (sandbox.py) whose runtime runs `runsc run` for "
            "its one container (backend/gvisor.py); runsc's processes are not measurable here",
        ),
        Figure(
            "ray.experimental.sandbox: memory per sandbox, before runsc",
            f"{kib(agent)} in its node's agent",
            floor=(
                f"{statistics.median(rss):.1f} MiB RSS, {statistics.median(pss):.1f} MiB PSS"
                if rss and pss
                else "-"
            ),
            note=f"median of {costs['actors']} idle actors importing ray.experimental.sandbox "
            "(its actor's worker process; nothing of gVisor)",
            data=costs,
        ),
        Figure(
            "ray.experimental.sandbox: create p50, one at a time",
            ms(create),
            floor=f"≥ {ms(costs['start_p50'])}",
            target="ahead of ray.experimental.sandbox",
            met=True if create is not None and create < costs["start_p50"] else None,
            note="its create starts an actor (measured: to its first answer, one at a time; "
            "Ray hands it an idle worker process where one is free), then caches the image "
            "and starts runsc (not measurable here); met only if corral is ahead of that "
            "lower bound, else not decidable here",
        ),
        Figure(
            "ray.experimental.sandbox: exec p50, one at a time",
            ms(execs),
            floor=f"≥ {ms(costs['call_p50'])}",
            target="ahead of ray.experimental.sandbox",
            met=True if execs is not None and execs < costs["call_p50"] else None,
            note="its exec is an actor call that runs `runsc exec` (measured: an actor call "
            "running `true` in a subprocess; runsc exec is not measurable here); met only "
            "if corral is ahead of that lower bound, else not decidable here",
        ),
    ]
    return _peer(figures)


def _peer(figures: list[Figure]) -> list[Figure]:
    for f in figures:
        f.peer = True
    return figures


def experimental_sandbox(options: Options, alone: dict, agent: float | None) -> list[Figure]:
    tools = ray_probes.sandbox_tools()
    folder = tempfile.mkdtemp(prefix="bench-ray-sandbox-")
    try:
        image = ray_probes.saved_image(options.docker_url, options.image, folder)
        if image is None:
            attempt = f"not tried: no tar of {options.image} (Docker at {options.docker_url})"
        else:
            try:
                attempt = ray_probes.sandbox_attempt(image)
            except Exception as e:
                attempt = f"{type(e).__name__}: {e}"
            if attempt == "created":  # it runs here: the same batch (never so far)
                n = min(options.sandboxes, ALIVE_AT_ONCE)
                got = asyncio.run(run_batch(n, 12, ray_probes.sandbox_cycle(image)))
                attempt += (
                    f"; {n} cycles at {got.per_second or 0:.1f}/s, create p50 "
                    f"{ms(pct(got.create, 0.5))}, exec p50 {ms(pct(got.exec, 0.5))}, "
                    f"{len(got.errors)} errors"
                )
        try:
            costs = ray_probes.actor_costs(4, ONE_AT_A_TIME)
        except Exception as e:
            costs = {"error": f"{type(e).__name__}: {e}"}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return sandbox_figures(tools, attempt, costs, alone, agent)


def markdown(figures: list[Figure], meta: dict) -> str:
    def cells(*values: str) -> str:
        return "| " + " | ".join(v.replace("|", "\\|").replace("\n", " ") for v in values) + " |"

    def met(f: Figure) -> str:
        return "" if f.met is None else ("yes" if f.met else "**no**")

    prefix = "ray.experimental.sandbox: "
    columns = ("corral ray", "node-local", "plain Ray task", "ratio", "target", "met?", "note")
    out = [
        "## Ray cluster (issue 14)",
        "",
        f"Run {meta['started']} ({meta['seconds']:.0f} s), {meta['sandboxes']} sandboxes of "
        f"each kind in {meta['rounds']} alternating rounds, at most {ALIVE_AT_ONCE} alive at "
        f"once, {SANDBOX_MEMORY} each; cluster at {meta['address']} ({meta['nodes']} nodes, "
        f"Ray {meta['ray']}); {meta['cpus']} CPUs here, load average "
        f"{meta['load_average'][0]} at the start and {meta['load_average'][1]} at the end.",
        "",
        cells("measurement", *columns),
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for f in (f for f in figures if not f.peer):
        out.append(cells(f.name, f.ray, f.local, f.floor, f.ratio, f.target, met(f), f.note))
    out += [
        "",
        "### ray.experimental.sandbox",
        "",
        cells("measurement", "corral ray", "ray.experimental.sandbox", "target", "met?", "note"),
        "|---|---:|---:|---|---|---|",
    ]
    for f in (f for f in figures if f.peer):
        name = f.name.removeprefix(prefix)
        out.append(cells(name, f.ray, f.floor, f.target, met(f), f.note))
    return "\n".join(out) + "\n"


def run(options: Options) -> int:
    """The whole section; writes ray_cluster.md and .json under ``options.out``."""
    import json

    started, clock = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.monotonic()
    load_before = os.getloadavg()[0]
    bench = Run(options)
    try:
        log(f"== ray cluster at {options.address}: warm-up")
        bench.warm()
        bench.batches_in_rounds()
        figures = batch_figures(bench)
        log("== one at a time")
        alone = bench.one_at_a_time(ONE_AT_A_TIME)
        figures += unloaded_figures(alone)
        handles = min(MEMORY_HANDLES, options.sandboxes)
        log(f"== memory: {handles} open handles, in fresh drivers")
        ray_mem = ray_probes.memory("ray", handles, options.address, bench.run_id)
        local_mem = ray_probes.memory("local", handles, options.address, bench.run_id)
        figures += memory_figures(ray_mem, local_mem)
        log("== ray.experimental.sandbox")
        figures += experimental_sandbox(options, alone, ray_mem.get("agent_rss_per_sandbox"))
    finally:
        bench.close()
    meta: dict[str, Any] = {
        "started": started,
        "seconds": time.monotonic() - clock,
        "sandboxes": options.sandboxes,
        "rounds": options.rounds,
        "address": options.address,
        "nodes": sum(1 for n in bench.ray.nodes() if n["Alive"]),
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "cpus": os.cpu_count(),
        "run_id": bench.run_id,
        "python": platform.python_version(),
        "ray": bench.ray.__version__,
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
    }
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(figures, meta)
    (out / "ray_cluster.md").write_text(text)
    rows = [asdict(f) for f in figures]
    (out / "ray_cluster.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n"
    )
    print(text)
    log(f"written: {out / 'ray_cluster.md'} and ray_cluster.json")
    return 0  # a missed target is the table's to say; a failed run raised above


def add_options(parser: argparse.ArgumentParser) -> None:
    """This section's options (run.py offers them too)."""
    parser.add_argument(
        "--ray-address",
        default=os.environ.get("CORRALTEST_RAY_ADDRESS"),
        help="the Ray cluster (default: $CORRALTEST_RAY_ADDRESS); none: no Ray section",
    )
    parser.add_argument(
        "--ray-sandboxes", type=int, default=1000, help="sandboxes of each kind (default 1000)"
    )
    parser.add_argument(
        "--ray-rounds", type=int, default=4, help="alternating rounds they come in (default 4)"
    )


def options_of(args: argparse.Namespace) -> Options:
    return Options(
        address=args.ray_address,
        sandboxes=args.ray_sandboxes,
        rounds=args.ray_rounds,
        docker_url=args.docker_url,
        image=args.image,
        out=args.out,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser)
    parser.add_argument("--docker-url", default="unix:///run/corral-test/docker.sock")
    parser.add_argument("--image", default="corral-test/busybox:latest")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    if not args.ray_address:
        parser.error("no Ray cluster: pass --ray-address or set CORRALTEST_RAY_ADDRESS")
    return run(options_of(args))


if __name__ == "__main__":
    sys.exit(main())
