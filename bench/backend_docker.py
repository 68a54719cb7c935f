"""corral's Docker backend against raw docker-py doing the same work.

docker-py's client gets the same connection pool size as corral's (so that the
concurrent batches compare the libraries, not a pool of 10 against one of 128).
"""

from __future__ import annotations

import docker
import measure
from common import Config, Row
from engine_bench import corral_side, run_engine
from engine_raw import EngineRawSide
from sides import CorralSide

POOL_SIZE = 128


def raw_side(config: Config) -> EngineRawSide:
    client = docker.DockerClient(base_url=config.docker_url, max_pool_size=POOL_SIZE)
    return EngineRawSide("docker-py", client, config.image, config.run_id)


def make_sides(config: Config) -> tuple[CorralSide, EngineRawSide]:
    raw = raw_side(config)
    return corral_side("docker", config.docker_url, config, raw), raw


def run(config: Config, plan: measure.Plan) -> list[Row]:
    return run_engine(
        "docker",
        config,
        plan,
        lambda: raw_side(config),
        config.docker_url,
        one_shot_ratio=0.8,
        same_steps_ratio=0.8,
    )
