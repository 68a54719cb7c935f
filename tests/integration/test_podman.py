"""What only the Podman backend does: a user namespace per sandbox, and its doctor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import corral

pytestmark = pytest.mark.podman


@pytest.fixture
def engine() -> str:
    return "podman"


@pytest.fixture
def userns_settings(settings_for, engine_settings) -> corral.Settings:
    return settings_for(userns="auto")


def test_userns_auto_maps_the_sandbox_to_unprivileged_host_ids(userns_settings, engine_client):
    with corral.create(backend="podman", settings=userns_settings) as sb:
        mapping = sb.exec(["cat", "/proc/self/uid_map"]).text.split()
        assert mapping[0] == "0" and mapping[1] != "0"  # root inside is not root outside
        pid = engine_client.inspect_container(f"corral-{sb.id}")["State"]["Pid"]
        host_uid = int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0])
        assert host_uid >= int(mapping[1]) > 0
        sb.write_file("/workspace/f", b"one\n")
        assert (
            sb.exec(["sh", "-c", "echo two >> /workspace/f && cat /workspace/f"]).text
            == "one\ntwo\n"
        )
        with pytest.raises(corral.CapabilityError, match="user namespace"):
            sb.write_file("/tmp/t", b"Podman cannot copy into this tmpfs")


def test_userns_auto_with_a_project_mounted_at_the_workdir(userns_settings, mount_root):
    # The two ways the workspace is replaced, combined: its own user namespace (a
    # volume, not a tmpfs) and a bind mount at the workdir (the mount is the folder).
    (mount_root / "run-tests.sh").write_text('test "$(pwd)" = /src && echo "1 passed"\n')
    with corral.create(
        backend="podman",
        settings=userns_settings,
        mounts=[corral.Mount(str(mount_root), "/src")],
        workdir="/src",
    ) as sb:
        result = sb.exec(["sh", "run-tests.sh"])
        assert (result.exit_code, result.text) == (0, "1 passed\n"), result.stderr
        # Podman's copier, in the sandbox's user namespace, leaves out the host's files:
        # refused by name with the way round, never an empty or partial file.
        with pytest.raises(corral.CapabilityError, match=r"'/src/run-tests\.sh'") as refused:
            sb.read_file("/src/run-tests.sh")
        assert "cat /src/run-tests.sh" in (refused.value.fix or "")
        assert sb.exec(["cat", "run-tests.sh"]).text.startswith("test ")


def test_userns_auto_sandboxes_leave_no_volume(userns_settings, engine_client):
    before = {v["Name"] for v in engine_client.volumes()["Volumes"] or []}
    with corral.create(backend="podman", settings=userns_settings) as sb:
        sb.write_file("/workspace/f", b"x")
    after = {v["Name"] for v in engine_client.volumes()["Volumes"] or []}
    assert after <= before


def test_doctor_explains_a_service_that_is_not_running(tmp_path):
    env = {
        **os.environ,
        "CORRAL_DISABLE_PLUGIN_AUTOLOAD": "1",
        "CORRAL_BACKENDS__PODMAN__URL": "unix:///run/corral-test/not-running.sock",
    }
    done = subprocess.run(
        [sys.executable, "-m", "corral", "doctor"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert "podman:" in done.stdout
    assert "not-running.sock" in done.stdout
    assert "podman system service --time=0" in done.stdout


def test_the_init_is_found_by_the_runtimes_pid_file_and_checked(
    engine_settings, engine_client, tmp_path, monkeypatch
):
    # One inspect fewer per sandbox; a pid file that names another process (here this
    # one) falls back to the inspect, never to a wrong process.
    fake = tmp_path / "pidfile"
    fake.write_text(str(os.getpid()))
    with corral.create(backend="podman", settings=engine_settings) as sb:
        backend = sb.backend
        # The view is made from the pid file at once (the changes baseline needs it).
        assert sb.id in backend._pidfiles or sb.id in backend._views
        assert sb.id not in backend._views or backend._views[sb.id] is not None
        with corral.create(backend="podman", settings=engine_settings) as other:
            container_id = engine_client.inspect_container(f"corral-{other.id}")["Id"]
            other.backend._views.pop(other.id, None)
            other.backend._pidfiles[other.id] = (container_id, str(fake))
            inspected: list[str] = []
            for one in {id(b): b for b in (sb.backend, other.backend)}.values():
                inspect = one.engine.inspect
                monkeypatch.setattr(
                    one.engine, "inspect", lambda i, f=inspect: inspected.append(i) or f(i)
                )
            for each in (sb, other):
                assert each.exec(["true"]).ok
                pid = engine_client.inspect_container(f"corral-{each.id}")["State"]["Pid"]
                assert each.backend._views[each.id].init_pid == pid
                assert each.id not in each.backend._pidfiles
            # the pid file spared sb's inspect, not the fake one's
            assert inspected == [f"corral-{other.id}"]
