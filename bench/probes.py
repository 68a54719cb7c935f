"""Figures measured in a fresh Python process: import time, and client memory per sandbox.

``import corral`` is timed in a new interpreter each round (median of many), alternating
with ``import docker`` and ``import podman``. Memory per idle sandbox is the growth of a
new process's RSS per open sandbox handle, for corral and for the raw client, each in
its own process (run as ``python bench/probes.py memory BACKEND SIDE N CONFIG-JSON``).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import tracemalloc
from pathlib import Path

from common import Config, Row, Target, row

HERE = Path(__file__).resolve().parent
_IMPORT = "import time; t = time.perf_counter(); import {0}; print(time.perf_counter() - t)"
# corral's API loads on first use (PEP 562): this is what the first corral.create costs.
_WITH_API = "corral; corral.create"


def _import_seconds(module: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT.format(module)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"import {module} failed: {done.stderr.strip()[-500:]}")
    return float(done.stdout.strip())


def import_rows(rounds: int) -> list[Row]:
    """``import corral`` against the engine clients and llm-sandbox, interleaved."""
    modules = ["corral", "docker", "podman", "llm_sandbox"]
    available = [m for m in modules if _importable(m)] + [_WITH_API]
    _compile_corral()
    seconds: dict[str, list[float]] = {m: [] for m in available}
    for _ in range(rounds):
        for module in available:
            seconds[module].append(_import_seconds(module))
    medians = {m: statistics.median(v) for m, v in seconds.items()}
    ours = medians.get("corral")
    note = f"fresh interpreter each round, median of {rounds}"
    rows = [row("python", "import corral", (ours, None), "", Target("< 100 ms", ms=100), note)]
    api = "what corral.create adds at its first use: the model, lifecycle and plugin host"
    rows.append(
        row("python", "import corral, then corral.create", (medians[_WITH_API], None), "", note=api)
    )
    for module in available:
        if module not in ("corral", _WITH_API):
            rows.append(
                row("python", f"import corral vs import {module}", (ours, medians[module]), module)
            )
            rows.append(
                row(
                    "python",
                    f"import corral with its API loaded vs import {module}",
                    (medians[_WITH_API], medians[module]),
                    module,
                )
            )
    return rows


def _compile_corral() -> None:
    """Give corral the bytecode an installed package has (pip compiles it; the engine
    clients in site-packages have theirs), also where PYTHONDONTWRITEBYTECODE is set
    or the checkout is editable: otherwise every round recompiles corral's source."""
    import compileall

    import corral

    compileall.compile_dir(Path(corral.__file__).parent, quiet=1)


def _importable(module: str) -> bool:
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, timeout=60
    )
    return done.returncode == 0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import resource

    return pages * resource.getpagesize()


def _measure_memory(backend: str, side_name: str, n: int, config: Config) -> dict:
    """In this (fresh) process: RSS growth per open sandbox handle on one side."""
    import backends

    ours, raw = backends.module(backend).make_sides(config)
    side = ours if side_name == "corral" else raw
    try:
        side.cycle()  # load the client, open its connections, warm its caches
        gc.collect()
        tracemalloc.start()
        before, traced_before = _rss(), tracemalloc.get_traced_memory()[0]
        handles = []
        try:
            for _ in range(n):
                handles.append(side.create())
            gc.collect()
            after, traced_after = _rss(), tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
        finally:
            for handle in handles:
                side.destroy(handle)
    finally:
        side.cleanup()
        raw.close()
    return {
        "per_sandbox_bytes": (after - before) / n,
        "python_heap_per_sandbox_bytes": (traced_after - traced_before) / n,
        "n": n,
        "rss_before": before,
    }


def memory_rows(backend: str, config: Config, n: int, raw_name: str) -> list[Row]:
    """Client-side memory per idle sandbox, corral and the raw client, each in a subprocess."""
    figures: dict[str, float | None] = {}
    heap: dict[str, str] = {}
    errors = []
    for side in ("corral", "raw"):
        done = subprocess.run(
            [
                sys.executable,
                str(HERE / "probes.py"),
                "memory",
                backend,
                side,
                str(n),
                json.dumps(dataclasses.asdict(config)),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=HERE,
        )
        if done.returncode != 0:
            errors.append(f"{side}: {done.stderr.strip().splitlines()[-1:]}")
            figures[side] = None
            continue
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        figures[side] = measured["per_sandbox_bytes"]
        heap[side] = f"{measured['python_heap_per_sandbox_bytes'] / 1024:.1f}"
    corral_kib = None if figures["corral"] is None else figures["corral"] / 1024
    raw_kib = None if figures["raw"] is None else figures["raw"] / 1024
    note = (
        f"KiB, not ms: RSS growth of a fresh process per open handle, {n} open; "
        f"Python heap per handle (tracemalloc) corral {heap.get('corral', '?')} KiB, "
        f"raw {heap.get('raw', '?')} KiB"
    )
    if errors:
        note += "; failed: " + "; ".join(errors)
    r = Row(
        backend, "client memory per idle sandbox (KiB)", corral_kib, raw_kib, raw_name, note=note
    )
    return [r]


def main(argv: list[str]) -> None:
    if len(argv) == 5 and argv[0] == "memory":
        _, backend, side, n, config = argv
        figures = _measure_memory(backend, side, int(n), Config(**json.loads(config)))
        print(json.dumps(figures))
        return
    raise SystemExit("usage: probes.py memory BACKEND corral|raw N CONFIG-JSON")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main(sys.argv[1:])
