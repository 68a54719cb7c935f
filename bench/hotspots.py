"""Where the time of one corral operation goes, for a target the run missed.

    .venv/bin/python bench/hotspots.py exec|cycle|acquire|usage BACKEND [--rounds N]
    .venv/bin/python bench/hotspots.py phases|cpu BACKEND [--rounds N]
    .venv/bin/python bench/hotspots.py import

Runs the operation under cProfile on the suite's engines (the same defaults as run.py)
and prints the functions with the most cumulative time; ``import`` prints the slowest
modules of ``python -X importtime -c 'import corral'``; ``phases`` times each step of
the full cycle (create, exec, destroy) on both sides; ``cpu`` gives the CPU each side's
full cycle costs the calling process (user and system) and its children: what 100
threads at once queue on. Not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import backends  # noqa: E402
from backend_local import private_state_dir  # noqa: E402
from common import Config  # noqa: E402


def import_profile(top: int, rounds: int) -> None:
    """Median cumulative and own import time per module over ``rounds`` fresh interpreters."""
    totals: dict[str, list[int]] = {}
    owns: dict[str, list[int]] = {}
    for _ in range(rounds):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import corral"],
            capture_output=True,
            text=True,
            check=True,
        )
        for line in done.stderr.splitlines()[1:]:
            if not line.startswith("import time:"):
                continue
            own, total, name = (p.strip() for p in line.removeprefix("import time:").split("|"))
            totals.setdefault(name, []).append(int(total))
            owns.setdefault(name, []).append(int(own))
    print(f"median over {rounds} interpreters: cumulative µs | own µs | module")
    ranked = sorted(totals, key=lambda n: statistics.median(totals[n]), reverse=True)
    for name in ranked[:top]:
        total, own = statistics.median(totals[name]), statistics.median(owns[name])
        print(f"{total:>10.0f} | {own:>8.0f} | {name}")


def operation_profile(what: str, backend: str, rounds: int, top: int, args: argparse.Namespace):
    config = Config(
        uuid.uuid4().hex[:12], args.image, args.docker_url, args.podman_url, private_state_dir()
    )
    ours, raw = backends.module(backend).make_sides(config)
    profiler = cProfile.Profile()
    try:
        ours.cycle()  # warm
        if what == "cycle":
            profiler.enable()
            for _ in range(rounds):
                ours.cycle()
            profiler.disable()
        elif what == "acquire":
            pool = ours.pool(2)
            try:
                for _ in range(rounds):
                    pool.fill()
                    block = pool.acquire()
                    profiler.enable()
                    block.__enter__()
                    profiler.disable()
                    block.__exit__(None, None, None)
            finally:
                pool.close()
        else:
            sandbox = ours.create()
            try:
                step = ours.exec_true if what == "exec" else ours.usage
                profiler.enable()
                for _ in range(rounds):
                    step(sandbox)
                profiler.disable()
            finally:
                ours.destroy(sandbox)
    finally:
        ours.cleanup()
        raw.close()
        shutil.rmtree(config.state_dir, ignore_errors=True)
    print(f"{what} on {backend}, {rounds} rounds (per-call time: cumtime / {rounds})")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)


def phases(backend: str, rounds: int, args: argparse.Namespace) -> None:
    """Median time of each step of the full cycle, corral's and the raw client's, alternating."""
    config = Config(
        uuid.uuid4().hex[:12], args.image, args.docker_url, args.podman_url, private_state_dir()
    )
    ours, raw = backends.module(backend).make_sides(config)
    times: dict[str, list[float]] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = fn()
        times.setdefault(name, []).append(time.perf_counter() - started)
        return result

    try:
        ours.cycle()
        raw.cycle()
        for _ in range(rounds):
            for side in (ours, raw):
                handle = step(f"{side.name}: create", side.create)
                step(f"{side.name}: exec true", lambda: side.exec_true(handle))  # noqa: B023
                step(f"{side.name}: destroy", lambda: side.destroy(handle))  # noqa: B023
            if hasattr(raw, "one_shot"):
                step(f"{raw.name}: containers.run(['true'], remove=True)", raw.one_shot)
    finally:
        ours.cleanup()
        raw.cleanup()
        raw.close()
        shutil.rmtree(config.state_dir, ignore_errors=True)
    print(f"{backend}: median ms over {rounds} rounds")
    for name, values in times.items():
        print(f"{statistics.median(values) * 1000:>9.1f}  {name}")


_CPU = ("user", "system", "children_user", "children_system")


def cpu(backend: str, rounds: int, args: argparse.Namespace) -> None:
    """CPU per full cycle, in this process and in its children, each side in turn."""
    import os

    config = Config(
        uuid.uuid4().hex[:12], args.image, args.docker_url, args.podman_url, private_state_dir()
    )
    ours, raw = backends.module(backend).make_sides(config)
    try:
        ours.cycle()
        raw.cycle()
        print(f"{backend}: ms of CPU per full cycle, {rounds} cycles a side, twice")
        for side in (ours, raw, ours, raw):
            before = os.times()
            for _ in range(rounds):
                side.cycle()
            after = os.times()

            spent = {f: (getattr(after, f) - getattr(before, f)) / rounds * 1000 for f in _CPU}
            children = spent["children_user"] + spent["children_system"]
            print(
                f"{spent['user']:>7.1f} user {spent['system']:>5.1f} system "
                f"{children:>6.1f} children  {side.name}"
            )
    finally:
        ours.cleanup()
        raw.cleanup()
        raw.close()
        shutil.rmtree(config.state_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "what", choices=["exec", "cycle", "acquire", "usage", "import", "phases", "cpu"]
    )
    parser.add_argument("backend", nargs="?", default="local", choices=backends.NAMES)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--docker-url", default="unix:///run/corral-test/docker.sock")
    parser.add_argument("--podman-url", default="unix:///run/corral-test/podman.sock")
    parser.add_argument("--image", default="corral-test/busybox:latest")
    args = parser.parse_args()
    if args.what == "import":
        import_profile(args.top, args.rounds)
    elif args.what == "phases":
        phases(args.backend, args.rounds, args)
    elif args.what == "cpu":
        cpu(args.backend, args.rounds, args)
    else:
        operation_profile(args.what, args.backend, args.rounds, args.top, args)


if __name__ == "__main__":
    main()
