"""The metrics plugin: usage samples streamed to a JSON-lines file and Prometheus gauges.

Configured by ``[plugins.metrics]``: ``path`` appends every sample read with
``sandbox.usage()`` to a file; ``prometheus = true`` keeps the latest sample of each
sandbox in the gauges ``corral_sandbox_memory_bytes``, ``corral_sandbox_cpu_seconds``
and ``corral_sandbox_pids``, and counts the bytes of its file transfers in
``corral_sandbox_transfer_in_bytes`` and ``corral_sandbox_transfer_out_bytes``
(all labelled ``sandbox`` and ``backend``, removed when the sandbox is), in
prometheus_client's default registry, where an exporter the program already runs
serves them; ``prometheus_text()`` gives them in the text format.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from corral.core.convert import structure
from corral.core.errors import ConfigError
from corral.core.hookspecs import hookimpl
from corral.core.spec import bool_field, str_field

from .jsonlines import JsonLinesFile, utc_now

if TYPE_CHECKING:
    from corral.core.results import ResourceUsage
    from corral.core.sandbox import Sandbox
    from corral.core.settings import Settings
    from corral.core.transfer import FileTransfer, Transferred

__all__ = ["MetricsPlugin", "MetricsSettings", "plugin", "prometheus_text"]

NAME = "metrics"
# ResourceUsage field -> (gauge name, help text)
GAUGES = {
    "memory_bytes": ("corral_sandbox_memory_bytes", "Memory the sandbox uses now, in bytes."),
    "cpu_seconds": ("corral_sandbox_cpu_seconds", "CPU time the sandbox has used, in seconds."),
    "pids": ("corral_sandbox_pids", "Processes and threads in the sandbox now."),
}
# FileTransfer.direction -> (gauge name, help text): bytes moved so far, per sandbox.
TRANSFER_GAUGES = {
    "in": ("corral_sandbox_transfer_in_bytes", "Bytes copied into the sandbox so far."),
    "out": ("corral_sandbox_transfer_out_bytes", "Bytes copied out of the sandbox so far."),
}
LABELS = ("sandbox", "backend")


@attrs.frozen
class MetricsSettings:
    """``[plugins.metrics]``: where usage samples go; with neither option, nowhere."""

    path: str | None = str_field()
    prometheus: bool = bool_field(False)


@attrs.frozen
class _Outputs:
    file: JsonLinesFile | None
    prometheus: bool


_OFF = _Outputs(None, False)


def _prometheus_client() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError(
            f"plugins.{NAME}.prometheus",
            "needs the prometheus_client package; install it with: pip install prometheus-client",
        ) from None
    return prometheus_client


class MetricsPlugin:
    """Exports usage samples. Each sandbox keeps the outputs it was created under.

    Args:
        registry: the prometheus_client registry for the gauges; None for its default.
    """

    def __init__(self, registry: Any = None) -> None:
        self._registry = registry
        self._gauges: dict[str, Any] | None = None
        self._outputs = _OFF
        self._bound: dict[str, _Outputs] = {}
        self._lock = threading.Lock()

    def _make_gauges(self) -> dict[str, Any]:
        with self._lock:
            if self._gauges is None:
                client = _prometheus_client()
                registry = client.REGISTRY if self._registry is None else self._registry
                self._gauges = {
                    key: client.Gauge(name, text, LABELS, registry=registry)
                    for key, (name, text) in (*GAUGES.items(), *TRANSFER_GAUGES.items())
                }
            return self._gauges

    def prometheus_text(self) -> bytes:
        """The registry's metrics in the Prometheus text format."""
        client = _prometheus_client()
        return client.generate_latest(client.REGISTRY if self._registry is None else self._registry)

    def _outputs_of(self, sandbox_id: str) -> _Outputs:
        with self._lock:
            return self._bound.get(sandbox_id, self._outputs)

    # -- hooks -------------------------------------------------------------------------

    @hookimpl
    def corral_configure(self, settings: Settings) -> None:
        own = structure(settings.plugins.get(NAME, {}), MetricsSettings, f"plugins.{NAME}")
        if own.prometheus:
            self._make_gauges()
        file = None if own.path is None else JsonLinesFile(Path(own.path).expanduser().absolute())
        with self._lock:
            self._outputs = _Outputs(file, own.prometheus)

    @hookimpl
    def corral_sandbox_created(self, sandbox: Sandbox) -> None:
        with self._lock:
            self._bound[sandbox.id] = self._outputs

    @hookimpl
    def corral_usage_sampled(self, sandbox: Sandbox, usage: ResourceUsage) -> None:
        outputs = self._outputs_of(sandbox.id)
        if outputs.file is not None:
            outputs.file.write(
                {
                    "time": utc_now(),
                    "sandbox": sandbox.id,
                    "backend": sandbox.backend_name,
                    **attrs.asdict(usage),
                }
            )
        if outputs.prometheus:
            gauges = self._make_gauges()
            for field in GAUGES:
                value = getattr(usage, field)
                if value is not None:
                    gauges[field].labels(sandbox.id, sandbox.backend_name).set(value)

    @hookimpl(wrapper=True)
    def corral_transfer(
        self, sandbox: Sandbox, transfer: FileTransfer
    ) -> Generator[None, Transferred, Transferred]:
        done = yield
        if self._outputs_of(sandbox.id).prometheus:
            gauge = self._make_gauges()[transfer.direction]
            gauge.labels(sandbox.id, sandbox.backend_name).inc(done.size)
        return done

    @hookimpl
    def corral_sandbox_destroyed(
        self, sandbox_id: str, backend: str, error: BaseException | None
    ) -> None:
        with self._lock:
            self._bound.pop(sandbox_id, None)
            gauges = self._gauges
        for gauge in (gauges or {}).values():
            with contextlib.suppress(KeyError):  # never sampled
                gauge.remove(sandbox_id, backend)


plugin = MetricsPlugin()


def prometheus_text() -> bytes:
    """The built-in metrics plugin's gauges (and the rest of the default registry) as text."""
    return plugin.prometheus_text()
