"""The long-lived classes of the conformance kit, held against a third-party backend:
``subprocess-test`` (tests/plugin_dist) declares PROCESSES and nothing else of them,
so corral's keeper runs its background processes through its plain ``exec``, and each
other feature must be refused before anything is made."""

from __future__ import annotations

import pytest

from corral.core.plugins import PluginHost
from corral.testing.long_lived import LongLivedConformance


class TestPluginBackend(LongLivedConformance):
    backend = "subprocess-test"
    settings = {"sandbox": {"security": {"isolate": False, "allow_unsafe": ["isolate"]}}}

    @pytest.fixture(autouse=True)
    def _with_the_test_plugin(self, global_host: PluginHost) -> None:
        """The process's plugin host, seeing the installed test plugin."""

    def test_kill_ends_the_whole_tree_and_is_not_a_timeout(self) -> None:
        pytest.skip("subprocess-test is not isolating: a setsid escapee leaves its group")

    def test_a_spawned_fork_bomb_is_contained(self) -> None:
        pytest.skip("subprocess-test enforces no pids limit of its own")
