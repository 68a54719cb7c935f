"""Where the time of one corral operation goes, for a target the run missed.

    .venv/bin/python bench/hotspots.py exec|cycle|acquire|usage BACKEND [--rounds N]
    .venv/bin/python bench/hotspots.py import

Runs the operation under cProfile on the suite's engines (the same defaults as run.py)
and prints the functions with the most cumulative time; ``import`` prints the slowest
modules of ``python -X importtime -c 'import corral'``. Not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import backends  # noqa: E402
from backend_local import private_state_dir  # noqa: E402
from common import Config  # noqa: E402


def import_profile(top: int) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import corral"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    rows = []
    for line in lines[1:]:
        own, total, name = (part.strip() for part in line.replace("import time:", "").split("|"))
        rows.append((int(total), int(own), name))
    print("cumulative µs | own µs | module")
    for total, own, name in sorted(rows, reverse=True)[:top]:
        print(f"{total:>12} | {own:>6} | {name}")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["exec", "cycle", "acquire", "usage", "import"])
    parser.add_argument("backend", nargs="?", default="local", choices=backends.NAMES)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--docker-url", default="unix:///run/corral-test/docker.sock")
    parser.add_argument("--podman-url", default="unix:///run/corral-test/podman.sock")
    parser.add_argument("--image", default="corral-test/busybox:latest")
    args = parser.parse_args()
    if args.what == "import":
        import_profile(args.top)
    else:
        operation_profile(args.what, args.backend, args.rounds, args.top, args)


if __name__ == "__main__":
    main()
