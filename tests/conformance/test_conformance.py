"""The conformance suite (corral.testing.conformance) against corral's own backends."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral.core.settings import load_settings
from corral.testing.conformance import BackendConformance, unavailable

# The variables scripts/engines sets (CORRALTEST_*, never read by corral as settings).
DOCKER_URL = "CORRALTEST_DOCKER_URL"
PODMAN_URL = "CORRALTEST_PODMAN_URL"
TEST_IMAGE = os.environ.get("CORRALTEST_IMAGE", "corral-test/busybox:latest")


def _engine_settings(backend: str, variable: str) -> dict:
    """The engine's settings, as class attributes are read at import time: the URL may be
    empty here, and the ``_engine_configured`` fixture then skips (or fails, under CI)."""
    return {
        "backends": {
            backend: {
                "url": os.environ.get(variable, ""),
                "pull": "never",
                "default_image": TEST_IMAGE,
            }
        }
    }


def _require_variable(variable: str) -> None:
    if not os.environ.get(variable):
        unavailable(f"{variable} is not set; run the suite through ./scripts/test")


class TestLocal(BackendConformance):
    backend = "local"
    pytestmark = pytest.mark.local

    @pytest.fixture
    def conformance_settings(self, conformance_scratch: Path) -> corral.Settings:
        # The state folder sits in the scratch folder (which others may pass), so that
        # sandboxes run as an unprivileged host user reach it, and leaks are seen here.
        state = conformance_scratch / "state"
        state.mkdir()
        overrides = {
            "mount_roots": [str(conformance_scratch)],
            "backends": {"local": {"state_dir": str(state)}},
        }
        return load_settings(overrides, cwd=conformance_scratch, environ={})

    @pytest.fixture(autouse=True)
    def _no_sandbox_folder_left(self, conformance_scratch: Path) -> Iterator[None]:
        yield
        local = conformance_scratch / "state" / "local"
        left = sorted(p.name for p in local.iterdir()) if local.exists() else []
        assert left == [], f"sandbox folders leaked: {left}"


class TestDocker(BackendConformance):
    backend = "docker"
    settings = _engine_settings("docker", DOCKER_URL)
    image = TEST_IMAGE
    pytestmark = pytest.mark.docker

    @pytest.fixture(autouse=True)
    def _engine_configured(self) -> None:
        _require_variable(DOCKER_URL)


class TestPodman(BackendConformance):
    backend = "podman"
    settings = _engine_settings("podman", PODMAN_URL)
    image = TEST_IMAGE
    pytestmark = pytest.mark.podman

    @pytest.fixture(autouse=True)
    def _engine_configured(self) -> None:
        _require_variable(PODMAN_URL)


class _ThroughRay(BackendConformance):
    """The kit through the ray backend, on the suite's cluster (scripts/cluster), with
    each node making its sandboxes with ``node_backend``."""

    backend = "ray"
    node_backend: str

    @pytest.fixture
    def conformance_settings(self, conformance_scratch: Path) -> corral.Settings:
        _require_variable("CORRALTEST_RAY_ADDRESS")
        ray = {"address": os.environ["CORRALTEST_RAY_ADDRESS"], "node_backend": self.node_backend}
        overrides = {"mount_roots": [str(conformance_scratch)], "backends": {"ray": ray}}
        return load_settings(overrides, cwd=conformance_scratch, environ={})


class TestRayLocal(_ThroughRay):
    node_backend = "local"
    pytestmark = [pytest.mark.ray, pytest.mark.local]


class TestRayDocker(_ThroughRay):
    node_backend = "docker"
    image = TEST_IMAGE
    pytestmark = [pytest.mark.ray, pytest.mark.docker]


class TestRayPodman(_ThroughRay):
    node_backend = "podman"
    image = TEST_IMAGE
    pytestmark = [pytest.mark.ray, pytest.mark.podman]
