"""THREATS.md B8, the security policy verified by inspect and by probes inside (T63-T72).

The busybox image has no interpreter, so the probes that need exact syscalls are a
small static C program, compiled once per session and copied into each sandbox: it
prints one line per call, ``name errno`` or ``name ok``, so that every refusal is
checked by its errno and every harmless twin by its success.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import socketserver
import subprocess
import threading
from pathlib import Path

import pytest
from cases import ENGINES_ONLY, unavailable

import corral
from corral.core.backend import Capability
from corral.core.settings import load_settings

# The capabilities both engines grant unless told otherwise (moby oci/caps/defaults.go).
ENGINE_DEFAULT_CAPS = {
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
    "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
}  # fmt: skip
# What a refused call may answer: not permitted, or not there at all (seccomp's ENOSYS,
# or ENOSPC from a user-namespace count of zero). Anything else reached the kernel's
# argument checks, so it was allowed.
REFUSED = {"EPERM", "EACCES", "ENOSYS", "ENOSPC"}

PROBE_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>

static void report(const char *name, long result) {
    printf("%s %s\n", name, result == -1 ? strerrorname_np(errno) : "ok");
}

static void status(const char *who, const char *path) {
    char line[256];
    FILE *f = fopen(path, "r");
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "Cap", 3) || !strncmp(line, "NoNewPrivs", 10) ||
            !strncmp(line, "Seccomp:", 8))
            printf("%s %s", who, line);
    if (f) fclose(f);
}

static void *in_thread(void *unused) {
    status("thread", "/proc/thread-self/status");
    return unused;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "ids")) {
        printf("%d %d\n", getuid(), geteuid());
    } else if (!strcmp(mode, "threads")) {
        pthread_t t;
        status("main", "/proc/self/status");
        pthread_create(&t, NULL, in_thread, NULL);
        pthread_join(t, NULL);
    } else if (!strcmp(mode, "caps")) {  /* T66: what capabilities guard */
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        char owned[64];  /* /dev/shm: the one folder every user may create in */
        snprintf(owned, sizeof owned, "/dev/shm/owned-%d", getuid());
        close(open(owned, O_CREAT | O_WRONLY, 0600));
        report("mount", mount("none", "/tmp", "tmpfs", 0, NULL));
        report("mknod", mknod("/tmp/sda", S_IFBLK | 0600, makedev(8, 0)));
        report("clock_settime", clock_settime(CLOCK_REALTIME, &now));
        report("raw_socket", socket(AF_INET, SOCK_RAW, IPPROTO_ICMP));
        report("chown_other", chown(owned, 1234, 1234));
        report("sethostname", sethostname("x", 1));
        report("init_module", syscall(SYS_init_module, NULL, 0, ""));
        report("unshare_mount", unshare(CLONE_NEWNS));
        /* the twins: nothing privileged */
        report("getpid", getpid() > 0 ? 0 : -1);
        report("tcp_socket", socket(AF_INET, SOCK_STREAM, 0));
        report("chown_self", chown(owned, getuid(), getgid()));
    } else if (!strcmp(mode, "seccomp")) {  /* T67: what the filter refuses */
        report("keyctl", syscall(SYS_keyctl, 0, -3, 0));
        report("add_key", syscall(SYS_add_key, "user", "corral", "x", 1, -3));
        report("bpf", syscall(SYS_bpf, 5, NULL, 0));
        report("userfaultfd", syscall(SYS_userfaultfd, 0));
        report("open_by_handle_at", syscall(SYS_open_by_handle_at, AT_FDCWD, NULL, 0));
        report("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
        report("unshare_user", unshare(CLONE_NEWUSER));
        report("getpid", getpid() > 0 ? 0 : -1);
    }
    return 0;
}
"""


