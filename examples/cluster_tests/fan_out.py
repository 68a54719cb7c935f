"""Run a project's pytest files in parallel, one sandbox per file, across a Ray cluster.

    python fan_out.py sample_project                     # on the ray backend
    python fan_out.py sample_project --backend local     # on this machine, no cluster

Each sandbox sees the project read-only at /project and the folder that holds pytest
read-only at /deps (``--site-packages``). pytest writes nothing there (no cache, no
bytecode): what the tests write goes to the sandbox's own /tmp and workspace, which go
with the sandbox. Exits 0 when every file passed, 1 when one failed, 2 when a sandbox
could not be made or its command not run. See README.md beside it and docs/cluster.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

import corral
import corral.aio

PROJECT = "/project"  # where each sandbox sees the project
DEPS = "/deps"  # ... and the folder holding pytest


@attrs.frozen
class Outcome:
    """How one sandbox's share of the test files went."""

    files: tuple[str, ...]
    node: str = "-"  # where it ran: "id@address" on a cluster, "-" on one host
    result: corral.ExecResult | None = None
    error: str = ""  # why there is no result: the sandbox or the exec failed

    @property
    def passed(self) -> bool:
        return self.result is not None and self.result.ok


def test_files(project: Path) -> list[str]:
    """The project's test files, relative to it (hidden folders left out)."""
    found = {*project.rglob("test_*.py"), *project.rglob("*_test.py")}
    relative = (path.relative_to(project) for path in found)
    return sorted(str(p) for p in relative if not any(s.startswith(".") for s in p.parts))


def pytest_folder() -> str | None:
    """The folder this interpreter imports pytest from (its site-packages), if any."""
    try:
        import pytest
    except ImportError:
        return None
    return str(Path(pytest.__file__).resolve().parents[1])


async def run_files(
    files: Sequence[str],
    args: argparse.Namespace,
    settings: corral.Settings,
    room: asyncio.Semaphore,
) -> Outcome:
    """One sandbox for ``files``: made, pytest run in it, removed."""
    mounts = [corral.Mount(str(args.project), PROJECT)]
    env = {
        "HOME": "/workspace",
        "PYTHONDONTWRITEBYTECODE": "1",
        # Only the plugins the project asks for (in its conftest), not every pytest
        # plugin installed beside pytest in the mounted site-packages.
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    if args.site_packages:
        mounts.append(corral.Mount(args.site_packages, DEPS))
        env["PYTHONPATH"] = DEPS
    argv = [args.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    async with room:
        try:
            async with await corral.aio.create(
                backend=args.backend,
                settings=settings,
                mounts=mounts,
                env=env,
                workdir="/workspace",
                memory=args.memory,
                cpus=args.cpus,
                # A driver killed half-way leaves nothing for longer than this.
                lifetime=args.timeout + 120,
            ) as sandbox:
                node = str(sandbox.info.node or "-")
                result = await sandbox.exec(argv, workdir=PROJECT, timeout=args.timeout)
                return Outcome(tuple(files), node, result)
        except corral.SandboxError as e:
            return Outcome(tuple(files), error=f"{type(e).__name__}: {e}")


def show(outcome: Outcome) -> str:
    """One line for a sandbox: how it ended, its files, its node, pytest's last line."""
    result = outcome.result
    if result is None:
        return f"{'ERROR':7} {' '.join(outcome.files)}  {outcome.error}"
    word = "PASS" if outcome.passed else "TIMEOUT" if result.timed_out else "FAIL"
    last = (result.text.strip().splitlines() or ["(no output)"])[-1]
    return (
        f"{word:7} {' '.join(outcome.files)}  [exit {result.exit_code}, "
        f"{result.duration:.1f} s, node {outcome.node}]  {last}"
    )


async def fan_out(args: argparse.Namespace) -> int:
    files = test_files(args.project)
    if not files:
        print(f"no test files (test_*.py, *_test.py) under {args.project}", file=sys.stderr)
        return 2
    groups = [files[i : i + args.per_sandbox] for i in range(0, len(files), args.per_sandbox)]
    # Bind-mount sources must lie under a mount root: exactly the two folders mounted.
    roots = [str(args.project), *([args.site_packages] if args.site_packages else [])]
    settings = corral.load_settings({"mount_roots": roots})
    room = asyncio.Semaphore(args.parallel)
    began = time.monotonic()
    outcomes = await asyncio.gather(*(run_files(g, args, settings, room) for g in groups))
    took = time.monotonic() - began

    for outcome in outcomes:
        print(show(outcome))
    for outcome in outcomes:
        if outcome.result is not None and not outcome.passed:
            print(f"\n--- {' '.join(outcome.files)} (node {outcome.node}) ---")
            print(outcome.result.text.rstrip())
            if outcome.result.stderr:
                print(outcome.result.stderr_text.rstrip())
    passed = sum(o.passed for o in outcomes)
    errors = sum(o.result is None for o in outcomes)
    nodes = {o.node for o in outcomes if o.result is not None and o.node != "-"}
    where = f" ({len(nodes)} node{'s' if len(nodes) > 1 else ''})" if nodes else ""
    print(
        f"\n{len(files)} test files in {len(groups)} sandboxes on {args.backend}{where}, "
        f"{took:.1f} s: {passed} passed, {len(groups) - passed - errors} failed, "
        f"{errors} errors"
    )
    return 2 if errors else 0 if passed == len(groups) else 1


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", type=Path, help="the project folder (its tests run)")
    parser.add_argument("--backend", default="ray", help="corral backend (default: ray)")
    parser.add_argument(
        "--per-sandbox", type=int, default=1, metavar="N", help="test files per sandbox"
    )
    parser.add_argument(
        "--parallel", type=int, default=8, metavar="N", help="sandboxes alive at once"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds pytest may take in each"
    )
    parser.add_argument("--memory", default="512MiB", help="memory of each sandbox")
    parser.add_argument(
        "--cpus", type=float, default=None,
        help="CPUs of each sandbox (on ray, reserved on its node); default: uncapped",
    )
    parser.add_argument(
        "--python", default="python3", help="the interpreter inside the sandbox"
    )
    parser.add_argument(
        "--site-packages", default=pytest_folder(), metavar="DIR",
        help="a folder holding pytest, mounted read-only at /deps and put on PYTHONPATH "
        "(on a cluster: a path on every node); default: where this Python's pytest is; "
        "'none' when the sandbox's own Python has pytest",
    )
    args = parser.parse_args(argv)
    args.project = args.project.resolve()
    if not args.project.is_dir():
        parser.error(f"{args.project} is not a folder")
    if args.site_packages in ("none", ""):
        args.site_packages = None
    elif args.site_packages is not None:
        args.site_packages = str(Path(args.site_packages).resolve())
    if args.per_sandbox < 1 or args.parallel < 1:
        parser.error("--per-sandbox and --parallel take a number of at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(fan_out(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
