"""What every benchmark shares: timing, round-by-round interleaving, rows, targets, tables.

A measurement runs corral and the raw client alternately, round by round, so both see
the same engine and machine state, and keeps the medians. Each result is a ``Row``;
rows with a target say whether it was met. Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The label every container a benchmark makes carries (corral's sandboxes through
# ``labels=``, the raw clients' directly), so leftovers can be found and removed.
RUN_LABEL = "corral-bench.run"
RAW_LABEL = "corral-bench.raw"


@dataclass
class Config:
    """Where the run's engines are and what it names its sandboxes."""

    run_id: str
    image: str
    docker_url: str
    podman_url: str
    state_dir: str  # the local backend's, private to the run
    quick: bool = False


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` took."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleave(
    rounds: int, corral_fn: Callable[[], float], raw_fn: Callable[[], float]
) -> tuple[float, float]:
    """Median seconds of each, the two alternating (each function times its own part)."""
    ours, theirs = [], []
    for _ in range(max(1, rounds)):
        ours.append(corral_fn())
        theirs.append(raw_fn())
    return statistics.median(ours), statistics.median(theirs)


@dataclass
class Target:
    """A goal for a row: the corral figure under ``ms`` or at most ``ratio`` times raw."""

    text: str
    ms: float | None = None
    ratio: float | None = None
    # A target on other figures (errors, leaks): set by the measurement itself.
    met: bool | None = None

    def check(self, corral_ms: float | None, raw_ms: float | None) -> bool | None:
        if self.met is not None:
            return self.met
        if corral_ms is None:
            return None
        if self.ms is not None:
            return corral_ms < self.ms
        if self.ratio is not None and raw_ms:
            return corral_ms <= self.ratio * raw_ms
        return None


@dataclass
class Row:
    """One measurement of one backend: corral's median, the reference's, and the target."""

    backend: str
    name: str
    corral_ms: float | None
    raw_ms: float | None
    raw_name: str
    target: Target | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.corral_ms is None or not self.raw_ms:
            return None
        return self.corral_ms / self.raw_ms

    @property
    def met(self) -> bool | None:
        return self.target.check(self.corral_ms, self.raw_ms) if self.target else None

    def as_json(self) -> dict:
        data = asdict(self)
        data["target"] = self.target.text if self.target else None
        data["ratio"] = self.ratio
        data["met"] = self.met
        return data


def row(
    backend: str,
    name: str,
    seconds: tuple[float | None, float | None],
    raw_name: str,
    target: Target | None = None,
    note: str = "",
    **extra: object,
) -> Row:
    """A Row from a pair of medians in seconds (None where not measured)."""
    corral_s, raw_s = seconds
    return Row(
        backend,
        name,
        None if corral_s is None else corral_s * 1000,
        None if raw_s is None else raw_s * 1000,
        raw_name,
        target,
        note,
        dict(extra),
    )


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10_000 else f"{value:,.0f}"


def _verdict(r: Row) -> str:
    if r.target is None:
        return ""
    met = r.met
    mark = "pass" if met else ("**miss**" if met is False else "not measured")
    return f"{r.target.text}: {mark}"


def markdown(rows: list[Row], header: str) -> str:
    """The rows as one markdown table per backend, under ``header``."""
    out = [header, ""]
    for backend in dict.fromkeys(r.backend for r in rows):
        out += [
            f"### {backend}",
            "",
            "| measurement | corral (ms) | reference (ms) | reference | ratio | target | note |",
            "|---|---:|---:|---|---:|---|---|",
        ]
        for r in (r for r in rows if r.backend == backend):
            ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
            note = r.note.replace("|", "\\|").replace("\n", " ")
            out.append(
                f"| {r.name} | {_ms(r.corral_ms)} | {_ms(r.raw_ms)} | {r.raw_name} | {ratio} "
                f"| {_verdict(r)} | {note} |"
            )
        out.append("")
    return "\n".join(out)


def write_results(out: Path, rows: list[Row], meta: dict) -> Path:
    """Write benchmarks.md and benchmarks.json under ``out``; return the markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(
        json.dumps({"meta": meta, "rows": [r.as_json() for r in rows]}, indent=2) + "\n"
    )
    misses = [f"{r.backend}: {r.name}" for r in rows if r.met is False]
    header = "\n".join(
        [
            "## Results",
            "",
            f"Run {meta['started']} ({meta['seconds']:.0f} s), rounds={meta['rounds']}"
            f"{' (quick)' if meta['quick'] else ''}, backends: {', '.join(meta['backends'])}; "
            f"{meta['cpus']} CPUs, load average {meta['load_average'][0]} at the start and "
            f"{meta['load_average'][1]} at the end.",
            "Medians; ratio = corral / reference; corral and the reference alternate round "
            "by round.",
            "",
            "Targets missed: " + ("; ".join(misses) if misses else "none"),
        ]
    )
    path = out / "benchmarks.md"
    path.write_text(markdown(rows, header))
    return path
