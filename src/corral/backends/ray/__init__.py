"""The ray backend: sandboxes on the nodes of a Ray cluster (``pip install 'corral[ray]'``).

Each node makes its sandboxes with its own corral backend (local, docker, podman or
any installed one), through one agent per node; see docs/cluster.md. Ray is imported
only when the backend is first used.
"""

from __future__ import annotations

from ...core.backend import BackendInfo
from ...core.hookspecs import hookimpl
from .backend import RayBackend
from .settings import RaySettings

__all__ = ["RayBackend", "RaySettings"]


@hookimpl
def corral_backends() -> list[BackendInfo]:
    return [
        BackendInfo(
            name="ray",
            backend=RayBackend,
            description="sandboxes across a Ray cluster, each node running its own backend",
        )
    ]
