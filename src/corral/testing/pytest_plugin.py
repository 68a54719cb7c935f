"""corral's pytest plugin: fixtures for sandboxes on a chosen backend, and the fake backend.

Opt-in, never autoloaded: add ``pytest_plugins = ["corral.testing"]`` to a conftest.py.
It loads no third-party corral plugin by itself; the backends are those corral finds
as it always does (entry points, subject to ``CORRAL_DISABLE_PLUGIN_AUTOLOAD``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import corral
from corral.core.plugins import get_host
from corral.core.settings import Settings, load_settings

from . import fake
from .fake import FakeBackend

__all__ = [
    "corral_backend_name",
    "corral_image",
    "corral_sandbox",
    "corral_sandbox_factory",
    "corral_settings",
    "corral_settings_overrides",
    "fake_backend",
]

FAKE_PLUGIN_NAME = "corral.testing.fake"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("corral", "corral sandboxes")
    group.addoption(
        "--corral-backend",
        metavar="NAME",
        default=None,
        help="backend of the corral_sandbox fixtures (default: $CORRAL_BACKEND, else local)",
    )
    group.addoption(
        "--corral-image",
        metavar="IMAGE",
        default=None,
        help="image of the corral_sandbox fixtures (default: the backend's own default)",
    )


@pytest.fixture(scope="session")
def corral_backend_name(pytestconfig: pytest.Config) -> str:
    """The backend the sandbox fixtures use: --corral-backend, $CORRAL_BACKEND, or local."""
    chosen = pytestconfig.getoption("corral_backend")
    return chosen or os.environ.get("CORRAL_BACKEND") or "local"


@pytest.fixture(scope="session")
def corral_image(pytestconfig: pytest.Config) -> str | None:
    """The image of the sandbox fixtures (--corral-image), or None for the default."""
    image: str | None = pytestconfig.getoption("corral_image")
    return image


@pytest.fixture(scope="session")
def corral_settings_overrides() -> dict[str, Any]:
    """Settings laid over the project's own for the whole session; override it in a
    conftest.py (session-scoped), e.g. ``{"backends": {"docker": {"pull": "never"}}}``."""
    return {}


@pytest.fixture(scope="session")
def corral_settings(corral_settings_overrides: dict[str, Any]) -> Settings:
    """The effective settings (files, CORRAL_* variables, then the overrides), once."""
    return load_settings(corral_settings_overrides)


@pytest.fixture
def corral_sandbox_factory(
    corral_backend_name: str, corral_image: str | None, corral_settings: Settings
) -> Iterator[Callable[..., corral.Sandbox]]:
    """``make(**keywords)``: a new sandbox per call (keywords of ``corral.create``);
    every one is closed when the test ends."""
    made: list[corral.Sandbox] = []

    def make(**keywords: Any) -> corral.Sandbox:
        keywords.setdefault("backend", corral_backend_name)
        keywords.setdefault("settings", corral_settings)
        if corral_image is not None:
            keywords.setdefault("image", corral_image)
        sandbox = corral.create(**keywords)
        made.append(sandbox)
        return sandbox

    yield make
    close_all(made)


@pytest.fixture
def corral_sandbox(
    corral_sandbox_factory: Callable[..., corral.Sandbox],
) -> corral.Sandbox:
    """A fresh sandbox with the default spec on the chosen backend, closed afterwards."""
    return corral_sandbox_factory()


@pytest.fixture
def fake_backend() -> Iterator[FakeBackend]:
    """The FakeBackend, registered on this process's plugin host for the test.

    ``corral.create(backend="fake")`` then makes sandboxes on the instance yielded
    here. At the end, the plugin is unregistered (when this fixture registered it) and
    the instance's rules, calls and sandboxes are forgotten.
    """
    host = get_host()
    registered = not host.pm.is_registered(fake)
    if registered:
        host.register(fake, FAKE_PLUGIN_NAME, "corral")
    instance = host.backend(fake.NAME, Settings())
    assert isinstance(instance, FakeBackend)
    instance.reset()
    try:
        yield instance
    finally:
        instance.reset()
        if registered:
            host.unregister(FAKE_PLUGIN_NAME)


def close_all(sandboxes: list[corral.Sandbox]) -> None:
    """Close every sandbox, even when one fails to close; then raise the first failure."""
    failure: BaseException | None = None
    for sandbox in sandboxes:
        try:
            sandbox.close()
        except Exception as e:
            failure = failure or e
    if failure is not None:
        raise failure