@pytest.fixture(scope="session")
def probe_binary(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("gcc") is None:
        unavailable("gcc is not installed (it builds the in-sandbox probe)")
    folder = tmp_path_factory.mktemp("probe")
    (folder / "probe.c").write_text(PROBE_SOURCE)
    subprocess.run(
        ["gcc", "-static", "-pthread", "-O1", "-o", "probe", "probe.c"],
        cwd=folder,
        check=True,
        timeout=300,
    )
    return (folder / "probe").read_bytes()


def with_probe(sb: corral.Sandbox, probe: bytes) -> str:
    sb.write_file("/workspace/probe", probe, mode=0o755)
    return "/workspace/probe"


def probe_lines(sb: corral.Sandbox, probe: str, mode: str, user: str | None = None) -> dict:
    done = sb.exec([probe, mode], user=user)
    assert done.exit_code == 0, (done.exit_code, done.stderr)  # never killed (no SIGSYS)
    return dict(line.split(" ", 1) for line in done.text.splitlines())


def sh(sb: corral.Sandbox, script: str, **options: object) -> corral.ExecResult:
    return sb.exec(["sh", "-c", script], **options)  # type: ignore[arg-type]


def inspect(raw_client_of, backend: str, sb: corral.Sandbox) -> dict:
    client = raw_client_of(backend)
    try:
        return client.inspect_container(f"corral-{sb.id}")
    finally:
        client.close()


# -- T63: inspect -------------------------------------------------------------------------


@ENGINES_ONLY
@pytest.mark.through_ray
def test_t63_host_config_matches_the_policy(sandbox, kind, raw_client_of, mount_root):
    """docker-bench's §5 predicates, on a sandbox with a read-only repo and a CPU cap.

    (tests/integration/test_containers.py checks the defaults alone; this is the whole
    list, with the mounts and engine security modules.)"""
    repo = mount_root / "repo"
    repo.mkdir()
    sb = sandbox(cpus=1, mounts=[corral.Mount(str(repo), "/repo")])
    info = inspect(raw_client_of, kind, sb)
    hc = info["HostConfig"]
    assert hc["Privileged"] is False
    dropped = {c.upper().removeprefix("CAP_") for c in hc["CapDrop"]}
    assert dropped == {"ALL"} or dropped >= ENGINE_DEFAULT_CAPS  # Podman lists them
    assert not hc["CapAdd"]
    options = hc["SecurityOpt"] or []
    assert any(o.startswith("no-new-privileges") for o in options)
    assert not [o for o in options if "unconfined" in o or o == "label=disable"]
    client = raw_client_of(kind)
    try:
        modules = " ".join(client.info().get("SecurityOptions") or [])
    finally:
        client.close()
    if "apparmor" in modules:
        assert info.get("AppArmorProfile") not in (None, "", "unconfined")
    if "selinux" in modules:
        assert info.get("ProcessLabel")
    assert hc["ReadonlyRootfs"] is True
    assert hc["Memory"] > 0 and hc["MemorySwap"] == hc["Memory"]
    assert hc["PidsLimit"] > 0
    assert hc.get("NanoCpus") == 10**9 or (hc.get("CpuQuota") or 0) > 0
    limits = {u["Name"].lower().removeprefix("rlimit_"): u for u in hc["Ulimits"] or []}
    assert limits["nofile"]["Hard"] <= 1024 and limits["core"]["Hard"] == 0
    assert hc["NetworkMode"] in ("none", "", "default") or info["Config"].get("NetworkDisabled")
    for ns in ("PidMode", "IpcMode", "UTSMode", "UsernsMode"):
        assert hc.get(ns) != "host", ns
    assert not hc["Devices"]
    assert hc["Init"] is True
    assert hc["RestartPolicy"]["Name"] in ("", "no")
    assert hc["LogConfig"]["Type"] in ("none", "k8s-file", "local") and (
        hc["LogConfig"]["Type"] == "none" or hc["LogConfig"].get("Config")
    )
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    assert mounts["/repo"]["RW"] is False
    assert not [m for m in info["Mounts"] if m.get("Source", "").endswith(".sock")]
    assert not hc.get("PortBindings") and not hc.get("PublishAllPorts")
    assert sb.exec(["echo", "ok"]).text == "ok\n"  # the twin: the policy leaves it working


# -- T64, T65: identity and privileges ------------------------------------------------------


@pytest.mark.through_ray
def test_t64_identity_and_privileges_in_every_process_and_thread(sandbox, kind, probe_binary):
    sb = sandbox()
    probe = with_probe(sb, probe_binary)
    has_seccomp = bool(sb.backend.capabilities() & Capability.SECCOMP)
    assert sb.exec(["id", "-u"]).text.strip() == "1000"
    groups = sb.exec(["id", "-G"]).text.split()
    assert "0" not in groups
    # PID 1 (the engine's init, or bwrap's), an exec, a thread of an exec.
    statuses = {
        "pid 1": sb.exec(["cat", "/proc/1/status"]).text,
        "exec": sb.exec(["cat", "/proc/self/status"]).text,
        "thread": "\n".join(
            line.removeprefix("thread ")
            for line in sb.exec([probe, "threads"]).text.splitlines()
            if line.startswith("thread ")
        ),
    }
    for where, text in statuses.items():
        fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
        for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb", "CapBnd"):
            assert int(fields[cap], 16) == 0, (where, cap, fields[cap])
        assert fields["NoNewPrivs"] == "1", where
        if has_seccomp:
            assert fields["Seccomp"] == "2", where
    if not has_seccomp:  # the local backend: a reduced guarantee, declared as such
        assert kind == "local"
    # An exec with another user gets that user's groups and never more.
    other = sb.exec(["id", "-G"], user="1000:2000").text.split()
    assert other == ["2000"]
    assert sb.exec(["echo", "ok"]).text == "ok\n"


@ENGINES_ONLY
@pytest.mark.through_ray
def test_t65_a_setuid_root_binary_cannot_raise_the_euid(sandbox, probe_binary):
    """On the container's own root (no nosuid there), only no-new-privileges stops it."""
    sb = sandbox(security={"read_only_root": False, "allow_unsafe": ["read_only_root"]})
    probe = with_probe(sb, probe_binary)
    made = sh(sb, f"cp {probe} /bin/suid-probe && chmod 4755 /bin/suid-probe", user="0")
    assert made.exit_code == 0, made.stderr
    assert sb.exec(["stat", "-c", "%a %u", "/bin/suid-probe"]).text.split() == ["4755", "0"]
    assert sb.exec(["/bin/suid-probe", "ids"]).text == "1000 1000\n"  # euid stays 1000
    assert sb.exec([probe, "ids"]).text == "1000 1000\n"  # the twin: the program runs
    assert sb.exec(["/bin/suid-probe", "ids"], user="0").text == "0 0\n"  # root stays root


@pytest.mark.through_ray
def test_t65_a_setuid_root_binary_mounted_in_cannot_raise_the_euid(
    sandbox, probe_binary, mount_root
):
    if os.geteuid() != 0:
        unavailable("making a setuid-root file needs root")
    tools = mount_root / "tools"
    tools.mkdir()
    (tools / "suid-probe").write_bytes(probe_binary)
    os.chmod(tools / "suid-probe", 0o4755)
    sb = sandbox(mounts=[corral.Mount(str(tools), "/tools")])
    assert sb.exec(["stat", "-c", "%a", "/tools/suid-probe"]).text.strip() == "4755"
    assert sb.exec(["/tools/suid-probe", "ids"]).text == "1000 1000\n"


# -- T66, T67: what capabilities and seccomp refuse ---------------------------------------


@pytest.mark.through_ray
@pytest.mark.parametrize("user", [None, "0:0"], ids=["sandbox-user", "root-without-caps"])
def test_t66_capability_guarded_operations_are_denied(sandbox, probe_binary, user):
    sb = sandbox()
    probe = with_probe(sb, probe_binary)
    got = probe_lines(sb, probe, "caps", user)
    denied = {
        "mount", "mknod", "clock_settime", "raw_socket", "chown_other", "sethostname",
        "init_module", "unshare_mount",
    }  # fmt: skip
    for name in denied:
        # EINVAL for chown: the uid does not even exist in the sandbox's user namespace.
        allowed = REFUSED | ({"EINVAL"} if name == "chown_other" else set())
        assert got[name] in allowed, (name, got[name])
    for name in ("getpid", "tcp_socket", "chown_self"):
        assert got[name] == "ok", (name, got[name])
    # The same from the tools a user would reach for.
    for script in (
        "busybox ip link add d0 type dummy",
        "busybox ping -c1 -W1 127.0.0.1",
        "busybox mknod /tmp/sdb b 8 16",
    ):
        assert sh(sb, script, user=user).exit_code != 0, script
    assert sh(sb, "busybox date +%Y", user=user).exit_code == 0  # reading the clock works


@ENGINES_ONLY
@pytest.mark.through_ray
@pytest.mark.parametrize("user", [None, "0:0"], ids=["sandbox-user", "root-without-caps"])
def test_t67_seccomp_refuses_dangerous_syscalls(sandbox, probe_binary, user):
    sb = sandbox()
    probe = with_probe(sb, probe_binary)
    got = probe_lines(sb, probe, "seccomp", user)  # exit 0: refused, not killed
    for name in ("add_key", "bpf", "userfaultfd", "open_by_handle_at", "kexec_load"):
        assert got[name] in REFUSED, (name, got[name])
    assert got["getpid"] == "ok"


@ENGINES_ONLY
@pytest.mark.through_ray
def test_t67_no_keyrings_and_no_new_user_namespaces(sandbox, probe_binary):
    # Docker's default profile refuses them; on Podman, corral's own (Podman's default
    # without what nests containers) does.
    sb = sandbox()
    got = probe_lines(sb, with_probe(sb, probe_binary), "seccomp")
    assert got["getpid"] == "ok"
    assert (got["keyctl"], got["unshare_user"]) in {(a, b) for a in REFUSED for b in REFUSED}
    assert sh(sb, "unshare -Ur true").exit_code != 0


# -- T69, T70: the filesystem and the namespaces ------------------------------------------


@ENGINES_ONLY
@pytest.mark.through_ray
def test_t69_root_is_read_only_and_tmp_is_small_and_inert(sandbox):
    sb = sandbox()
    for path in ("/x", "/bin/x", "/etc/x"):
        done = sb.exec(["touch", path])
        assert done.exit_code != 0 and b"Read-only file system" in done.stderr, path
    assert sh(sb, "echo ok > /tmp/x && cat /tmp/x").text == "ok\n"  # the twin
    options = {
        line.split()[1]: set(line.split()[3].split(","))
        for line in sb.exec(["cat", "/proc/mounts"]).text.splitlines()
    }
    assert options["/tmp"] >= {"rw", "nosuid", "nodev", "noexec"}
    assert any(o.startswith("size=") for o in options["/tmp"])
    assert options["/"] >= {"ro"}
    # (busybox picks its applet by its own name: the copy is named "true")
    ran = sh(sb, "cp /bin/busybox /tmp/true && /tmp/true")
    assert ran.exit_code != 0 and b"Permission denied" in ran.stderr
    assert sh(sb, "cp /bin/busybox /workspace/true && /workspace/true").exit_code == 0


# Device nodes a sandbox may have: the engines' defaults and bwrap's --dev
# (core is bwrap's link to /proc/kcore, which needs CAP_SYS_RAWIO to read).
DEVICES = {
    "null", "zero", "full", "random", "urandom", "tty", "console", "pts", "shm", "mqueue",
    "ptmx", "fd", "stdin", "stdout", "stderr", "core",
}  # fmt: skip


@pytest.mark.through_ray
def test_t70_no_host_processes_hostname_ipc_or_devices(sandbox, kind):
    sb = sandbox()
    processes = sh(sb, "ls /proc | grep -c '^[0-9]'").text.strip()
    assert int(processes) <= 8  # init, PID 1's sleep, this shell, ls, grep: not the host's
    assert int(processes) < len([p for p in os.listdir("/proc") if p.isdigit()])
    assert sb.exec(["hostname"]).text.strip() != os.uname().nodename
    assert set(sb.exec(["ls", "/dev"]).text.split()) <= DEVICES
    assert sb.exec(["cat", "/dev/core"]).exit_code != 0 or kind != "local"
    init = sb.exec(["cat", "/proc/1/cmdline"]).stdout.split(b"\0")[0]
    assert init.endswith((b"docker-init", b"podman-init", b"bwrap")), init
    # IPC: a host segment is invisible inside.
    shm = sb.exec(["cat", "/proc/sysvipc/shm"]).text.splitlines()
    assert len(shm) == 1  # the header only
    assert sb.exec(["cat", "/dev/null"]).exit_code == 0  # the twin


# -- T71: the runc overwrite ---------------------------------------------------------------


# Tries, for 6 seconds, to write into the binary of every process it can see (runc's,
# while it execs into the container, on a vulnerable runtime).
EXE_WRITER = (
    "bb=/bin/busybox; end=$(( $($bb date +%s) + 6 )); while [ $($bb date +%s) -lt $end ]; "
    'do for e in /proc/[0-9]*/exe; do $bb sh -c "echo x > $e" 2>/dev/null; done; done'
)


def _runtime_binaries() -> list[Path]:
    found = {shutil.which(name) for name in ("runc", "crun", "docker-runc")} - {None}
    return [Path(p).resolve() for p in found]  # type: ignore[arg-type]


@ENGINES_ONLY
@pytest.mark.destructive
def test_t71_overwriting_sh_with_proc_self_exe_never_reaches_runc(sandbox):
    """CVE-2019-5736: /bin/sh becomes ``#!/proc/self/exe`` and a writer keeps trying every
    /proc/*/exe while corral's next exec runs sh. Even as root inside (the worst case:
    corral's default user is 1000, and its root is read-only), runc stays intact."""
    runtimes = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in _runtime_binaries()}
    assert runtimes, "no runc on the host to check"
    sb = sandbox(security={"read_only_root": False, "allow_unsafe": ["read_only_root"]})
    assert sb.exec(["id", "-u"]).text.strip() == "1000"  # the precondition is absent by default
    assert sh(sb, "echo '#!/proc/self/exe' > /bin/sh").exit_code != 0  # not root's file
    planted = sb.exec(
        ["/bin/busybox", "sh", "-c",
         "rm /bin/sh && printf '#!/proc/self/exe\\n' > /bin/sh && chmod 755 /bin/sh"],
        user="0",
    )  # fmt: skip
    assert planted.exit_code == 0, planted.stderr
    writer = threading.Thread(
        target=sb.exec,
        args=(["/bin/busybox", "sh", "-c", EXE_WRITER],),
        kwargs={"user": "0", "timeout": 30},
    )
    writer.start()
    try:
        for _ in range(5):
            sb.exec(["sh", "-c", "true"], timeout=10)  # runs the trojan /bin/sh
            sb.exec(["sh"], user="0", timeout=10)
    finally:
        writer.join()
    for path, digest in runtimes.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, path
    assert sb.exec(["/bin/busybox", "echo", "ok"]).text == "ok\n"  # the twin: still usable


