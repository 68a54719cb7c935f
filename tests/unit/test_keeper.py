"""The keeper of spawned processes, from the outside (THREATS L05): its folders are
private, it is one per sandbox, and it leaves once nothing runs, also after its caller
was SIGKILLed. Real processes, through the subprocess-test backend (tests/plugin_dist)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral.core import processes
from corral.core.plugins import PluginHost
from corral.core.settings import Settings, load_settings

BACKEND = "subprocess-test"
UNISOLATED = {"sandbox": {"security": {"isolate": False, "allow_unsafe": ["isolate"]}}}


@pytest.fixture
def settings(tmp_path: Path, global_host: PluginHost) -> Settings:
    return load_settings(UNISOLATED, cwd=tmp_path, environ={})


@pytest.fixture
def sandbox(settings: Settings) -> Iterator[corral.Sandbox]:
    with corral.create(backend=BACKEND, settings=settings) as made:
        yield made
        keeper = processes.folder(made.backend, made.id)
    assert not keeper.exists(), "the keeper's folder must go with the sandbox"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _eventually(condition, what: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.1)


def test_one_keeper_serves_spawns_from_many_threads(sandbox: corral.Sandbox) -> None:
    results: list[bytes] = []

    def spawn(i: int) -> None:
        results.append(sandbox.spawn(["echo", str(i)]).wait(timeout=60).stdout)

    threads = [threading.Thread(target=spawn, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == sorted(f"{i}\n".encode() for i in range(8))
    folder = processes.folder(sandbox.backend, sandbox.id)
    assert len(sandbox.processes()) == 8
    pid = int((folder / "keeper.pid").read_text())
    assert _alive(pid)
    assert (folder.stat().st_mode & 0o777) == 0o700


def test_a_folder_planted_by_another_user_is_refused(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("planting a folder of another user takes root")
    shared = tmp_path / "shared-tmp"
    shared.mkdir(mode=0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    monkeypatch.setenv("TMPDIR", str(shared))  # the keeper's too
    planted = shared / f"corral-{os.geteuid()}"
    planted.mkdir()
    os.chown(planted, 65534, 65534)
    with corral.create(backend=BACKEND, settings=settings) as sb:
        with pytest.raises(corral.InternalError, match="not a private folder"):
            sb.spawn(["true"])
        os.chown(planted, 0, 0)
        planted.chmod(0o777)  # ours, but writable by everyone
        with pytest.raises(corral.InternalError, match="not a private folder"):
            sb.spawn(["true"])
        planted.chmod(0o711)
        assert sb.spawn(["echo", "ok"]).wait(timeout=60).stdout == b"ok\n"


def test_the_keeper_leaves_after_its_caller_is_killed_and_the_process_ended(
    settings: Settings,
) -> None:
    program = (
        "import os, pickle, sys, corral\n"
        "from corral.core import processes\n"
        "settings = pickle.load(sys.stdin.buffer)\n"
        "sb = corral.create(backend='subprocess-test', settings=settings)\n"
        "sb.detach()\n"
        "p = sb.spawn(['sh', '-c', 'sleep 1; echo done'])\n"
        "folder = processes.folder(sb.backend, sb.id)\n"
        "print(sb.id, p.id, (folder / 'keeper.pid').read_text(), flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    env = {**os.environ, "CORRAL_KEEPER_LINGER": "1"}
    env.pop("CORRAL_DISABLE_PLUGIN_AUTOLOAD", None)
    caller = subprocess.run(
        [sys.executable, "-c", program],
        input=pickle.dumps(settings),
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert caller.returncode == -signal.SIGKILL, caller.stderr.decode()
    sandbox_id, process_id, keeper_pid = caller.stdout.decode().split()
    _eventually(lambda: not _alive(int(keeper_pid)), "the keeper leaving once idle")
    # What the process printed and how it ended stay readable after the keeper left.
    sb = corral.attach(sandbox_id, backend=BACKEND, settings=settings)
    result = sb.process(process_id).wait(timeout=10)
    assert (result.exit_code, result.stdout) == (0, b"done\n")
    sb.close()
    assert not processes.folder(sb.backend, sandbox_id).exists()


def test_gc_removes_what_a_vanished_sandbox_left(settings: Settings) -> None:
    sb = corral.create(backend=BACKEND, settings=settings)
    sb.spawn(["sleep", "60"])
    folder = processes.folder(sb.backend, sb.id)
    pid = int((folder / "keeper.pid").read_text())
    sb.backend.destroy(sb.id)  # removed behind corral's back: the keeper remains
    corral.gc(backend=BACKEND, settings=settings)
    assert not folder.exists()
    _eventually(lambda: not _alive(pid), "the keeper stopping at gc")
    sb.close()


def test_spawns_as_the_keeper_leaves_start_another_and_lose_nothing(
    sandbox: corral.Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keeper leaves once idle for its linger time; spawns that come just then
    (here, around a 0.3 s linger) must reach a keeper that runs them, old or new."""
    monkeypatch.setenv("CORRAL_KEEPER_LINGER", "0.3")
    pids = set()
    folder = processes.folder(sandbox.backend, sandbox.id)
    for i in range(25):
        assert sandbox.spawn(["echo", str(i)]).wait(timeout=60).stdout == f"{i}\n".encode()
        pids.add((folder / "keeper.pid").read_text())
        time.sleep(0.2 + (i % 5) * 0.05)  # around the linger: before, at, after it
    assert len(pids) > 1, "no keeper left in between: the check proved nothing"
    assert len(sandbox.processes()) == 25


def test_a_bad_extend_names_its_argument(sandbox: corral.Sandbox) -> None:
    with pytest.raises(corral.ConfigError, match=r"^duration: 'soon' is not a duration"):
        sandbox.extend("soon")
