"""corral's backend conformance suite, run against the unshare backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral.testing.conformance import BackendConformance


class TestUnshare(BackendConformance):
    backend = "unshare"

    @pytest.fixture
    def conformance_settings(self, conformance_scratch: Path) -> corral.Settings:
        # Sandbox folders live in the scratch folder, so a leak is seen below; every
        # sandbox opts out of isolation, which this backend does not give.
        overrides = {
            "mount_roots": [str(conformance_scratch)],
            "backends": {"unshare": {"root": str(conformance_scratch / "sandboxes")}},
            "sandbox": {"security": {"isolate": False, "allow_unsafe": ["isolate"]}},
        }
        return corral.load_settings(overrides, cwd=conformance_scratch, environ={})

    @pytest.fixture(autouse=True)
    def _no_sandbox_folder_left(self, conformance_scratch: Path) -> Iterator[None]:
        yield
        folder = conformance_scratch / "sandboxes"
        left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        assert left == [], f"sandbox folders leaked: {left}"
