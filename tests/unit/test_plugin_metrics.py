"""The metrics plugin: samples to a JSON-lines file and to Prometheus gauges.

Each test gets a host where the built-in plugin is blocked and a MetricsPlugin of its
own, with a registry of its own, is registered instead (gauges are per registry).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import corral
from corral.core.plugins import PluginHost, reset_host
from corral.core.settings import load_settings
from corral.plugins.metrics import MetricsPlugin

BACKEND = "subprocess-test"
NOT_ISOLATED = corral.Security(isolate=False, allow_unsafe=("isolate",))
SAMPLE = corral.ResourceUsage(cpu_seconds=1.5, memory_bytes=4096, pids=3, timestamp=12.0)


class Agent:
    """Answers corral_usage with a known sample (the test backend knows none)."""

    @corral.hookimpl(tryfirst=True)
    def corral_usage(self, sandbox: Any) -> corral.ResourceUsage:
        return SAMPLE


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics_host(test_plugin_version: str, registry: CollectorRegistry) -> Iterator[PluginHost]:
    host = PluginHost(environ={"CORRAL_DISABLE_PLUGINS": "metrics"})
    host.register(MetricsPlugin(registry=registry), "test-metrics")
    host.register(Agent(), "agent")
    previous = reset_host(host)
    try:
        yield host
    finally:
        reset_host(previous)
        host.close()


@pytest.fixture
def make(metrics_host: PluginHost, tmp_path: Path) -> Iterator[Callable[..., corral.Sandbox]]:
    """``make(metrics={...})``: a sandbox whose settings configure the metrics plugin."""
    made: list[corral.Sandbox] = []

    def create(metrics: dict[str, Any]) -> corral.Sandbox:
        settings = load_settings(
            {
                "backends": {BACKEND: {"root": str(tmp_path / "boxes")}},
                "plugins": {"metrics": metrics},
            },
            cwd=tmp_path,
            environ={},
        )
        sandbox = corral.create(backend=BACKEND, security=NOT_ISOLATED, settings=settings)
        made.append(sandbox)
        return sandbox

    yield create
    for sandbox in made:
        sandbox.close()


def gauge(registry: CollectorRegistry, name: str, sandbox: corral.Sandbox) -> float | None:
    return registry.get_sample_value(name, {"sandbox": sandbox.id, "backend": BACKEND})


def test_samples_are_streamed_to_the_file(
    make: Callable[..., corral.Sandbox], tmp_path: Path, registry: CollectorRegistry
) -> None:
    path = tmp_path / "usage.jsonl"
    sandbox = make({"path": str(path)})
    sandbox.usage()
    sandbox.usage()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert (line["sandbox"], line["backend"]) == (sandbox.id, BACKEND)
        assert (line["cpu_seconds"], line["memory_bytes"], line["pids"]) == (1.5, 4096, 3)
        assert line["memory_limit_bytes"] is None
        assert line["time"].endswith("Z")
    # Without prometheus = true no gauge is made.
    assert gauge(registry, "corral_sandbox_pids", sandbox) is None


def test_gauges_follow_the_latest_sample_and_go_with_the_sandbox(
    make: Callable[..., corral.Sandbox], registry: CollectorRegistry
) -> None:
    sandbox = make({"prometheus": True})
    other = make({"prometheus": True})
    assert gauge(registry, "corral_sandbox_memory_bytes", sandbox) is None  # not sampled yet
    sandbox.usage()
    other.usage()
    assert gauge(registry, "corral_sandbox_memory_bytes", sandbox) == 4096
    assert gauge(registry, "corral_sandbox_cpu_seconds", sandbox) == 1.5
    assert gauge(registry, "corral_sandbox_pids", sandbox) == 3
    text = generate_latest(registry).decode()
    assert f'corral_sandbox_pids{{backend="{BACKEND}",sandbox="{sandbox.id}"}} 3.0' in text
    sandbox.close()
    assert gauge(registry, "corral_sandbox_pids", sandbox) is None
    assert gauge(registry, "corral_sandbox_pids", other) == 3


def test_file_transfers_are_counted_in_bytes_each_way(
    make: Callable[..., corral.Sandbox], registry: CollectorRegistry
) -> None:
    sandbox = make({"prometheus": True})
    sandbox.write_file("/a.txt", b"x" * 100)
    sandbox.write_file("/b.txt", b"y" * 20)
    sandbox.read_file("/a.txt")
    assert gauge(registry, "corral_sandbox_transfer_in_bytes", sandbox) == 120
    assert gauge(registry, "corral_sandbox_transfer_out_bytes", sandbox) == 100
    sandbox.close()
    assert gauge(registry, "corral_sandbox_transfer_in_bytes", sandbox) is None


def test_prometheus_without_the_client_names_the_fix(
    metrics_host: PluginHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The host's plugin is new, so it imports the client when prometheus = true.
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    settings = load_settings(
        {
            "backends": {BACKEND: {"root": str(tmp_path / "boxes")}},
            "plugins": {"metrics": {"prometheus": True}},
        },
        cwd=tmp_path,
        environ={},
    )
    with pytest.raises(
        corral.ConfigError,
        match=r"^plugins\.metrics\.prometheus: needs the prometheus_client package; "
        r"install it with: pip install prometheus-client",
    ):
        corral.create(backend=BACKEND, security=NOT_ISOLATED, settings=settings)
    assert corral.list(backend=BACKEND, settings=settings) == []


def test_a_typo_in_the_metrics_table_names_its_path(make: Callable[..., corral.Sandbox]) -> None:
    with pytest.raises(corral.ConfigError, match=r"^plugins\.metrics\.promethues: unknown"):
        make({"promethues": True})
