"""The backends the bench knows, by name, imported only when asked for."""

from __future__ import annotations

import importlib
from typing import Any

NAMES = ("local", "docker", "podman")


def module(name: str) -> Any:
    if name not in NAMES:
        raise SystemExit(f"unknown backend {name!r}: choose from {', '.join(NAMES)}")
    return importlib.import_module(f"backend_{name}")
