"""THREATS.md B7, mounts (T57-T61), on every backend.

The read-only cases mount a real tmpfs inside the host folder before binding it (the
engines' read-only bind is read-only at its top only), so the tests need root.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cases import ENGINES_ONLY, RW_OPT_IN, unavailable

import corral


def sh(sb: corral.Sandbox, script: str, **options: object) -> corral.ExecResult:
    return sb.exec(["sh", "-c", script], **options)  # type: ignore[arg-type]


def tree_digest(root: Path) -> str:
    """Names, kinds, modes and contents of everything under ``root``, links unfollowed."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(folder, name)
            st = path.lstat()
            digest.update(f"{path.relative_to(root)}\0{st.st_mode:o}\0".encode())
            if path.is_file() and not path.is_symlink():
                digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def repo_with_submount(mount_root: Path) -> Iterator[Path]:
    """A world-writable repository with a tmpfs mounted at ``repo/cache`` on the host:
    only the mount's read-only state can stop a write, never the file modes."""
    if os.geteuid() != 0:
        unavailable("mounting a tmpfs inside the repository needs root")
    repo = mount_root / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "code.py").write_text("print(1)\n")
    (repo / "cache").mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0777", "corral-test", str(repo / "cache")],
        check=True,
    )
    try:
        (repo / "cache" / "built.o").write_text("object\n")
        for path in (repo, repo / "src", repo / "src" / "code.py", repo / "cache" / "built.o"):
            os.chmod(path, 0o777 if path.is_dir() else 0o666)
        yield repo
    finally:
        subprocess.run(["umount", "-l", str(repo / "cache")], check=False)


# Writes a read-only repository must refuse, on the repository and on its submount.
WRITES = [
    "touch {d}/new",
    "rm {d}/{f}",
    "chmod 700 {d}/{f}",
    "mv {d}/{f} {d}/moved",
    "ln -s /etc {d}/link",
    "echo more >> {d}/{f}",
    "mkdir {d}/folder",
    "mount -o remount,rw {d}",
]


@pytest.mark.through_ray
@pytest.mark.parametrize("user", [None, "0:0"], ids=["sandbox-user", "root-without-caps"])
def test_t57_read_only_repo_is_read_only_through_its_submounts(sandbox, repo_with_submount, user):
    repo = repo_with_submount
    before = tree_digest(repo)
    sb = sandbox(mounts=[corral.Mount(str(repo), "/repo")])
    # The twin: everything reads.
    assert sb.exec(["cat", "/repo/src/code.py", "/repo/cache/built.o"]).text == (
        "print(1)\nobject\n"
    )
    for folder, name in (("/repo/src", "code.py"), ("/repo/cache", "built.o"), ("/repo", "src")):
        for write in WRITES:
            script = write.format(d=folder, f=name)
            done = sh(sb, script, user=user)
            assert done.exit_code != 0, f"{script!r} succeeded on a read-only mount"
    for path in ("/repo/x", "/repo/cache/x", "/repo/src/code.py"):
        with pytest.raises(corral.PathSecurityError):
            sb.write_file(path, b"through the file API")
    assert tree_digest(repo) == before
    sb.write_file("/workspace/ok", b"ok")  # the sandbox itself still writes where it may
    assert sh(sb, "echo w >> /workspace/ok && cat /workspace/ok").text == "okw\n"


@pytest.mark.through_ray
def test_t57_a_read_write_mount_stays_writable_below_too(sandbox, repo_with_submount):
    """The read-only binds over submounts are only for read-only mounts."""
    sb = sandbox(
        mounts=[corral.Mount(str(repo_with_submount), "/repo", read_only=False)],
        security=RW_OPT_IN,
    )
    assert sh(sb, "echo made > /repo/cache/new && echo made > /repo/src/new").exit_code == 0
    assert (repo_with_submount / "cache" / "new").read_text() == "made\n"


# -- T58, T59: what the sandbox leaves in a read-write mount --------------------------------


