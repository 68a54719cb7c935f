"""The suite's Ray cluster (scripts/cluster) as tests see it: its address, settings for
the ray backend, and extra worker nodes a test starts and kills itself."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import corral
from corral.core.settings import load_settings

ADDRESS = "CORRALTEST_RAY_ADDRESS"
RAY = str(Path(sys.executable).with_name("ray"))


def address() -> str:
    value = os.environ.get(ADDRESS)
    if not value:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI needs the Ray cluster: {ADDRESS} is not set")
        pytest.skip(f"{ADDRESS} is not set; run the suite through ./scripts/test")
    return value


def ray_settings(folder: Path, **ray: Any) -> corral.Settings:
    """Settings of the test's own for the ray backend; bind sources under ``folder``."""
    return load_settings(
        {
            "mount_roots": [str(folder)],
            "backends": {"ray": {"address": address(), "call_timeout": "30s", **ray}},
        },
        cwd=folder,
        environ={},
    )


def connect() -> Any:
    """This test process as a driver of the suite's cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address=address(), namespace="corral", logging_level="WARNING", log_to_driver=False
        )
    return ray


def alive_nodes() -> dict[str, dict[str, Any]]:
    return {n["NodeID"]: n for n in connect().nodes() if n["Alive"]}


class ExtraNode:
    """A worker node of the test's own (``ray start --block``), with a resource naming it
    so that sandboxes can be sent there; ``kill()`` SIGKILLs its raylet, as a machine
    that dies would go."""

    def __init__(self, name: str, env: dict[str, str] | None = None, cpus: int = 4) -> None:
        self.name = name
        before = set(alive_nodes())
        host = os.environ.get("CORRALTEST_RAY_NODE_IP") or address().rpartition(":")[0]
        self.process = subprocess.Popen(
            [
                RAY,
                "start",
                "--block",
                f"--address={address()}",
                f"--node-ip-address={host}",
                f"--num-cpus={cpus}",
                f"--memory={4 * 1024**3}",
                "--object-store-memory=80000000",
                f'--resources={{"{name}": 1000}}',
                f"--temp-dir={os.environ.get('CORRALTEST_RAY_TEMP', '/tmp/corral-ray')}",
                "--min-worker-port=24000",
                "--max-worker-port=24999",
                "--dashboard-agent-listen-port=0",
                "--disable-usage-stats",
            ],
            env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            new = set(alive_nodes()) - before
            if new:
                self.id = new.pop()
                return
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"node {name} did not join the cluster in 60 s")

    def raylet(self) -> psutil.Process:
        for child in psutil.Process(self.process.pid).children(recursive=True):
            if "raylet" in child.name():
                return child
        raise AssertionError(f"node {self.name} has no raylet")

    def kill(self) -> None:
        """The node dies at once: its raylet SIGKILLed (its workers follow it)."""
        self.raylet().send_signal(signal.SIGKILL)

    def stop(self) -> None:
        """Everything this node started, gone (its session's processes)."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def session_members(leader: int) -> list[psutil.Process]:
    """Every process of the session ``leader`` leads (Ray's workers run in process
    groups of their own, but stay in the session of the `ray start` that made them)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if os.getsid(process.pid) == leader:
                found.append(process)
    return found


class OwnHead:
    """A one-node cluster of the test's own, apart from the suite's (its own address,
    port and temporary folder), for a head that dies and comes back."""

    PORT = 6399
    HOST = "127.0.0.5"
    TEMP = "/tmp/corral-ray-head"

    def __init__(self) -> None:
        self.address = f"{self.HOST}:{self.PORT}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                f"--port={self.PORT}",
                f"--node-ip-address={self.HOST}",
                f"--temp-dir={self.TEMP}",
                f"--ray-client-server-port={self.PORT + 1}",
                "--include-dashboard=false",
                "--num-cpus=2",
                "--min-worker-port=31000",
                "--max-worker-port=31999",
                "--dashboard-agent-listen-port=0",
                "--disable-usage-stats",
            ],
            env={**os.environ, "RAY_AUTH_MODE": "disabled"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            probe = subprocess.run(
                [RAY, "status", f"--address={self.address}"], capture_output=True, timeout=30
            )
            if probe.returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError("the test's own head did not come up in 60 s")

    def kill(self) -> None:
        """The head dies at once: every process of its session SIGKILLed."""
        assert self.process is not None
        for process in session_members(self.process.pid):
            with contextlib.suppress(psutil.Error):
                process.kill()
        self.process.wait(10)
