"""The container layer's pure parts, without an engine: plan, verify, output framing,
the engines' spec mapping, the error tables, the hand-written HTTP."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import threading
import time

import attrs
import pytest

import corral
from corral.backends.containers import plan as plan_module
from corral.backends.containers.errors import error_for
from corral.backends.containers.frames import read_frames
from corral.backends.containers.http import Refused, message_of, upgrade
from corral.backends.containers.plan import main_process_plan, plan, reaper_command
from corral.backends.containers.verify import verify
from corral.core.convert import structure
from corral.core.output import OutputSink
from corral.core.spec import ExecRequest, SandboxSpec

LABELS = {"corral.sandbox": "s1", "corral.managed": "true"}


def _plan(**fields: object) -> plan_module.ContainerPlan:
    spec = attrs.evolve(
        SandboxSpec(),
        **{k: structure(v, type(getattr(SandboxSpec(), k))) if isinstance(v, dict) else v
           for k, v in fields.items()},
    )  # fmt: skip
    return plan(spec, LABELS, image="img", workspace_size=1024**3)


def _targets(p: plan_module.ContainerPlan) -> list[str]:
    return sorted(
        [t.target for t in p.tmpfs_volumes]
        + [b.target for b in p.binds]
        + [v.target for v in p.volumes]
    )


# -- plan ---------------------------------------------------------------------------------


def test_a_sandbox_gets_a_workspace_and_a_tmp_of_its_own():
    p = _plan()
    assert _targets(p) == ["/tmp", "/workspace"]
    assert p.command[0] == "sleep" and p.name == "corral-s1"
    assert p.ulimits["core"] == (0, 0) and p.network_name is None


@pytest.mark.parametrize(
    ("workdir", "target"), [("/src", "/src"), ("/src/pkg", "/src"), ("/tmp", "/tmp")]
)
def test_a_workdir_at_or_below_a_mount_is_the_mounts_folder(tmp_path, workdir, target):
    # Two mounts at one target are refused by both engines ("duplicate mount point");
    # one below a bind would hide what the bind shows.
    p = _plan(mounts=(corral.Mount(str(tmp_path), target),), workdir=workdir)
    assert _targets(p).count(target) == 1
    assert [b.target for b in p.binds] == [target]
    assert not any(t.target in (workdir, target) for t in p.tmpfs_volumes)


def test_a_bind_at_tmp_replaces_the_tmp_tmpfs(tmp_path):
    p = _plan(mounts=(corral.Mount(str(tmp_path), "/tmp"),))
    assert _targets(p) == ["/tmp", "/workspace"]
    assert [t.target for t in p.tmpfs_volumes] == ["/workspace"]


def test_a_tmpfs_at_the_workdir_replaces_the_workspace():
    p = _plan(mounts=(corral.Tmpfs("/workspace", size="8MiB"),))
    (workspace,) = [t for t in p.tmpfs_volumes if t.target == "/workspace"]
    assert workspace.size == 8 * 1024**2


def test_too_few_pids_for_a_container_is_refused_by_field():
    with pytest.raises(corral.ConfigError, match=r"sandbox\.limits\.pids"):
        _plan(limits={"pids": 8})


def test_no_image_anywhere_is_refused_by_field():
    with pytest.raises(corral.ConfigError, match=r"sandbox\.image"):
        plan(SandboxSpec(), LABELS, image=None, workspace_size=1024**3)


def test_a_seccomp_profile_is_planned_by_its_resolved_path(tmp_path, monkeypatch):
    (tmp_path / "p.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    p = _plan(security={"seccomp": "p.json"})
    assert p.seccomp == str(tmp_path / "p.json")
    assert "seccomp={}" in p.security_opt


def test_the_one_call_run_plans_the_command_as_pid_1_only_where_it_can():
    spec = SandboxSpec()
    request = ExecRequest(argv=("echo", "hi"))
    own = main_process_plan(spec, request, LABELS, local=True, image="img", workspace_size=1 << 30)
    assert own is not None and own.command[-2:] == ["echo", "hi"]
    assert (
        main_process_plan(spec, request, LABELS, local=False, image="i", workspace_size=1) is None
    )
    with_stdin = ExecRequest(argv=("cat",), stdin=b"x")
    assert (
        main_process_plan(spec, with_stdin, LABELS, local=True, image="i", workspace_size=1) is None
    )


def test_corral_own_pid_1_passes_the_commands_status_on():
    # What a Podman without an init binary runs as PID 1: a real shell, here. (That it
    # reaps orphans as PID 1 is tested on such a service: test_podman_noinit.py.)
    argv = reaper_command(["sh", "-c", "(sleep 0.2 &) ; exit 3"])
    assert subprocess.run(argv).returncode == 3


# -- verify -------------------------------------------------------------------------------


def _inspect_of(p: plan_module.ContainerPlan) -> dict:
    return {
        "HostConfig": {
            "Privileged": False,
            "ReadonlyRootfs": p.read_only,
            "CapDrop": ["ALL"],
            "CapAdd": None,
            "SecurityOpt": ["no-new-privileges"],
            "Memory": p.memory,
            "MemorySwap": p.memory,
            "PidsLimit": p.pids,
            "OomScoreAdj": 500,
            "NetworkMode": "none",
            "Ulimits": [{"Name": "nofile", "Hard": p.ulimits["nofile"][1]}],
            "MaskedPaths": list(p.masked_paths),
        },
        "Mounts": [{"Destination": b.target, "RW": not b.read_only} for b in p.binds],
    }


def test_a_container_made_as_planned_passes():
    p = _plan()
    verify(p, _inspect_of(p))


@pytest.mark.parametrize(
    ("field", "value"),
    [("Privileged", True), ("Memory", 1), ("PidsLimit", 99999), ("PidMode", "host")],
)
def test_a_container_the_engine_loosened_is_refused_naming_the_field(field, value):
    p = _plan()
    inspect = _inspect_of(p)
    inspect["HostConfig"][field] = value
    with pytest.raises(corral.PolicyError, match=field):
        verify(p, inspect)


def test_a_read_only_bind_made_writable_is_refused(tmp_path):
    p = _plan(mounts=(corral.Mount(str(tmp_path), "/src"),))
    inspect = _inspect_of(p)
    inspect["Mounts"] = [{"Destination": "/src", "RW": True}]
    with pytest.raises(corral.PolicyError, match="mount /src"):
        verify(p, inspect)


# -- output framing -----------------------------------------------------------------------


def _frame(stream: int, data: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(data)) + data


def test_frames_split_anywhere_reach_their_streams_whole():
    ours, engine = socket.socketpair()
    data = _frame(1, b"out-1 ") + _frame(2, b"err") + _frame(1, b"out-2")
    sink = OutputSink(1 << 20)

    def send() -> None:
        for i in range(0, len(data), 3):  # every header and payload cut
            engine.sendall(data[i : i + 3])
            time.sleep(0.001)
        engine.close()

    threading.Thread(target=send).start()
    timed_out = read_frames(ours, sink, None, lambda: None, initial=b"")
    ours.close()
    assert not timed_out
    assert (sink.value("stdout"), sink.value("stderr")) == (b"out-1 out-2", b"err")


def test_a_deadline_calls_the_kill_and_keeps_what_came():
    ours, engine = socket.socketpair()
    engine.sendall(_frame(1, b"before"))
    killed = []

    def kill() -> None:
        killed.append(True)
        engine.close()

    sink = OutputSink(1 << 20)
    assert read_frames(ours, sink, time.monotonic() + 0.1, kill, initial=_frame(2, b"e"))
    ours.close()
    assert killed == [True]
    assert (sink.value("stdout"), sink.value("stderr")) == (b"before", b"e")


# -- error tables -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "text", "error", "retryable"),
    [
        (404, "No such container: x", corral.NotFoundError, False),
        (500, "no such container", corral.NotFoundError, False),
        (409, "container abc is not running", corral.ConflictError, False),
        (409, "removal of container abc is already in progress", corral.ConflictError, True),
        (500, "write /x: no space left on device", corral.ResourceLimitError, False),
        (500, "mkdir /x: read-only file system", corral.PathSecurityError, False),
        (500, "something broke", corral.InternalError, True),
        (400, "bad request", corral.InternalError, False),
    ],
)
def test_the_shared_error_table(status, text, error, retryable):
    e = error_for(status, text, backend="docker", sandbox_id="s1")
    assert type(e) is error and e.retryable is retryable
    assert (e.backend, e.sandbox_id) == ("docker", "s1") and text in e.message


def test_an_adapters_rules_come_first():
    from corral.backends import docker, podman

    e = error_for(500, "could not find an available address pool", backend="docker",
                  sandbox_id=None, rules=docker._RULES)  # fmt: skip
    assert isinstance(e, corral.ResourceLimitError) and e.retryable and "daemon.json" in e.message
    e = error_for(500, "value too large for defined data type", backend="podman",
                  sandbox_id=None, rules=podman._RULES)  # fmt: skip
    assert isinstance(e, corral.CapabilityError)


# -- the engines' spec mapping ------------------------------------------------------------


def _podman_engine(**settings: object):
    from corral.backends.podman import PodmanEngine, PodmanSettings

    # A remote URL: no host seccomp profile is looked up, and nothing is connected.
    return PodmanEngine(PodmanSettings(url="tcp://127.0.0.1:1", **settings))


def test_the_libpod_spec_carries_every_limit_and_ownership(tmp_path):
    p = _plan(user="1000:1000", mounts=(corral.Mount(str(tmp_path), "/src"),), limits={"cpus": 1})
    spec = _podman_engine().libpod_spec(p)
    assert spec["cap_drop"] == ["ALL"] and spec["no_new_privileges"] is True
    assert spec["resource_limits"]["memory"] == {"limit": p.memory, "swap": p.memory}
    assert spec["resource_limits"]["cpu"] == {"quota": 100_000, "period": 100_000}
    tmpfs = {m["destination"]: m["options"] for m in spec["mounts"] if m["type"] == "tmpfs"}
    assert "U" in tmpfs["/workspace"] and "noexec" in tmpfs["/tmp"]
    (bind,) = [m for m in spec["mounts"] if m["type"] == "bind"]
    assert bind["destination"] == "/src" and "ro" in bind["options"]
    assert spec["init"] is True and "seccomp_profile_path" not in spec


def test_userns_auto_makes_the_workspace_a_volume_unless_a_mount_is_the_workdir(tmp_path):
    engine = _podman_engine(userns="auto")
    spec = engine.libpod_spec(_plan())
    assert [v["Dest"] for v in spec["volumes"]] == ["/workspace"]
    mounted = engine.libpod_spec(_plan(mounts=(corral.Mount(str(tmp_path), "/workspace"),)))
    assert mounted["volumes"] == []


def test_a_remote_podman_cannot_read_a_seccomp_profile_file(tmp_path):
    (tmp_path / "p.json").write_text("{}")
    with pytest.raises(corral.ConfigError, match=r"sandbox\.security\.seccomp"):
        _podman_engine().libpod_spec(_plan(security={"seccomp": str(tmp_path / "p.json")}))


# -- the hand-written HTTP ----------------------------------------------------------------


def test_an_engine_message_is_read_from_json_or_text():
    assert message_of(json.dumps({"message": "no such exec"})) == "no such exec"
    assert message_of("plain words") == "plain words"


def test_a_refused_upgrade_carries_the_engines_status_and_message(tmp_path):
    path = str(tmp_path / "engine.sock")
    before = _sockets()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    body = json.dumps({"message": "no space left on device"}).encode()

    def answer() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        conn.close()

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        with pytest.raises(Refused) as refused:
            upgrade(path, "/exec/x/start", b"{}", timeout=5)
    finally:
        thread.join()
        server.close()
    assert (refused.value.status, refused.value.text) == (500, "no space left on device")
    assert _sockets() == before  # the refused stream's connection is closed


def _sockets() -> int:
    return sum(
        os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    )
