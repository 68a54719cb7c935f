"""The core's own answers to its dispatch hooks, called after every plugin's (trylast)."""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

from .hookspecs import hookimpl
from .results import ExecResult, ResourceUsage
from .transfer import perform

if TYPE_CHECKING:
    from .output import OutputSink
    from .results import Health
    from .sandbox import Sandbox
    from .spec import ExecRequest
    from .transfer import FileTransfer, Transferred


@hookimpl(trylast=True)
def corral_exec(sandbox: Sandbox, request: ExecRequest, sink: OutputSink) -> ExecResult:
    started = time.monotonic()
    status = sandbox._backend_exec(request, sink)  # the backend's exec, or run_once
    # RLIMIT_CPU ends a command with SIGXCPU: out of CPU time is a timeout too, whatever
    # the backend (THREATS T26), and never an OOM.
    cpu_timeout = sandbox.spec.limits.cputime is not None and status.signal == signal.SIGXCPU
    return ExecResult(
        timed_out_by=timed_out_by(
            status.timed_out,
            sink,
            cpu_timeout=cpu_timeout,
            lifetime_over=time.time() >= sandbox.expires,
        ),
        exit_code=status.exit_code,
        stdout=sink.value("stdout"),
        stderr=sink.value("stderr"),
        duration=time.monotonic() - started,
        timed_out=status.timed_out or cpu_timeout,
        oom_killed=status.oom_killed,
        truncated=sink.truncated,
        signal=status.signal,
        oom_events=status.oom_events,
    )


@hookimpl(trylast=True)
def corral_usage(sandbox: Sandbox) -> ResourceUsage:
    return sandbox.backend.usage(sandbox.id)


@hookimpl(trylast=True)
def corral_transfer(sandbox: Sandbox, transfer: FileTransfer) -> Transferred:
    return perform(sandbox, transfer)


@hookimpl(trylast=True)
def corral_health(sandbox: Sandbox) -> Health:
    return sandbox.backend.health(sandbox.id)


def timed_out_by(
    timed_out: bool, sink: OutputSink, *, cpu_timeout: bool, lifetime_over: bool
) -> str | None:
    """Which limit stopped a command (``ExecResult.timed_out_by``)."""
    if cpu_timeout:
        return "cputime"
    if not timed_out:
        return None
    if sink.idle:
        return "idle_timeout"
    return "lifetime" if lifetime_over else "timeout"
