"""Fixtures of the unit tests: clean settings, fresh plugin hosts, the test plugin."""

from __future__ import annotations

import importlib.metadata as metadata
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.core.plugins import PluginHost, reset_host
from corral.core.settings import Settings, load_settings

TEST_PLUGIN_DIST = "corral-test-plugin"


@pytest.fixture
def clean_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Built-in defaults only: no file of the user's and none of their CORRAL_* variables."""
    monkeypatch.chdir(tmp_path)
    return load_settings(cwd=tmp_path, environ={})


@pytest.fixture
def test_plugin_version() -> str:
    """The installed version of the example plugin distribution in tests/plugin_dist."""
    try:
        return metadata.version(TEST_PLUGIN_DIST)
    except metadata.PackageNotFoundError:
        pytest.fail(
            f"the {TEST_PLUGIN_DIST} distribution is not installed; "
            "run `pip install ./tests/plugin_dist` before the tests"
        )


@pytest.fixture
def host(test_plugin_version: str) -> PluginHost:
    """A new plugin host that sees installed plugins but none of the user's variables."""
    return PluginHost(environ={})


@pytest.fixture
def global_host(host: PluginHost) -> Iterator[PluginHost]:
    """``host`` installed as the process's host (what corral.create uses), then restored."""
    previous = reset_host(host)
    try:
        yield host
    finally:
        reset_host(previous)
        host.close()
