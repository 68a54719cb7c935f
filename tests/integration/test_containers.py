"""The container backends against real engines: one suite, run on every engine."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import corral


def _container(engine_client, sandbox: corral.Sandbox) -> dict:
    return engine_client.inspect_container(f"corral-{sandbox.id}")


# -- lifecycle ------------------------------------------------------------------------------


def test_full_lifecycle(box, engine, engine_client):
    sb = box(env={"GREETING": "hi"})
    assert sb.backend_name == engine
    labels = _container(engine_client, sb)["Config"]["Labels"]
    assert labels["corral.managed"] == "true"
    assert labels["corral.sandbox"] == sb.id
    assert labels["corral.backend"] == engine
    assert float(labels["corral.expires"]) > time.time()
    result = sb.exec(["sh", "-c", 'echo "$GREETING from $(pwd)"; echo oops >&2; exit 3'])
    assert (result.exit_code, result.stdout, result.stderr) == (
        3,
        b"hi from /workspace\n",
        b"oops\n",
    )
    assert [s.id for s in corral.list(backend=engine, settings=sb._settings)].count(sb.id) == 1
    sb.close()
    with pytest.raises(corral.SandboxClosedError):
        sb.exec(["true"])
    assert engine_client.containers(all=True, filters={"label": f"corral.sandbox={sb.id}"}) == []


def _child_environment(engine: str, settings: corral.Settings) -> dict[str, str]:
    """The engine's settings as CORRAL_* variables, for a second Python process."""
    env = {**os.environ, "CORRAL_DISABLE_PLUGIN_AUTOLOAD": "1"}
    for key, value in settings.backends[engine].items():
        env[f"CORRAL_BACKENDS__{engine.upper()}__{key.upper()}"] = str(value)
    return env


def test_attach_from_a_second_process(box, engine, engine_settings):
    sb = box()
    sb.write_file("/workspace/note", b"from the first process")
    code = textwrap.dedent(f"""
        import corral
        sb = corral.attach({sb.id!r}, backend={engine!r})
        sb.detach()
        print(sb.exec(["cat", "/workspace/note"]).text)
    """)
    env = _child_environment(engine, engine_settings)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "from the first process"


def test_exit_codes(box):
    sb = box()
    assert sb.exec(["true"]).exit_code == 0
    assert sb.exec(["sh", "-c", "exit 42"]).exit_code == 42
    assert sb.exec(["/no/such/cmd"]).exit_code == 127
    assert sb.exec(["/etc"]).exit_code == 126


def test_sandbox_removed_from_outside(box, engine_client):
    sb = box()
    engine_client.remove_container(f"corral-{sb.id}", force=True, v=True)
    with pytest.raises(corral.NotFoundError):
        sb.exec(["true"])
    sb.close()  # gone already: closing is still fine


def test_missing_image_with_pull_never(engine, engine_settings, state_dir):
    with pytest.raises(corral.NotFoundError, match="never"):
        corral.create("corral-test/no-such-image:1", backend=engine, settings=engine_settings)


def test_engine_not_running_is_a_clear_retryable_error(engine, settings_for):
    settings = settings_for(url="unix:///run/corral-test/absent.sock")
    with pytest.raises(corral.BackendUnavailableError) as info:
        corral.create(backend=engine, settings=settings)
    assert info.value.retryable
    assert "absent.sock" in str(info.value)
    assert "Traceback" not in str(info.value)


