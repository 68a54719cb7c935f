"""THREATS.md T83, the disk full under an engine's storage (⚠ destructive on the engines),
and its local twin, a local sandbox's own folder full.

An engine case starts a private engine of its own whose storage (Docker's data root,
Podman's graph root and run root) lives on a small loop-mounted filesystem made for
the case, and fills that filesystem to 100 %. Then ``create()`` fails at once with
corral's ResourceLimitError (never an engine client's exception, never a hang) and
leaves no container, volume or network of corral's; a write into a sandbox whose data
is on that disk fails with a clear corral error; the engine and the program carry on;
and once the space is freed, the same sandbox and a new one work. The shared engines
are never touched. The local case fills a local sandbox's own capped folder (a tmpfs
when corral is root), which harms nothing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import private_engines
import pytest
from cases import ENGINES_ONLY, creates_seen, fails_with, unavailable

import corral
from corral.core.plugins import get_host
from corral.core.settings import load_settings

# A sandbox whose root is its writable layer, on the engine's storage: the one place of
# a sandbox that a full engine disk reaches (its workspace and /tmp are tmpfs).
WRITABLE_ROOT: dict[str, Any] = {
    "security": {"read_only_root": False, "allow_unsafe": ["read_only_root"]},
    "user": "0:0",
}


@pytest.fixture
def on_small_disk(
    backend: str,
) -> Iterator[tuple[private_engines.PrivateEngine, private_engines.SmallDisk]]:
    """A private engine of ``backend``'s kind with its storage on a small disk of its own;
    at the end, the engine, all it stored and the disk are gone."""
    if os.geteuid() != 0:
        unavailable("a loop-mounted filesystem needs root")
    private_engines.require_binaries(backend, "mkfs.ext4")
    disk = private_engines.SmallDisk()
    try:
        engine = private_engines.start_private(backend, storage=disk.path)
    except BaseException:
        disk.remove()
        raise
    try:
        yield engine, disk
    finally:
        get_host().close()  # the clients of that engine, before it goes
        engine.remove_everything()
        disk.remove()


def _settings(backend: str, engine: private_engines.PrivateEngine, cwd: Path) -> corral.Settings:
    table = {
        "url": engine.url,
        "pull": "never",
        "default_image": private_engines.IMAGE,
        "timeout": "20s",
    }
    return load_settings({"backends": {backend: table}}, cwd=cwd, environ={})


@pytest.fixture
def creating() -> Iterator[list[str]]:
    with creates_seen() as ids:
        yield ids


def _corral_objects(engine: private_engines.PrivateEngine, ids: set[str]) -> list[str]:
    """Every container, volume and network on ``engine`` with corral's labels for one of
    the sandboxes ``ids``. (Only those: Podman keeps its networks host-wide, so those of
    other engines on the machine are listed too.)"""
    import docker

    client: Any = docker.APIClient(base_url=engine.url, version="1.41")
    try:
        managed = {"label": "corral.managed=true"}
        found = [
            (f"container {c['Id'][:12]}", c.get("Labels"))
            for c in client.containers(all=True, filters=managed)
        ]
        found += [
            (f"volume {v['Name'][:12]}", v.get("Labels"))
            for v in client.volumes(filters=managed)["Volumes"] or []
        ]
        found += [
            (f"network {n['Name']}", n.get("Labels")) for n in client.networks(filters=managed)
        ]
    finally:
        client.close()
    return [what for what, labels in found if (labels or {}).get("corral.sandbox") in ids]


@pytest.mark.destructive
@ENGINES_ONLY
def test_t83_a_full_engine_disk_fails_create_clearly_and_recovers(
    backend, on_small_disk, state_dir, creating
):
    engine, disk = on_small_disk
    settings = _settings(backend, engine, state_dir)
    sb = corral.create(backend=backend, settings=settings, lifetime="10m", **WRITABLE_ROOT)
    try:
        # The twin first: while there is room, the sandbox's root takes a write.
        sb.write_file("/etc/before", b"fits")
        disk.fill()

        tag = uuid.uuid4().hex
        error = fails_with(
            corral.ResourceLimitError,
            lambda: corral.create(
                backend=backend, settings=settings, labels={"campaign.case": tag}, lifetime="5m"
            ),
        )
        assert error.category == "resource_limit" and error.backend == backend
        assert "no space left on the engine's storage" in str(error)
        assert "free space there" in str(error) and "Traceback" not in str(error)
        failed = creating[-1]
        assert failed != sb.id
        assert _corral_objects(engine, {failed}) == [], "the failed create left something"

        # A write into the sandbox whose root is on the full disk: corral's error too.
        error = fails_with(
            corral.ResourceLimitError, lambda: sb.write_file("/etc/after", b"x" * 65536)
        )
        assert error.sandbox_id == sb.id and "no space left" in str(error)
        writes = ["sh", "-c", "echo more > /etc/after"]
        if backend == "podman":
            # Podman keeps each exec's state on its storage: the exec cannot even start.
            error = fails_with(corral.ResourceLimitError, lambda: sb.exec(writes))
            assert error.sandbox_id == sb.id
        else:
            wrote = sb.exec(writes)
            assert wrote.exit_code != 0 and "No space left on device" in wrote.stderr_text

        # The engine and this program carry on: the engine still answers for the sandbox.
        assert engine.running()
        assert sb.id in [i.id for i in corral.list(backend=backend, settings=settings)]

        # Freed, the same sandbox and a new one work.
        disk.free()
        sb.write_file("/etc/after", b"back")
        assert sb.read_file("/etc/after") == b"back"
        assert sb.exec(["cat", "/etc/before"]).text == "fits"
        with corral.create(backend=backend, settings=settings, lifetime="5m") as fresh:
            fresh.write_file("/workspace/a", b"works")
            assert fresh.exec(["cat", "/workspace/a"]).text == "works"
    finally:
        sb.close()
    assert len(creating) == 3
    assert _corral_objects(engine, set(creating)) == []


@pytest.mark.local
@pytest.mark.skipif(os.geteuid() != 0, reason="the local folder cap is a tmpfs, mounted as root")
def test_t83_a_full_local_sandbox_folder_is_a_clear_error_and_recovers(state_dir):
    settings = load_settings(
        {"backends": {"local": {"state_dir": str(state_dir), "disk_size": "24MiB"}}},
        cwd=state_dir,
        environ={},
    )
    with corral.create(backend="local", settings=settings, memory="128MiB", lifetime="5m") as sb:
        sb.write_file("/workspace/before", b"fits")  # the twin, while there is room
        fill = sb.exec(
            [
                "sh",
                "-c",
                "dd if=/dev/zero of=/workspace/fill bs=1M; dd if=/dev/zero of=/tmp/fill bs=4k",
            ],
            timeout=60,
        )
        assert fill.stderr_text.count("No space left on device") == 2, fill

        error = fails_with(
            corral.ResourceLimitError, lambda: sb.write_file("/workspace/after", b"x" * 65536)
        )
        assert error.sandbox_id == sb.id and error.backend == "local"
        assert "no space left in the sandbox's folder" in str(error)
        assert "disk_size" in str(error)
        wrote = sb.exec(["sh", "-c", "head -c 65536 /dev/zero > /tmp/more"])
        assert wrote.exit_code != 0 and "No space left on device" in wrote.stderr_text

        # The sandbox and this program carry on; another sandbox has a folder of its own.
        assert sb.exec(["echo", "alive"]).text == "alive\n"
        with corral.create(backend="local", settings=settings, lifetime="5m") as other:
            other.write_file("/workspace/a", b"room here")
            assert other.read_file("/workspace/a") == b"room here"

        # Freed, the same sandbox takes writes again.
        assert sb.exec(["rm", "/workspace/fill", "/tmp/fill"]).ok
        sb.write_file("/workspace/after", b"back")
        assert sb.read_file("/workspace/after") == b"back"
        again = sb.exec(["sh", "-c", "head -c 65536 /dev/zero > /tmp/more && wc -c < /tmp/more"])
        assert again.text.strip() == "65536", again
