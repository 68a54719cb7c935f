"""corral's pytest plugin, run in inner pytest sessions as a user's suite would run it."""

from __future__ import annotations

import importlib.metadata as metadata

import pytest

CONFTEST = """
import pytest
pytest_plugins = ["corral.testing"]

@pytest.fixture
def all_closed(fake_backend):
    # Set up before the factory, so torn down after it: every sandbox must be gone.
    yield
    assert fake_backend.list() == []
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """An inner test suite that opts into corral.testing in its conftest.py."""
    monkeypatch.delenv("CORRAL_BACKEND", raising=False)
    pytester.makeconftest(CONFTEST)
    return pytester


def test_never_autoloaded() -> None:
    corral_dist = metadata.distribution("corral")
    assert [ep for ep in corral_dist.entry_points if ep.group == "pytest11"] == []


def test_backend_and_image_options(suite: pytest.Pytester, monkeypatch) -> None:
    suite.makepyfile(
        """
        import os

        def test_choice(corral_backend_name, corral_image):
            assert repr((corral_backend_name, corral_image)) == os.environ["EXPECT"]
        """
    )
    monkeypatch.setenv("EXPECT", "('local', None)")
    suite.runpytest_inprocess().assert_outcomes(passed=1)
    monkeypatch.setenv("EXPECT", "('docker', 'busybox:1')")
    result = suite.runpytest_inprocess("--corral-backend", "docker", "--corral-image", "busybox:1")
    result.assert_outcomes(passed=1)
    monkeypatch.setenv("CORRAL_BACKEND", "podman")
    monkeypatch.setenv("EXPECT", "('podman', None)")
    suite.runpytest_inprocess().assert_outcomes(passed=1)
    monkeypatch.setenv("EXPECT", "('docker', None)")
    suite.runpytest_inprocess("--corral-backend", "docker").assert_outcomes(passed=1)


def test_sandbox_fixtures_make_and_close_sandboxes(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import corral

        def test_one(fake_backend, all_closed, corral_sandbox):
            fake_backend.script(["echo"], stdout=b"hi\\n")
            assert corral_sandbox.backend_name == "fake"
            assert corral_sandbox.exec(["echo", "hi"]).text == "hi\\n"

        def test_several(fake_backend, all_closed, corral_sandbox_factory):
            a, b = corral_sandbox_factory(), corral_sandbox_factory(memory="64MiB")
            assert len(fake_backend.list()) == 2
            assert b.spec.limits.memory == 64 * 1024**2
        """
    )
    suite.runpytest_inprocess("--corral-backend", "fake").assert_outcomes(passed=2)


def test_settings_overrides_reach_every_sandbox(suite: pytest.Pytester) -> None:
    suite.makeconftest(
        CONFTEST
        + """
@pytest.fixture(scope="session")
def corral_settings_overrides():
    return {"sandbox": {"env": {"FROM_OVERRIDES": "1"}}, "max_output": 3}
"""
    )
    suite.makepyfile(
        """
        def test_env(fake_backend, corral_sandbox, corral_settings):
            assert corral_settings.max_output == 3
            assert corral_sandbox.spec.env == {"FROM_OVERRIDES": "1"}
            fake_backend.script(["cat"], stdout=b"12345")
            assert corral_sandbox.exec(["cat"]).truncated
        """
    )
    suite.runpytest_inprocess("--corral-backend", "fake").assert_outcomes(passed=1)


def test_fake_backend_is_registered_for_one_test_only(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import pytest
        from corral.core.plugins import get_host

        def test_with(fake_backend):
            fake_backend.script(["x"])
            assert "fake" in get_host().backends()

        def test_after():
            assert "fake" not in get_host().backends()

        def test_fresh_instance(fake_backend):
            assert fake_backend.calls == [] and fake_backend.executed() == []
        """
    )
    suite.runpytest_inprocess().assert_outcomes(passed=3)