def test_lifetime_ends_a_sandbox_left_by_a_killed_program(engine, engine_settings, engine_client):
    code = textwrap.dedent(f"""
        import corral, time
        ids = [corral.create(backend={engine!r}, lifetime=3).id for _ in range(2)]
        print(" ".join(ids), flush=True)
        time.sleep(600)
    """)
    env = _child_environment(engine, engine_settings)
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    with child.stdout:
        ids = child.stdout.readline().split()
    assert len(ids) == 2
    child.send_signal(signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 30
    remaining = ids
    while remaining and time.monotonic() < deadline:
        time.sleep(0.5)
        remaining = [
            i
            for i in ids
            if engine_client.containers(all=True, filters={"label": f"corral.sandbox={i}"})
        ]
    assert remaining == [], "sandboxes outlived their lifetime"
    for i in ids:
        assert engine_client.volumes(filters={"label": f"corral.sandbox={i}"})["Volumes"] in (
            None,
            [],
        )


def test_gc_removes_what_a_killed_program_left(engine, engine_settings):
    sb = corral.create(backend=engine, settings=engine_settings)
    sb.detach()  # as if its program had died
    assert sb.id in corral.gc(backend=engine, settings=engine_settings, everything=True)
    assert sb.id not in [i.id for i in corral.list(backend=engine, settings=engine_settings)]


# -- secure defaults ----------------------------------------------------------------------------


def test_secure_defaults_from_inside(box):
    sb = box(memory="128MiB", pids=100)
    status = sb.exec(["cat", "/proc/self/status"]).text
    assert "CapEff:\t0000000000000000" in status
    assert "CapPrm:\t0000000000000000" in status
    assert "NoNewPrivs:\t1" in status
    assert "Seccomp:\t2" in status
    assert sb.exec(["id", "-u"]).text.strip() == "1000"
    devices = sb.exec(["cat", "/proc/net/dev"]).text
    assert {line.split(":")[0].strip() for line in devices.splitlines()[2:]} == {"lo"}
    memory = sb.exec(["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]).text.strip()
    assert int(memory) == 128 * 1024**2
    assert sb.exec(["cat", "/sys/fs/cgroup/pids/pids.max"]).text.strip() == "100"
    assert sb.exec(["touch", "/root-was-writable"]).exit_code != 0
    assert sb.exec(["sh", "-c", "ulimit -n"]).text.strip() == "1024"


def test_secure_defaults_by_inspect(box, engine_client):
    hc = _container(engine_client, box())["HostConfig"]
    assert hc["Privileged"] is False
    assert not hc["CapAdd"]
    assert hc["CapDrop"] == ["ALL"] or len(hc["CapDrop"]) >= 14  # Podman lists them
    assert "no-new-privileges" in hc["SecurityOpt"]
    assert not any("unconfined" in o for o in hc["SecurityOpt"])
    assert hc["ReadonlyRootfs"] is True
    assert hc["Memory"] > 0 and hc["MemorySwap"] == hc["Memory"]
    assert hc["PidsLimit"] > 0
    assert {u["Name"].lower().removeprefix("rlimit_") for u in hc["Ulimits"]} >= {"nofile", "nproc"}
    assert hc["Init"] is True
    assert not hc["Devices"]
    assert hc["LogConfig"]["Type"] == "none"
    for ns in ("PidMode", "IpcMode", "UTSMode", "UsernsMode"):
        assert hc.get(ns) != "host"
    assert hc["RestartPolicy"]["Name"] in ("", "no")


def test_unsafe_options_need_an_opt_in_and_are_recorded(box, engine_client):
    with pytest.raises(corral.PolicyError, match="cap_add"):
        box(security={"cap_add": ["NET_RAW"]})
    sb = box(security={"cap_add": ["NET_RAW"], "allow_unsafe": ["cap_add"]})
    assert sb.labels["corral.loosened"] == "cap_add"
    assert "CapBnd:\t0000000000002000" in sb.exec(["cat", "/proc/self/status"]).text  # NET_RAW only


def test_fork_bomb_is_contained(box):
    sb = box(pids=64)
    result = sb.exec(["sh", "-c", "bomb() { bomb | bomb & }; bomb; sleep 2"], timeout=10)
    assert b"fork" in result.stderr.lower() or result.timed_out
    assert sb.exec(["echo", "still here"], timeout=30).text == "still here\n"


def test_memory_bomb_is_reported_as_oom(box):
    sb = box(memory="32MiB")
    result = sb.exec(
        ["sh", "-c", "head -c 300000000 /dev/zero | tail -n 1 > /dev/null"], timeout=60
    )
    assert result.exit_code == 137
    assert result.oom_killed
    assert not result.timed_out
    # The evidence is per exec: the next command is not marked.
    assert not sb.exec(["true"]).oom_killed


def test_an_oom_kill_takes_an_exec_never_the_process_that_keeps_the_sandbox(box):
    # CI once saw a bomb's second OOM kill take `sleep` (the keep-alive) after its first
    # took the bomb, and the sandbox ended. Execs now rank first for the OOM killer.
    sb = box(memory="32MiB")
    script = "cat /proc/self/oom_score_adj /proc/1/oom_score_adj"
    script += "; for c in $(cat /proc/1/task/1/children); do cat /proc/$c/oom_score_adj; done"
    exec_adj, init_adj, *children_adj = sb.exec(["sh", "-c", script]).text.split()
    assert exec_adj == "500"
    assert init_adj == "0"
    assert children_adj == ["0"]


# -- exec ---------------------------------------------------------------------------------------


def test_timeout_kills_grandchildren_and_the_sandbox_stays_usable(box):
    sb = box()
    sb.write_file("/workspace/state", b"kept")
    script = "sleep 1001 & setsid sleep 1002 & (sleep 1003 &); echo ready; sleep 1004"
    started = time.monotonic()
    result = sb.exec(["sh", "-c", script], timeout=2)
    assert result.timed_out
    assert time.monotonic() - started < 15
    assert result.stdout == b"ready\n"
    processes = sb.exec(["ps", "-o", "args"]).text
    assert "sleep 100" not in processes
    assert sb.exec(["cat", "/workspace/state"]).text == "kept"


def test_background_children_do_not_outlive_their_exec(box):
    sb = box()
    assert sb.exec(["sh", "-c", "setsid sleep 1011 & echo done"]).exit_code == 0
    assert "sleep 1011" not in sb.exec(["ps", "-o", "args"]).text


def test_output_flood_is_capped(box):
    sb = box()
    result = sb.exec(
        ["sh", "-c", "head -c 30000000 /dev/zero; echo end >&2"], max_output="1MiB", timeout=60
    )
    assert result.truncated
    assert len(result.stdout) == 1024 * 1024
    assert result.stderr == b"end\n"
    assert result.exit_code == 0


def test_large_output_arrives_complete_and_unmixed(box):
    sb = box()
    script = "head -c 3000000 /dev/urandom | base64 > /workspace/o"
    script += "; cat /workspace/o; cat /workspace/o >&2"
    result = sb.exec(["sh", "-c", script], max_output="8MiB", timeout=60)
    assert result.stdout == result.stderr
    digest = sb.exec(["sha256sum", "/workspace/o"]).text.split()[0]
    assert hashlib.sha256(result.stdout).hexdigest() == digest


def test_binary_stdin_round_trip(box):
    sb = box()
    data = os.urandom(1536 * 1024)
    result = sb.exec(["sha256sum"], stdin=data, timeout=60)
    assert result.text.split()[0] == hashlib.sha256(data).hexdigest()


def test_non_utf8_output(box):
    result = box().exec(["printf", r"\377\376ok"])
    assert result.stdout == b"\xff\xfeok"
    assert result.text == "\ufffd\ufffdok"


def test_streaming(box):
    sb = box()
    events = list(sb.stream(["sh", "-c", "echo one; sleep 0.3; echo two"]))
    chunks = b"".join(e.data for e in events if isinstance(e, corral.OutputChunk))
    assert chunks == b"one\ntwo\n"
    assert isinstance(events[-1], corral.ExecResult) and events[-1].exit_code == 0


# -- mounts and files ---------------------------------------------------------------------------


def test_read_only_mount_is_read_only(box, mount_root):
    repo = mount_root / "repo"
    repo.mkdir()
    (repo / "a.txt").write_text("source\n")
    sb = box(mounts=[corral.Mount(str(repo), "/repo")])
    assert sb.exec(["cat", "/repo/a.txt"]).text == "source\n"
    for argv in (
        ["touch", "/repo/b"],
        ["rm", "-f", "/repo/a.txt"],
        ["mv", "/repo/a.txt", "/repo/c"],
    ):
        assert sb.exec(argv).exit_code != 0
    assert [p.name for p in repo.iterdir()] == ["a.txt"]


def test_read_write_mount(box, mount_root):
    out = mount_root / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    sb = box(mounts=[f"{out}:/out:rw"], security={"allow_unsafe": ["unbounded_rw_mounts"]})
    assert sb.exec(["sh", "-c", "echo made > /out/r"]).exit_code == 0
    assert (out / "r").read_text() == "made\n"


def _project(root: Path) -> Path:
    """A small project with a test suite of its own (shell: the test image has no Python)."""
    project = root / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "greet.sh").write_text('echo "hello, $1"\n')
    (project / "run-tests.sh").write_text(
        textwrap.dedent(
            """\
            set -e
            test "$(pwd)" = /src
            test "$(sh src/greet.sh corral)" = "hello, corral"
            echo "1 passed"
            """
        )
    )
    return project


@pytest.mark.parametrize("read_only", [True, False])
def test_a_project_mounted_at_the_workdir_runs_its_tests_there(
    box, engine, engine_settings, mount_root, read_only
):
    # Mounting a project and working in it is what users do most: the workspace is the
    # mount then (the engines refused two mounts at one target: "duplicate mount point").
    project = _project(mount_root)
    os.chmod(project, 0o777)
    unsafe = {} if read_only else {"security": {"allow_unsafe": ["unbounded_rw_mounts"]}}
    sb = box(
        mounts=[corral.Mount(str(project), "/src", read_only=read_only)], workdir="/src", **unsafe
    )
    result = sb.exec(["sh", "run-tests.sh"])
    assert (result.exit_code, result.text) == (0, "1 passed\n"), result.stderr
    wrote = sb.exec(["sh", "-c", "echo made > /src/out.txt"])
    assert (wrote.exit_code == 0) is (not read_only)
    assert (project / "out.txt").exists() is (not read_only)
    # Files in and out of that workdir, through the engine's archive API.
    assert sb.read_file("/src/src/greet.sh") == (project / "src" / "greet.sh").read_bytes()
    if read_only:
        with pytest.raises(corral.PathSecurityError, match="'/src' is read-only") as refused:
            sb.write_file("/src/in.txt", b"x")
        assert refused.value.fix and not (project / "in.txt").exists()
    else:
        sb.write_file("/src/in.txt", b"in\n")
        assert (project / "in.txt").read_text() == "in\n"
    assert (
        corral.run(
            ["sh", "run-tests.sh"],
            backend=engine,
            settings=engine_settings,
            mounts=[corral.Mount(str(project), "/src")],
            workdir="/src",
        ).text
        == "1 passed\n"
    )


def test_a_workdir_inside_a_mount_is_the_mounts_folder(box, mount_root):
    project = _project(mount_root)
    sb = box(mounts=[corral.Mount(str(project), "/src")], workdir="/src/src")
    assert sb.exec(["sh", "greet.sh", "you"]).text == "hello, you\n"


def test_what_the_image_or_engine_cannot_give_is_refused_by_field(box):
    # Each was an InternalError with the runtime's words (the property test found them).
    with pytest.raises(corral.ConfigError, match=r"sandbox\.user") as refused:
        box(user="nobody")  # the test image has root alone
    assert refused.value.fix
    with pytest.raises(corral.ConfigError, match=r"sandbox\.limits\.nofile"):
        box(nofile=1024**3)  # above any engine's own hard limit


def test_a_lone_uid_runs_in_its_own_group(box):
    sb = box(user="4242")
    assert sb.exec(["id", "-u"]).text + sb.exec(["id", "-g"]).text == "4242\n4242\n"
    assert sb.exec(["id", "-g"], user="4343").text == "4343\n"


def test_a_tmpfs_the_spec_asks_for_has_its_mode_and_is_not_hidden(box, mount_root):
    # runc gives a tmpfs the mode of the folder it covers (/tmp is 1777 in the image);
    # a tmpfs below a bind was dropped with the workspace.
    project = _project(mount_root)
    (project / "cache").mkdir()
    sb = box(
        mounts=[
            corral.Tmpfs("/tmp", mode=0o750),
            corral.Mount(str(project), "/src"),
            corral.Tmpfs("/src/cache", size="1MiB"),
        ]
    )
    assert sb.exec(["stat", "-c", "%a", "/tmp"]).text == "750\n"
    assert "/src/cache" in sb.exec(["sh", "-c", "grep ' /src/cache tmpfs' /proc/mounts"]).text


def test_corral_run_gives_a_requested_tmpfs_its_mode(engine, engine_settings):
    # The command is the container's own process there: the mode is set before it starts.
    result = corral.run(
        ["stat", "-c", "%a", "/tmp"],
        backend=engine,
        settings=engine_settings,
        mounts=[corral.Tmpfs("/tmp", mode=0o750)],
    )
    assert (result.exit_code, result.text) == (0, "750\n"), result.stderr


def test_engine_socket_is_never_mounted(box, engine_url):
    socket_path = engine_url.removeprefix("unix://")
    with pytest.raises(corral.PolicyError):
        box(mounts=[corral.Mount(socket_path, "/engine.sock")])


def test_files_round_trip(box, tmp_path):
    sb = box()
    data = os.urandom(1024 * 1024)
    sb.write_file("/workspace/blob", data)
    assert sb.read_file("/workspace/blob") == data
    sb.write_file("/tmp/t", "tmp works")
    assert sb.exec(["cat", "/tmp/t"]).text == "tmp works"
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("F")
    sb.upload(src, "/workspace")
    assert sb.exec(["cat", "/workspace/src/d/f.txt"]).text == "F"
    assert sb.exec(["sh", "-c", "echo more >> /workspace/src/d/f.txt"]).exit_code == 0
    got = sb.download("/workspace/src", tmp_path / "back")
    assert (got / "d" / "f.txt").read_text() == "Fmore\n"


def test_file_api_refuses_traversal_and_symlink_escapes(box, tmp_path):
    sb = box()
    for bad in ("/workspace/../../etc/passwd", "relative", "/workspace/a\0b"):
        with pytest.raises(corral.PathSecurityError):
            sb.write_file(bad, b"x")
    sb.exec(
        [
            "sh",
            "-c",
            "mkdir /workspace/out && ln -s /etc /workspace/out/etc && ln -s / /workspace/root",
        ]
    )
    with pytest.raises(corral.ArchiveError):
        sb.download("/workspace/out", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(corral.SandboxError):
        sb.read_file("/workspace/root")  # a link, never followed on the host
    with pytest.raises(corral.PathSecurityError):
        sb.write_file("/etc/passwd", b"x")  # the read-only root


def test_usage_is_fast_enough_to_poll_and_plausible(box):
    sb = box(memory="64MiB")
    sb.exec(["sh", "-c", "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done"])
    usage = sb.usage()
    assert usage.memory_limit_bytes == 64 * 1024**2
    assert usage.cpu_seconds is not None and usage.cpu_seconds > 0
    assert usage.memory_bytes is not None and 0 < usage.memory_bytes < 64 * 1024**2
    assert usage.pids is not None and usage.pids >= 1


def test_healthcheck(box):
    sb = box(
        healthcheck={"test": ["test", "-e", "/workspace/ready"], "interval": "1s", "timeout": "1s"}
    )
    sb.write_file("/workspace/ready", b"")
    deadline = time.monotonic() + 20
    while sb.health().status != "healthy" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert sb.health().status == "healthy"


def test_unwritable_host_folder_stays_untouched(box, mount_root: Path):
    canary = mount_root / "canary"
    canary.write_text("same")
    sb = box(mounts=[corral.Mount(str(mount_root), "/host")])
    sb.exec(["sh", "-c", "echo changed > /host/canary; rm -f /host/canary"])
    assert canary.read_text() == "same"


def test_shell_metacharacters_stay_arguments(box):
    args = ["$(touch /tmp/pwned)", "`id`", "; rm -rf ~", "a|b>c", "*", "$HOME"]
    sb = box()
    assert sb.exec(["echo", *args]).text == " ".join(args) + "\n"
    assert sb.exec(["test", "-e", "/tmp/pwned"]).exit_code == 1


def test_init_reaps_zombies(box):
    sb = box()
    spawn = 'for i in 1 2 3 4 5; do sh -c "sh -c \\"sleep 0.1\\" &" & wait; done'
    assert sb.exec(["sh", "-c", spawn]).exit_code == 0
    time.sleep(1)
    states = sb.exec(["sh", "-c", "cat /proc/[0-9]*/stat"]).text
    assert ") S " in states  # it read the process table
    assert ") Z " not in states


def test_tmp_is_small_and_not_executable(box):
    sb = box()
    fill = sb.exec(["sh", "-c", "head -c 100000000 /dev/zero > /tmp/big"])
    assert fill.exit_code != 0  # the 64 MiB cap, not the host's memory, stopped it
    assert int(sb.exec(["stat", "-c", "%s", "/tmp/big"]).text) <= 64 * 1024**2
    copy_and_run = "cp /bin/busybox {0}/true && {0}/true"
    assert sb.exec(["sh", "-c", copy_and_run.format("/tmp")]).exit_code != 0  # noexec
    assert sb.exec(["sh", "-c", copy_and_run.format("/workspace")]).exit_code == 0


def test_no_host_devices_or_namespaces(box):
    sb = box()
    devices = set(sb.exec(["ls", "/dev"]).text.split())
    assert not devices & {"sda", "kmsg", "mem", "vda", "nvme0"}
    assert devices >= {"null", "zero", "urandom"}
    assert sb.exec(["hostname"]).text.strip() != os.uname().nodename
    init = sb.exec(["cat", "/proc/1/cmdline"]).text
    assert "docker-init" in init or "podman-init" in init  # an init that reaps, as PID 1


def test_named_volume_outlives_a_sandbox(box, engine_client):
    name = f"corral-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        first = box(mounts=[corral.Volume(name, "/data")])
        # A new named volume belongs to root on Docker and to the container's user on
        # Podman; an exec may run as another user where needed.
        write = ["sh", "-c", "echo kept > /data/f"]
        assert first.exec(write).exit_code == 0 or first.exec(write, user="0").exit_code == 0
        first.close()
        second = box(
            mounts=[{"type": "volume", "name": name, "target": "/data", "read_only": True}]
        )
        assert second.exec(["cat", "/data/f"]).text == "kept\n"
        assert second.exec(["touch", "/data/g"]).exit_code != 0
        second.close()
    finally:
        engine_client.remove_volume(name, force=True)


def test_pause_and_resume(box):
    sb = box()
    sb.backend.pause(sb.id)
    sb.backend.resume(sb.id)
    assert sb.exec(["echo", "awake"]).text == "awake\n"


def test_command_line_on_the_engine(engine, engine_settings, tmp_path):
    env = _child_environment(engine, engine_settings)
    env["CORRAL_BACKEND"] = engine

    def corral_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "corral", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )

    done = corral_cli("run", "--", "sh", "-c", "echo hello; exit 7")
    assert (done.returncode, done.stdout) == (7, "hello\n")
    assert corral_cli("run", "--timeout", "1", "--", "sleep", "30").returncode == 124
    kept = corral_cli("run", "--keep", "--", "true")
    sandbox_id = kept.stderr.split()[-1]
    listed = json.loads(corral_cli("ls", "--json").stdout)
    assert sandbox_id in [s["id"] for s in listed]
    assert corral_cli("exec", sandbox_id, "--", "echo", "again").stdout == "again\n"
    assert json.loads(corral_cli("stats", sandbox_id, "--json").stdout)["memory_limit_bytes"] > 0
    assert corral_cli("rm", sandbox_id).returncode == 0
    assert sandbox_id not in [s["id"] for s in json.loads(corral_cli("ls", "--json").stdout)]


def test_kernel_paths_stay_masked_and_the_spec_can_mask_more(box):
    sb = box(security={"masked_paths": ["/etc/passwd"]})
    assert sb.exec(["cat", "/proc/keys"]).stdout == b""  # a default masked path
    assert sb.exec(["cat", "/etc/passwd"]).stdout == b""  # one the spec added
    assert sb.exec(["cat", "/proc/self/status"]).stdout  # a positive control


def test_reading_a_symlink_is_refused_on_every_engine(box):
    sb = box()
    sb.exec(["ln", "-s", "/etc/passwd", "/workspace/link"])
    with pytest.raises(corral.PathSecurityError):
        sb.read_file("/workspace/link")
    sb.write_file("/workspace/plain", b"ok")
    assert sb.read_file("/workspace/plain") == b"ok"  # a positive control