@pytest.fixture
def writable_repo(mount_root: Path) -> Path:
    repo = mount_root / "work"
    (repo / ".git" / "hooks").mkdir(parents=True)
    (repo / ".git" / "config").write_text("[core]\n\tbare = false\n")
    (repo / "README").write_text("readme\n")
    for folder, _, files in os.walk(repo):
        os.chmod(folder, 0o777)
        for name in files:
            os.chmod(Path(folder, name), 0o666)
    return repo


@pytest.mark.through_ray
def test_t58_auto_exec_files_left_in_the_repo_run_nothing_on_the_host(
    sandbox, writable_repo, shared_tmp, backend
):
    """corral runs no host-side git and opens no editor: hooks, fsmonitor and IDE tasks
    the sandbox plants stay inert through every host-side call it makes."""
    marker = shared_tmp / "hook-ran"
    payload = f"#!/bin/sh\ntouch {marker}\n"
    sb = sandbox(
        mounts=[corral.Mount(str(writable_repo), "/repo", read_only=False)],
        security=RW_OPT_IN,
    )
    planted = sh(
        sb,
        "cd /repo && for h in post-checkout pre-commit post-merge fsmonitor-watchman; do "
        f"printf '{payload}' > .git/hooks/$h && chmod 755 .git/hooks/$h; done && "
        f"printf '[core]\\n\\thooksPath = /repo/.git/hooks\\n\\tfsmonitor = /repo/.git/hooks/"
        "fsmonitor-watchman\\n' >> .git/config && mkdir .vscode .devcontainer && "
        f'echo \'{{"tasks": [{{"command": "touch {marker}", "runOptions": '
        '{"runOn": "folderOpen"}}]}\' > .vscode/tasks.json && '
        f'echo \'{{"postCreateCommand": "touch {marker}"}}\' > .devcontainer/devcontainer.json',
    )
    assert planted.exit_code == 0, planted.stderr
    assert b"hooksPath" in sb.read_file("/repo/.git/config")
    got = sb.download("/repo", shared_tmp / "copy")  # the twin: all of it comes back
    assert (got / ".vscode" / "tasks.json").is_file()
    assert os.access(got / ".git" / "hooks" / "post-checkout", os.X_OK)
    sb.close()
    assert not marker.exists(), f"a planted file ran on the host ({backend})"
    assert (writable_repo / ".git" / "hooks" / "post-checkout").is_file()  # left for the user


@pytest.mark.through_ray
def test_t59_links_planted_in_a_mount_are_never_followed_by_the_host(
    sandbox, writable_repo, canary, shared_tmp
):
    neighbours = sorted(p.name for p in canary.parent.iterdir())
    sb = sandbox(
        mounts=[corral.Mount(str(writable_repo), "/repo", read_only=False)],
        security=RW_OPT_IN,
    )
    planted = sh(
        sb,
        f"mkdir /repo/out && echo result > /repo/out/result.txt && ln -s / /repo/out/rootlink && "
        f"ln -s {canary} /repo/out/keys && ln -s {canary.parent} /repo/dirlink && "
        f"ln -s {canary} /workspace/keys && ln -s {canary.parent} /workspace/dirlink",
    )
    assert planted.exit_code == 0, planted.stderr
    assert sb.read_file("/repo/out/result.txt") == b"result\n"  # the twin
    for path in ("/repo/out/keys", "/workspace/keys"):
        # Docker and local hand back the link and corral refuses it (PathSecurityError);
        # Podman resolves it inside the container, where the host path does not exist.
        with pytest.raises(corral.SandboxError):
            sb.read_file(path)
    for path in (f"/repo/dirlink/{canary.name}", f"/workspace/dirlink/{canary.name}"):
        try:
            got = sb.read_file(path)
        except corral.SandboxError:
            continue  # refused, or not there: the link points at nothing inside
        assert got != canary.read_bytes(), f"{path} was read through a link on the host"
    for path in ("/repo/dirlink/planted", "/workspace/dirlink/planted"):
        with contextlib.suppress(corral.SandboxError):  # refused, or written inside only
            sb.write_file(path, b"planted")
    with pytest.raises(corral.ArchiveError):
        sb.download("/repo/out", shared_tmp / "out")
    assert not (shared_tmp / "out").exists()
    sb.close()  # its cleanup removes the links, never what they point at
    assert canary.exists()
    assert sorted(p.name for p in canary.parent.iterdir()) == neighbours


