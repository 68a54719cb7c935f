"""The measurements every backend gets, corral's side against the raw side, interleaved.

Each function returns Rows; the backend module says which raw client it is and which
targets apply. Timed parts cover only the work named; set-up and clean-up run untimed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from common import Row, Target, interleave, row, timed
from sides import Side

KIB = 1024
MIB = 1024 * KIB
# How long removals may take to show after a concurrent batch (engines remove lazily).
_LEAK_SETTLE = 15.0


@dataclass
class Plan:
    """How much to measure: rounds per measurement and the concurrency levels (run.py
    sets them from its options)."""

    rounds: int = 15
    usage_rounds: int = 15  # docker-py's stats waits for a second sample: 2 s a call
    concurrency: tuple[int, ...] = (20, 100)
    # A 100-sandbox batch swings by tens of percent on 2 cores: the median of three.
    concurrency_rounds: dict[int, int] = field(default_factory=lambda: {20: 3, 100: 3})
    pool_size: int = 2


def _untimed_destroy(side: Side, make: Callable[[], object]) -> Callable[[], float]:
    def one() -> float:
        started = time.perf_counter()
        handle = make()
        elapsed = time.perf_counter() - started
        side.destroy(handle)
        return elapsed

    return one


def ready_cold(
    backend: str, ours: Side, raw: Side, raw_name: str, plan: Plan, target: Target | None = None
) -> list[Row]:
    seconds = interleave(
        plan.rounds, _untimed_destroy(ours, ours.create), _untimed_destroy(raw, raw.create)
    )
    return [row(backend, "ready sandbox, cold (create+start)", seconds, raw_name, target)]


def ready_warm(
    backend: str, ours: Side, raw: Side, raw_name: str, plan: Plan, target: Target | None = None
) -> list[Row]:
    """Time to get a sandbox out of a full warm pool (its health check included)."""
    our_pool, raw_pool = ours.pool(plan.pool_size), raw.pool(plan.pool_size)

    def take(pool: object) -> Callable[[], float]:
        def one() -> float:
            # Both pools full first: no refill runs in the background while timing.
            our_pool.fill()
            raw_pool.fill()
            block = pool.acquire()  # type: ignore[attr-defined]
            started = time.perf_counter()
            block.__enter__()
            elapsed = time.perf_counter() - started
            block.__exit__(None, None, None)
            return elapsed

        return one

    try:
        seconds = interleave(plan.rounds, take(our_pool), take(raw_pool))
    finally:
        our_pool.close()
        raw_pool.close()
    note = "raw: a list of started containers, one inspect before hand-out"
    if backend == "local":
        note = "raw: a list of made folders, checked to exist before hand-out"
    return [
        row(
            backend,
            f"ready sandbox, warm pool (size {plan.pool_size})",
            seconds,
            raw_name,
            target,
            note,
        )
    ]


def full_cycle(
    backend: str, ours: Side, raw: Side, raw_name: str, plan: Plan, target: Target | None = None
) -> list[Row]:
    seconds = interleave(plan.rounds, lambda: timed(ours.cycle), lambda: timed(raw.cycle))
    return [row(backend, "full cycle (create, exec true, destroy)", seconds, raw_name, target)]


def in_one_sandbox(
    backend: str, ours: Side, raw: Side, raw_name: str, plan: Plan, targets: dict[str, Target]
) -> list[Row]:
    """exec, usage and file copies, each side in one sandbox it keeps open."""
    mine, theirs = ours.create(), raw.create()
    rows = []
    try:
        seconds = interleave(
            plan.rounds * 2,
            lambda: timed(lambda: ours.exec_true(mine)),
            lambda: timed(lambda: raw.exec_true(theirs)),
        )
        rows.append(row(backend, "exec round trip (true)", seconds, raw_name, targets.get("exec")))
        seconds = interleave(
            plan.usage_rounds,
            lambda: timed(lambda: ours.usage(mine)),
            lambda: timed(lambda: raw.usage(theirs)),
        )
        rows.append(row(backend, "usage()", seconds, raw_name, targets.get("usage")))
        for size, label, rounds in ((KIB, "1 KiB", plan.rounds), (10 * MIB, "10 MiB", 5)):
            copy = _Copy(ours, mine, raw, theirs, os.urandom(size), f"bench-{size}")
            rounds = min(rounds, plan.rounds)
            seconds = interleave(rounds, copy.write(ours), copy.write(raw))
            rows.append(row(backend, f"write file {label}", seconds, raw_name))
            seconds = interleave(rounds, copy.read(ours), copy.read(raw))
            rows.append(row(backend, f"read file {label}", seconds, raw_name))
    finally:
        ours.destroy(mine)
        raw.destroy(theirs)
    return rows


@dataclass
class _Copy:
    """One file written into and read back out of each side's sandbox."""

    ours: Side
    mine: object
    raw: Side
    theirs: object
    data: bytes
    name: str

    def _handle(self, side: Side) -> object:
        return self.mine if side is self.ours else self.theirs

    def write(self, side: Side) -> Callable[[], float]:
        return lambda: timed(lambda: side.write(self._handle(side), self.name, self.data))

    def read(self, side: Side) -> Callable[[], float]:
        def one() -> float:
            started = time.perf_counter()
            got = side.read(self._handle(side), self.name)
            elapsed = time.perf_counter() - started
            if got != self.data:
                raise RuntimeError(f"{side.name} read back {len(got)} bytes, not {len(self.data)}")
            return elapsed

        return one


