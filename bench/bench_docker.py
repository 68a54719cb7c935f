"""corral's Docker backend against raw docker-py doing the same work, in one run.

Each measurement alternates corral and the raw client round by round (so both see the
same engine state) and reports medians and the ratio corral / raw. Not a test: run it
by hand against an engine, for example the suite's own:

    ./scripts/engines up
    .venv/bin/python bench/bench_docker.py --url unix:///run/corral-test/docker.sock

Writes bench/results/docker.md and docker.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker

import corral


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleave(rounds: int, corral_fn: Callable[[], float], raw_fn: Callable[[], float]) -> dict:
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(corral_fn())
        theirs.append(raw_fn())
    a, b = statistics.median(ours), statistics.median(theirs)
    return {"corral_ms": a * 1000, "raw_ms": b * 1000, "ratio": a / b}


def write_table(out: Path, engine: str, raw_name: str, results: dict[str, dict]) -> str:
    """Write ENGINE.json and ENGINE.md under ``out``; return the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{engine}.json").write_text(json.dumps(results, indent=2))
    lines = [f"| measurement | corral (ms) | {raw_name} (ms) | ratio |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['corral_ms']:.1f} | {r['raw_ms']:.1f} | {r['ratio']:.2f} |")
    table = "\n".join(lines)
    (out / f"{engine}.md").write_text(table + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="unix:///run/corral-test/docker.sock")
    parser.add_argument("--image", default="corral-test/busybox:latest")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    settings = corral.load_settings(
        {"backends": {"docker": {"url": args.url, "pull": "never", "default_image": args.image}}},
        environ={},
    )
    client = docker.DockerClient(base_url=args.url)  # negotiates the API version
    raw_run = {"detach": True, "network_mode": "none", "command": ["sleep", "3600"]}
    # Warm both clients (connection pools, image lookups) before measuring.
    corral.create(backend="docker", settings=settings).close()
    client.containers.run(args.image, **raw_run).remove(force=True)
    results: dict[str, dict] = {}

    def corral_create() -> float:
        t = time.perf_counter()
        sb = corral.create(backend="docker", settings=settings)
        elapsed = time.perf_counter() - t
        sb.close()
        return elapsed

    def raw_create() -> float:
        t = time.perf_counter()
        c = client.containers.run(args.image, **raw_run)
        elapsed = time.perf_counter() - t
        c.remove(force=True)
        return elapsed

    results["create+start"] = interleave(args.rounds, corral_create, raw_create)

    def corral_cycle() -> float:
        def cycle() -> None:
            with corral.create(backend="docker", settings=settings) as sb:
                sb.exec(["true"])

        return timed(cycle)

    def raw_cycle() -> float:
        def cycle() -> None:
            c = client.containers.run(args.image, **raw_run)
            c.exec_run(["true"])
            c.remove(force=True)

        return timed(cycle)

    results["full cycle (create, exec, destroy)"] = interleave(args.rounds, corral_cycle, raw_cycle)

    sb = corral.create(backend="docker", settings=settings)
    c = client.containers.run(args.image, **raw_run)
    try:
        results["exec of true"] = interleave(
            args.rounds * 2,
            lambda: timed(lambda: sb.exec(["true"])),
            lambda: timed(lambda: c.exec_run(["true"])),
        )
        results["usage()"] = interleave(
            3, lambda: timed(sb.usage), lambda: timed(lambda: c.stats(stream=False))
        )
    finally:
        sb.close()
        c.remove(force=True)

    def corral_many() -> float:
        with ThreadPoolExecutor(20) as pool:
            t = time.perf_counter()
            made = list(
                pool.map(lambda _: corral.create(backend="docker", settings=settings), range(20))
            )
            elapsed = time.perf_counter() - t
            list(pool.map(lambda s: s.close(), made))
        return elapsed

    def raw_many() -> float:
        with ThreadPoolExecutor(20) as pool:
            t = time.perf_counter()
            made = list(pool.map(lambda _: client.containers.run(args.image, **raw_run), range(20)))
            elapsed = time.perf_counter() - t
            list(pool.map(lambda c: c.remove(force=True), made))
        return elapsed

    results["20 sandboxes created at once"] = interleave(3, corral_many, raw_many)
    client.close()

    print(write_table(Path(args.out), "docker", "docker-py", results))


if __name__ == "__main__":
    main()
