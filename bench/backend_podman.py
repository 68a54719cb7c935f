"""corral's Podman backend against raw podman-py doing the same work.

podman-py's remove() waits out the 10 s stop grace whatever it is given, so the raw
side removes through the REST call with timeout=0 (what a tuned user writes); the
one-shot row is podman-py's default ``containers.run(remove=True)``, as issue 7 asks.
"""

from __future__ import annotations

import measure
import podman
from common import Config, Row
from engine_bench import corral_side, run_engine
from engine_raw import PodmanRawSide
from sides import CorralSide

POOL_SIZE = 128


def raw_side(config: Config) -> PodmanRawSide:
    client = podman.PodmanClient(base_url=config.podman_url, max_pool_size=POOL_SIZE)
    return PodmanRawSide("podman-py", client, config.image, config.run_id)


def make_sides(config: Config) -> tuple[CorralSide, PodmanRawSide]:
    raw = raw_side(config)
    return corral_side("podman", config.podman_url, config, raw), raw


def run(config: Config, plan: measure.Plan) -> list[Row]:
    return run_engine(
        "podman",
        config,
        plan,
        lambda: raw_side(config),
        config.podman_url,
        one_shot_ratio=0.6,
        same_steps_ratio=None,
    )
