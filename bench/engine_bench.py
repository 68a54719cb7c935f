"""The run for one container engine: corral's backend against the engine's Python client.

``backend_docker`` and ``backend_podman`` supply the client and the figures that differ;
the order of measurements and the targets of issue 7 are written here once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import llm_reference
import measure
import probes
from common import RUN_LABEL, Config, Row, Target, interleave, row, timed
from engine_raw import EngineRawSide
from sides import CorralSide

import corral


def corral_settings(backend: str, url: str, image: str, cwd: str) -> corral.Settings:
    """corral's settings for the bench: this engine only, nothing from files or variables."""
    engine = {"url": url, "pull": "never", "default_image": image}
    return corral.load_settings({"backends": {backend: engine}}, cwd=Path(cwd), environ={})


def corral_side(backend: str, url: str, config: Config, raw: EngineRawSide) -> CorralSide:
    return CorralSide(
        backend,
        corral_settings(backend, url, config.image, config.state_dir),
        {RUN_LABEL: config.run_id},
        raw.corral_leftovers,
        raw.cleanup_corral,
    )


def run_engine(
    backend: str,
    config: Config,
    plan: measure.Plan,
    make_raw: Callable[[], EngineRawSide],
    url: str,
    one_shot_ratio: float,
    same_steps_ratio: float | None,
) -> list[Row]:
    """Every measurement on one engine; whatever is left is removed, also after an error."""
    raw = make_raw()
    ours = corral_side(backend, url, config, raw)
    name = raw.name
    try:
        # Warm both clients (connections, image look-ups, capabilities) before measuring.
        ours.cycle()
        ours.one_shot()
        raw.cycle()
        raw.one_shot()
        rows = measure.ready_cold(backend, ours, raw, name, plan)
        rows += measure.ready_warm(backend, ours, raw, name, plan, Target("< 5 ms", ms=5))
        same = (
            Target(f"≤ {same_steps_ratio}x raw", ratio=same_steps_ratio)
            if same_steps_ratio
            else None
        )
        rows += measure.full_cycle(backend, ours, raw, name, plan, same)
        rows[-1].name = "full cycle vs run + exec_run + remove (same steps)"
        seconds = interleave(plan.rounds, lambda: timed(ours.one_shot), lambda: timed(raw.one_shot))
        rows.append(
            row(
                backend,
                "full cycle: corral.run(['true']) vs containers.run(['true'], remove=True)",
                seconds,
                name,
                Target(f"≤ {one_shot_ratio}x raw", ratio=one_shot_ratio),
                "each side's one-call cycle: the command as the container's own process",
            )
        )
        rows += measure.in_one_sandbox(
            backend, ours, raw, name, plan, {"exec": Target("≤ 1.1x raw", ratio=1.1)}
        )
        rows += measure.concurrent(backend, ours, raw, name, plan)
        rows += probes.memory_rows(backend, config, 10 if config.quick else 20, name)
        rows += llm_reference.engine_rows(backend, config, ours, raw, plan)
        rows.append(measure.leftover_row(backend, ours, raw))
    finally:
        raw.cleanup()
        raw.cleanup_corral()
        raw.close()
    return rows