@dataclass
class Batch:
    """One concurrent batch: wall time, errors and what was left behind."""

    seconds: float
    errors: list[str]
    leaks: list[str]


def settled(leftovers: Callable[[], list[str]]) -> list[str]:
    """What ``leftovers()`` still finds once removals had time to show."""
    deadline = time.monotonic() + _LEAK_SETTLE
    while (found := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def leftover_row(backend: str, ours: Side, raw: Side) -> Row:
    """What the measurements left behind before the final clean-up (expected: nothing)."""
    note = (
        f"sandboxes of this run still there before the final clean-up: "
        f"corral {len(settled(ours.leftovers))}, "
        f"raw and references {len(settled(raw.leftovers))}"
    )
    return Row(backend, "leftovers after the run", None, None, "", note=note)


def _batch(side: Side, n: int) -> Batch:
    errors: list[str] = []
    lock = threading.Lock()

    def work(_: int) -> None:
        try:
            side.cycle()
        except Exception as e:  # counted, not raised: the batch goes on
            with lock:
                errors.append(f"{type(e).__name__}: {e}")

    with ThreadPoolExecutor(n) as workers:
        started = time.perf_counter()
        list(workers.map(work, range(n)))
        elapsed = time.perf_counter() - started
    leaks = settled(side.leftovers)
    if leaks:
        side.cleanup()  # counted above; removed so that the next batch starts clean
    return Batch(elapsed, errors, leaks)


def concurrent(backend: str, ours: Side, raw: Side, raw_name: str, plan: Plan) -> list[Row]:
    """n sandboxes created, used (exec true) and destroyed by a thread pool of n, both sides."""
    return [
        _concurrent_row(backend, ours, raw, raw_name, n, plan.concurrency_rounds.get(n, 1))
        for n in plan.concurrency
    ]


def _concurrent_row(backend: str, ours: Side, raw: Side, raw_name: str, n: int, rounds: int) -> Row:
    batches: dict[str, list[Batch]] = {"corral": [], "raw": []}

    def one(side: Side, kept: list[Batch]) -> float:
        batch = _batch(side, n)
        kept.append(batch)
        return batch.seconds

    seconds = interleave(
        rounds, lambda: one(ours, batches["corral"]), lambda: one(raw, batches["raw"])
    )
    errors = {k: sum(len(b.errors) for b in v) for k, v in batches.items()}
    leaks = {k: sum(len(b.leaks) for b in v) for k, v in batches.items()}
    met = errors["corral"] == 0 and leaks["corral"] == 0 and seconds[0] <= seconds[1]
    target = Target("0 errors, 0 leaks, wall ≤ raw", met=met) if n >= 100 else None
    first = {k: next((e for b in v for e in b.errors), None) for k, v in batches.items()}
    note = (
        f"errors corral {errors['corral']} / raw {errors['raw']}, "
        f"leaks corral {leaks['corral']} / raw {leaks['raw']}"
    )
    for key, message in first.items():
        if message:
            note += f"; first {key} error: {message[:160]}"
    return row(
        backend,
        f"{n} concurrent sandboxes (wall)",
        seconds,
        raw_name,
        target,
        note,
        errors=errors,
        leaks=leaks,
    )