# -- T60, T61: propagation, new mounts, relabelling --------------------------------------


@pytest.mark.through_ray
@pytest.mark.parametrize("user", [None, "0:0"], ids=["sandbox-user", "root-without-caps"])
def test_t60_no_new_mounts_and_no_new_mount_namespaces(sandbox, user):
    sb = sandbox()
    for script in (
        "mount -t tmpfs none /tmp",
        "mount -t proc proc /tmp",
        "mount --bind /workspace /tmp",
        "unshare -m true",
    ):
        done = sh(sb, script, user=user)
        assert done.exit_code != 0, f"{script!r} worked"
    assert sh(sb, "grep -c ' /tmp ' /proc/self/mountinfo").text.strip() == "1"
    # The twin. (/dev/shm: Podman copies the image's /tmp mode, 755 here, over the
    # tmpfs's 1777, so root without capabilities may not write /tmp there.)
    assert sh(sb, "echo ok > /dev/shm/f && cat /dev/shm/f", user=user).text == "ok\n"


@ENGINES_ONLY
@pytest.mark.through_ray
def test_t60_every_mount_is_private_by_inspect(sandbox, kind, raw_client_of, mount_root):
    folder = mount_root / "data"
    folder.mkdir()
    sb = sandbox(mounts=[corral.Mount(str(folder), "/data"), corral.Tmpfs("/scratch")])
    client = raw_client_of(kind)
    try:
        mounts = client.inspect_container(f"corral-{sb.id}")["Mounts"]
    finally:
        client.close()
    assert "/data" in {m["Destination"] for m in mounts}  # (Podman lists no tmpfs here)
    for m in mounts:
        assert "shared" not in (m.get("Propagation") or ""), m  # CIS 5.19
        assert "slave" not in (m.get("Propagation") or ""), m
    binds = [m for m in mounts if m["Type"] == "bind"]
    assert binds and all(m.get("Propagation") in ("rprivate", "private", "") for m in binds)
    # Inside, the sandbox sees no shared peer group on the mounts corral made.
    for line in sb.exec(["cat", "/proc/self/mountinfo"]).text.splitlines():
        if " /data " in line or " /scratch " in line:
            assert "shared:" not in line, line


@ENGINES_ONLY
@pytest.mark.through_ray
def test_t61_corral_never_asks_the_engine_to_relabel(sandbox, kind, raw_client_of, mount_root):
    """No :z or :Z on any mount (there is no SELinux here to see a relabel, so the
    request itself is what is checked); the system folders a relabel would break are
    refused as sources before any engine call."""
    folder = mount_root / "labelled"
    folder.mkdir()
    sb = sandbox(mounts=[corral.Mount(str(folder), "/labelled")])
    client = raw_client_of(kind)
    try:
        info = client.inspect_container(f"corral-{sb.id}")
    finally:
        client.close()
    # Volumes are the engine's own (Docker reports them "z"); host folders are never.
    binds = [m for m in info["Mounts"] if m["Type"] == "bind"]
    assert binds
    for m in binds:
        assert not set(m.get("Mode") or "") & {"z", "Z"}, m
    assert not [o for o in info["HostConfig"].get("SecurityOpt") or [] if o.startswith("label")]
    assert sb.exec(["ls", "/labelled"]).exit_code == 0  # the twin


@pytest.mark.through_ray
@pytest.mark.parametrize("source", ["/home", "/usr", "/", "~"])
def test_t61_system_and_home_folders_are_refused_as_sources(sandbox, source):
    with pytest.raises(corral.PolicyError, match=r"system|home"):
        sandbox(mounts=[corral.Mount(source, "/host")])
