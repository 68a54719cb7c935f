"""Podman without catatonit (issue 13, finding 4): sandboxes still get a PID 1 that reaps
orphans (an init the engine has, or corral's own), never a failed create, and
``corral doctor`` says which init it used."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from podman_noinit import (  # podman_noinit_service: the fixture podman_noinit
    IMAGE,
    NoInitService,
    container_ids,
    libpod,
    podman_noinit_service,  # noqa: F401
)

import corral
from corral.core.settings import load_settings
from corral.testing.conformance import unavailable

pytestmark = pytest.mark.podman

# How the engine mounts the init it runs as PID 1, whichever binary it is.
ENGINE_INIT = "/run/podman-init"


@pytest.fixture
def noinit_settings(
    podman_noinit: NoInitService, state_dir: Path, mount_root: Path
) -> corral.Settings:
    return load_settings(
        {
            "mount_roots": [str(mount_root)],
            "backends": {
                "podman": {"url": podman_noinit.url, "pull": "never", "default_image": IMAGE}
            },
        },
        cwd=state_dir,
        environ={},
    )


def _volumes(url: str) -> set[str]:
    status, listed = libpod(url, "GET", "/volumes/json")
    assert status == 200, listed
    return {v["Name"] for v in listed or []}


@pytest.fixture
def nothing_leaks(podman_noinit: NoInitService):
    """Proves, after the test, that the service holds no container or volume it did not
    hold before."""
    url = podman_noinit.url
    containers, volumes = container_ids(url), _volumes(url)
    yield
    assert container_ids(url) - containers == set(), "a container leaked"
    assert _volumes(url) - volumes == set(), "a volume leaked"


def _assert_reaped(sandbox: corral.Sandbox, pids: list[int], within: float = 10) -> None:
    """Each of ``pids`` (orphans, so PID 1's children) is gone from /proc, not a zombie."""
    deadline = time.monotonic() + within
    while True:
        states = sandbox.exec(
            ["sh", "-c", " ".join(f"cat /proc/{p}/stat 2>/dev/null;" for p in pids)]
        ).text
        if not states:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"PID 1 does not reap its orphans; they are still there: {states}")
        time.sleep(0.2)


def _zombies(sandbox: corral.Sandbox) -> list[str]:
    # /proc/PID/stat: "pid (comm) state ..."; the state follows the last ")".
    lines = sandbox.exec(["sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null"]).text.splitlines()
    return [line for line in lines if line.rpartition(")")[2].split()[:1] == ["Z"]]


def test_a_sandbox_with_default_options_runs_and_reaps_orphans(noinit_settings, nothing_leaks):
    with corral.create(backend="podman", settings=noinit_settings) as sb:
        assert sb.exec(["echo", "hi"]).text == "hi\n"
        # Three orphans: their shell ends at once, so the kernel gives them to PID 1.
        spawned = sb.exec(
            ["sh", "-c", "for i in 1 2 3; do sleep 0.1 >/dev/null 2>&1 & echo $!; done"]
        )
        orphans = [int(pid) for pid in spawned.text.split()]
        assert len(orphans) == 3, spawned
        _assert_reaped(sb, orphans)
        assert _zombies(sb) == []
        # Still usable after, and a command's own exit status is its own.
        assert sb.exec(["sh", "-c", "exit 3"]).exit_code == 3


def test_run_works_keeps_the_exit_status_and_reaps_orphans(noinit_settings, nothing_leaks):
    # corral.run makes the command the container's own process, under PID 1.
    result = corral.run(["sh", "-c", "echo hi; exit 3"], backend="podman", settings=noinit_settings)
    assert (result.exit_code, result.text) == (3, "hi\n"), result
    # An orphan, then a look at it a second later from awk, which (unlike a shell) waits
    # for its own child only: were the command itself PID 1, the orphan would stay a
    # zombie.
    orphaned = (
        "p=$(sh -c 'sleep 0.1 >/dev/null 2>&1 & echo $!'); exec awk -v p=$p 'BEGIN {"
        ' system("sleep 1");'
        ' if ((getline s < ("/proc/" p "/stat")) > 0) print "left: " s; else print "reaped" }\''
    )
    result = corral.run(["sh", "-c", orphaned], backend="podman", settings=noinit_settings)
    assert (result.exit_code, result.text) == (0, "reaped\n"), result


def _doctor_init(url: str, tmp_path: Path) -> str:
    """What ``corral doctor`` says of the init the Podman service at ``url`` gets."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")},
        "CORRAL_DISABLE_PLUGIN_AUTOLOAD": "1",
        "CORRAL_BACKENDS__PODMAN__URL": url,
        "CORRAL_BACKENDS__PODMAN__PULL": "never",
        "CORRAL_BACKENDS__PODMAN__DEFAULT_IMAGE": IMAGE,
    }
    done = subprocess.run(
        [sys.executable, "-m", "corral", "doctor"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    # The podman entry: its own line and the indented lines under it.
    entry = re.search(r"^  podman: .*(?:\n    .*)*", done.stdout, re.MULTILINE)
    assert entry, f"doctor printed no podman entry:\n{done.stdout}{done.stderr}"
    said = re.search(r"init: ([^;,\n]+)", entry[0])
    assert said, f"doctor does not say which init podman uses:\n{entry[0]}"
    return said[1].strip()


def _pid1_argv0(sandbox: corral.Sandbox) -> str:
    return sandbox.exec(["cat", "/proc/1/cmdline"]).stdout.split(b"\0")[0].decode()


def test_doctor_says_which_init_a_service_without_catatonit_gets(
    podman_noinit, noinit_settings, tmp_path, nothing_leaks
):
    init = _doctor_init(podman_noinit.url, tmp_path)
    assert "catatonit" not in init, f"doctor claims catatonit, which this service lacks: {init}"
    own = init.startswith("corral's own PID 1")
    assert own or init.startswith("/"), init
    if podman_noinit.kind == "no-init":
        assert own, f"this service has no init binary at all, yet doctor says {init}"
    # What doctor says is what a sandbox gets.
    with corral.create(backend="podman", settings=noinit_settings) as sb:
        argv0 = _pid1_argv0(sb)
    if own:
        assert argv0 != ENGINE_INIT, "doctor says corral's own PID 1, but the engine's init runs"
    else:
        assert Path(init).is_file(), f"doctor names an init that is not on this host: {init}"
        assert argv0 == ENGINE_INIT, f"doctor says {init}, but PID 1 is {argv0}"


def test_doctor_says_a_service_with_catatonit_uses_it(tmp_path):
    url = os.environ.get("CORRALTEST_PODMAN_URL")
    if not url:
        unavailable("CORRALTEST_PODMAN_URL is not set; run the suite through ./scripts/test")
    if not os.path.lexists("/usr/libexec/podman/catatonit"):
        unavailable("catatonit is not installed; ./scripts/engines up installs it")
    assert _doctor_init(url, tmp_path).startswith("catatonit (the engine's)")
