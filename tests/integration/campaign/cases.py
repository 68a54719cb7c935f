"""What the campaign's cases share: backend selections, host process probes, refusals,
calls that must fail in bounded time.

The test modules import it by name (pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import corral

# Cases that apply to the container engines only (the catalogue's D and P columns).
ENGINES_ONLY = pytest.mark.parametrize(
    "backend",
    [pytest.param(name, marks=getattr(pytest.mark, name)) for name in ("docker", "podman")],
)
ONLY_LOCAL = pytest.mark.parametrize("backend", [pytest.param("local", marks=pytest.mark.local)])
# Where the suite's Ray nodes keep the sandboxes of their local backend: its default
# state folder (scripts/cluster starts them on this machine, as this user and with this
# environment, TMPDIR included, and sets no state_dir for them).
NODE_LOCAL_ROOT = Path(tempfile.gettempdir(), f"corral-{os.geteuid()}", "local")
# How long a killed process may take to be gone (reaping, an engine's clean-up).
SETTLE = 15.0
# A call that is still running this long after its own timeout has hung (generous:
# this detects hangs on a loaded machine, it does not measure speed).
HANG = 60
# The opt-in a read-write bind mount needs (its writes reach the host's disk uncapped).
RW_OPT_IN = {"allow_unsafe": ["unbounded_rw_mounts"]}


def token() -> str:
    """A unique argument to put in an attack's command line, to find it on the host."""
    return f"corral-attack-{uuid.uuid4().hex[:12]}"


def host_processes(*needles: str) -> list[str]:
    """Live (non-zombie) host processes with one of ``needles`` among their arguments.

    Container and local sandbox processes alike are host processes here, so one search
    finds an attack's leftovers on every backend.
    """
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        args = p.info["cmdline"] or []
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(n in args for n in needles):
            found.append(f"{p.pid}: {' '.join(args)}")
    return found


def gone(find: Callable[[], list[str]], within: float = SETTLE) -> list[str]:
    """What ``find`` still finds once it found nothing or ``within`` seconds passed."""
    deadline = time.monotonic() + within
    while (left := find()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def tagged(backend: str, settings: corral.Settings, tag: str) -> list[str]:
    """Ids of the backend's sandboxes labelled with the case's ``tag``."""
    return [
        info.id
        for info in corral.list(backend=backend, settings=settings)
        if info.labels.get("campaign.case") == tag
    ]


def refused(
    backend: str, settings: corral.Settings, error: type[Exception], match: str, **keywords: object
) -> Exception:
    """``corral.create(**keywords)`` raises ``error`` matching ``match``; nothing was made."""
    tag = uuid.uuid4().hex
    if "labels" not in keywords:  # a case about labels brings its own (bad) ones
        keywords["labels"] = {"campaign.case": tag}
    keywords.setdefault("lifetime", "5m")
    with pytest.raises(error, match=match) as caught:
        corral.create(backend=backend, settings=settings, **keywords).close()
    assert tagged(backend, settings, tag) == [], "a refused sandbox was created"
    return caught.value


def fails_with(kind: type[corral.SandboxError], call: Callable[[], Any], limit: float = HANG):
    """The error of class ``kind`` that ``call()`` raises, failing the case if it returns,
    raises anything else, or is still running after ``limit`` seconds (a hang that no
    timeout of corral's ended). Its traceback is dropped: held by the case, its frames
    would keep the engine connections they name open until a garbage collection."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:
            outcome["error"] = e.with_traceback(None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    assert not worker.is_alive(), f"the call hung for more than {limit}s"
    error = outcome.get("error")
    assert error is not None, f"expected {kind.__name__}, got the result {outcome.get('value')!r}"
    assert isinstance(error, kind), f"expected {kind.__name__}, got {error!r}"
    return error


def engine_networks(backend: str, client: Any, **labels: str) -> list[dict[str, Any]]:
    """The engine's networks with these labels, as libpod reports them on Podman (its
    Docker API would strip ``isolate`` from the service's copy of each, Podman 4.3):
    ``name``, ``labels`` and ``options``."""
    wanted = [f"{k}={v}" for k, v in labels.items()]
    if backend == "docker":
        return [
            {"name": n["Name"], "labels": n.get("Labels") or {}, "options": n.get("Options") or {}}
            for n in client.networks(filters={"label": wanted})
        ]
    response = client.get(
        client.base_url + "/v4.0.0/libpod/networks/json",
        params={"filters": json.dumps({"label": wanted})},
    )
    try:
        response.raise_for_status()
        return [{**n, "options": n.get("options") or {}} for n in response.json()]
    finally:
        response.close()


def unavailable(reason: str) -> None:
    """A case this machine cannot run: skipped on a developer's machine, a failure under
    CI, whose test command installs and starts all a case needs."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI needs this: {reason}")
    pytest.skip(reason)


class _CreatesSeen:
    def __init__(self) -> None:
        self.ids: list[str] = []

    @corral.hookimpl
    def corral_sandbox_creating(self, spec: object, sandbox_id: str, backend: str) -> None:
        self.ids.append(sandbox_id)


@contextlib.contextmanager
def creates_seen() -> Iterator[list[str]]:
    """The ids of the sandboxes corral begins to make inside the block, a failed create's
    included (in order)."""
    from corral.core.plugins import get_host

    seen = _CreatesSeen()
    get_host().pm.register(seen)
    try:
        yield seen.ids
    finally:
        get_host().pm.unregister(seen)