# -- T72: the engine and runtime version gate ---------------------------------------------


class _OldEngine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """An engine API on a unix socket that reports vulnerable versions, and has nothing."""

    daemon_threads = True


def _old_engine_handler(version: dict) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path.endswith("/_ping"):
                self._answer(200, b"OK", "text/plain")
            elif path.endswith("/version"):
                self._answer(200, json.dumps(version).encode())
            elif path.endswith("/info"):
                self._answer(200, json.dumps({"SecurityOptions": [], "host": {}}).encode())
            else:
                self._answer(404, b'{"message": "no such thing"}')

        do_POST = do_DELETE = do_GET

        def _answer(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

        def address_string(self) -> str:
            return "unix"

    return Handler


OLD_ENGINES = {
    "docker": (
        {"Version": "19.03.0", "ApiVersion": "1.40", "MinAPIVersion": "1.12",
         "Components": [{"Name": "runc", "Version": "1.1.11"}]},
        "CVE-2019-14271",
    ),
    "podman": ({"Version": "1.5.0", "ApiVersion": "1.40"}, "CVE-2019-18466"),
}  # fmt: skip


@pytest.mark.parametrize("engine_name", sorted(OLD_ENGINES))
def test_t72_a_vulnerable_engine_is_refused_naming_the_cve(engine_name, shared_tmp, state_dir):
    version, cves = OLD_ENGINES[engine_name]
    path = shared_tmp / "old-engine.sock"
    server = _OldEngine(str(path), _old_engine_handler(version))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        settings = load_settings(
            {"backends": {engine_name: {"url": f"unix://{path}", "pull": "never"}}},
            cwd=state_dir,
            environ={},
        )
        with pytest.raises(corral.SandboxError, match=cves):
            corral.create(backend=engine_name, settings=settings, image="busybox")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
