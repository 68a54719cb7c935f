"""corral's Podman backend against raw podman-py doing the same work, in one run.

Alternates corral and the raw client round by round, reports medians and the ratio
corral / raw. Not a test: run it by hand against a Podman service, for example the
suite's own:

    ./scripts/engines up
    .venv/bin/python bench/bench_podman.py --url unix:///run/corral-test/podman.sock

Writes bench/results/podman.md and podman.json.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import podman
from bench_docker import interleave, timed, write_table

import corral


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="unix:///run/corral-test/podman.sock")
    parser.add_argument("--image", default="corral-test/busybox:latest")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    settings = corral.load_settings(
        {"backends": {"podman": {"url": args.url, "pull": "never", "default_image": args.image}}},
        environ={},
    )
    client = podman.PodmanClient(base_url=args.url)
    detached = {"detach": True, "network_mode": "none", "command": ["sleep", "3600"]}
    corral.create(backend="podman", settings=settings).close()  # warm both clients
    client.containers.run(args.image, ["true"], remove=True, network_mode="none")
    results: dict[str, dict] = {}

    def remove(container: object) -> None:
        # podman-py's remove() waits the 10 s stop grace whatever it is given; the
        # REST call with timeout=0 is what a tuned user would write.
        client.api.delete(f"/containers/{container.id}", params={"force": True, "timeout": 0})

    def corral_create() -> float:
        t = time.perf_counter()
        sb = corral.create(backend="podman", settings=settings)
        elapsed = time.perf_counter() - t
        sb.close()
        return elapsed

    def raw_create() -> float:
        t = time.perf_counter()
        c = client.containers.run(args.image, **detached)
        elapsed = time.perf_counter() - t
        remove(c)
        return elapsed

    results["create+start"] = interleave(args.rounds, corral_create, raw_create)

    def corral_cycle() -> None:
        with corral.create(backend="podman", settings=settings) as sb:
            sb.exec(["true"])

    def raw_one_shot() -> None:  # podman-py's default one-shot cycle
        client.containers.run(args.image, ["true"], remove=True, network_mode="none")

    def raw_same_work() -> None:  # the same steps as corral's, with no stop grace
        c = client.containers.run(args.image, **detached)
        c.exec_run(["true"])
        remove(c)

    results["full cycle vs containers.run(remove=True)"] = interleave(
        args.rounds, lambda: timed(corral_cycle), lambda: timed(raw_one_shot)
    )
    results["full cycle vs run+exec_run+remove(timeout=0)"] = interleave(
        args.rounds, lambda: timed(corral_cycle), lambda: timed(raw_same_work)
    )

    sb = corral.create(backend="podman", settings=settings)
    c = client.containers.run(args.image, **detached)
    try:
        results["exec of true"] = interleave(
            args.rounds * 2,
            lambda: timed(lambda: sb.exec(["true"])),
            lambda: timed(lambda: c.exec_run(["true"])),
        )
        results["usage()"] = interleave(
            args.rounds,
            lambda: timed(sb.usage),
            lambda: timed(lambda: c.stats(stream=False, decode=True)),
        )
    finally:
        sb.close()
        remove(c)

    def corral_many() -> float:
        with ThreadPoolExecutor(20) as pool:
            t = time.perf_counter()
            made = list(
                pool.map(lambda _: corral.create(backend="podman", settings=settings), range(20))
            )
            elapsed = time.perf_counter() - t
            list(pool.map(lambda s: s.close(), made))
        return elapsed

    def raw_many() -> float:
        with ThreadPoolExecutor(20) as pool:
            t = time.perf_counter()
            made = list(
                pool.map(lambda _: client.containers.run(args.image, **detached), range(20))
            )
            elapsed = time.perf_counter() - t
            list(pool.map(lambda c: remove(c), made))
        return elapsed

    results["20 sandboxes created at once"] = interleave(3, corral_many, raw_many)
    client.close()
    print(write_table(Path(args.out), "podman", "podman-py", results))


if __name__ == "__main__":
    main()
