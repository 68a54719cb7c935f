"""Every benchmark of issue 7 in one run: corral against the raw clients, per backend.

    .venv/bin/python bench/run.py [--backends local,docker,podman] [--rounds N] [--quick]
    .venv/bin/python bench/run.py --only ray [--ray-address HOST:PORT] [--ray-sandboxes N]

First ``import corral`` time, on the machine still quiet. Then per backend (local
against bwrap by hand, docker against docker-py, podman against podman-py), corral and
the raw client alternate round by round doing the same work: a ready sandbox cold and
from a warm pool, the full cycle, an exec, usage(), file copies of 1 KiB and 10 MiB,
20 and 100 concurrent sandboxes, client memory per idle sandbox, and llm-sandbox where
it is installed. Writes
bench/results/benchmarks.md and benchmarks.json. Everything made carries the run's
label and is removed at the end, also after an error. Not a test: never asserts on time.
The engines default to the test suite's (``scripts/engines up``).

Where a Ray cluster is given (``--ray-address``, else $CORRALTEST_RAY_ADDRESS), issue
14's section follows (bench/ray_cluster.py), with results of its own in
bench/results/ray_cluster.md and .json; ``--only ray`` runs that section alone.

Issue 15's section (bench/long_lived.py: spawn, the echo through a spawned cat, pause
and resume, snapshot and fork, per backend) runs after the backends' own; its rows go
into the same results. ``--only long-lived`` runs it alone, into
bench/results/long_lived.md and .json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
import traceback
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import backends  # noqa: E402
import long_lived  # noqa: E402
import measure  # noqa: E402
import probes  # noqa: E402
import ray_cluster  # noqa: E402
from backend_local import private_state_dir  # noqa: E402
from common import Config, Row, markdown, write_results  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(backends.NAMES))
    parser.add_argument("--rounds", type=int, default=None, help="default 10 (5 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, 20 concurrent only")
    parser.add_argument("--docker-url", default="unix:///run/corral-test/docker.sock")
    parser.add_argument("--podman-url", default="unix:///run/corral-test/podman.sock")
    parser.add_argument("--image", default="corral-test/busybox:latest")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--only", choices=["ray", "long-lived"], help="run this section alone")
    ray_cluster.add_options(parser)
    return parser.parse_args(argv)


def plan_of(args: argparse.Namespace) -> measure.Plan:
    rounds = args.rounds or (5 if args.quick else 10)
    if args.quick:
        return measure.Plan(rounds, 2, (20,), {20: 1})
    return measure.Plan(rounds, 3)


def usage_rounds(backend: str, plan: measure.Plan) -> measure.Plan:
    """docker-py's stats() waits for a second sample (2 s a call): few rounds there."""
    if backend == "docker":
        return plan
    return measure.Plan(
        plan.rounds, plan.rounds, plan.concurrency, plan.concurrency_rounds, plan.pool_size
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.only == "ray":
        if not args.ray_address:
            raise SystemExit("--only ray: pass --ray-address or set CORRALTEST_RAY_ADDRESS")
        return ray_cluster.run(ray_cluster.options_of(args))
    status = _engines(args)
    if args.ray_address:
        print(f"== ray cluster at {args.ray_address}", file=sys.stderr, flush=True)
        status = max(status, ray_cluster.run(ray_cluster.options_of(args)))
    return status


def _engines(args: argparse.Namespace) -> int:
    """Issue 7's benchmarks: import time, then corral against the raw client per backend."""
    chosen = [b.strip() for b in args.backends.split(",") if b.strip()]
    for name in chosen:
        backends.module(name)  # unknown names and missing clients fail before any work
    plan = plan_of(args)
    state_dir = private_state_dir()
    config = Config(
        run_id=uuid.uuid4().hex[:12],
        image=args.image,
        docker_url=args.docker_url,
        podman_url=args.podman_url,
        state_dir=state_dir,
        quick=args.quick,
    )
    started, clock = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.monotonic()
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    failed = []
    try:
        # First, while the machine is as quiet as it will be: the 100-sandbox rounds
        # leave a load average of 15 or more behind them for minutes.
        print("== import time", file=sys.stderr, flush=True)
        import_rows = [] if args.only else probes.import_rows(10 if args.quick else 15)
        for name in [] if args.only else chosen:
            print(f"== {name}", file=sys.stderr, flush=True)
            try:
                got = backends.module(name).run(config, usage_rounds(name, plan))
            except Exception as e:  # one backend's failure must not lose the others' figures
                traceback.print_exc()
                failed.append(name)
                got = [
                    Row(name, "(backend failed)", None, None, "", note=f"{type(e).__name__}: {e}")
                ]
            rows += got
            print(markdown(got, ""), file=sys.stderr, flush=True)
        print("== long-lived sandboxes (issue 15)", file=sys.stderr, flush=True)
        rows += long_lived.run(config, plan.rounds, chosen)
        if any(r.name == long_lived.FAILED for r in rows):
            failed.append("long-lived")
        rows += import_rows
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    meta = {
        "started": started,
        "seconds": time.monotonic() - clock,
        "rounds": plan.rounds,
        "quick": args.quick,
        "backends": chosen,
        # The machine may be shared: its load says how much the figures can be trusted.
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "cpus": os.cpu_count(),
        "run_id": config.run_id,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
    }
    if args.only == "long-lived":
        path = long_lived.write(Path(args.out), rows, meta)
    else:
        path = write_results(Path(args.out), rows, meta)
    print(path.read_text())
    print(f"written: {path} and {path.with_suffix('.json')}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
