"""One container backend for every engine.

``ContainerBackend`` owns the lifecycle; an ``Engine`` adapter (``backends/docker.py``,
``backends/podman.py``) speaks one engine's API. The parts, one idea each:

- ``plan``: the spec as an engine-neutral container (``ContainerPlan``);
- ``verify``: refuse a container the engine did not configure as planned;
- ``naming``: names and labels, how corral finds what it made;
- ``frames``: the multiplexed attach stream;
- ``http``: what corral speaks to a local engine's socket by hand;
- ``hostview``: the container seen from the host (cgroups, processes);
- ``errors``: the error table both engines share.
"""

from .backend import ContainerBackend, ContainerSettings
from .engine import Ended, Engine, Listed, Stream
from .errors import Rule
from .plan import CAPABILITIES, CONNECTION_POOL_SIZE, ContainerPlan, plan

__all__ = [
    "CAPABILITIES",
    "CONNECTION_POOL_SIZE",
    "ContainerBackend",
    "ContainerPlan",
    "ContainerSettings",
    "Ended",
    "Engine",
    "Listed",
    "Rule",
    "Stream",
    "plan",
]
