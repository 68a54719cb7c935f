"""THREATS.md B6, file put/get and archives (T43-T56), on every backend.

Every attack comes with its harmless twin: a path that leaves the sandbox is refused
and a normal one works; a hostile folder is refused and a plain one downloads. Hostile
tars built by hand (absolute names, empty names, link chains, devices) are refused by
tests/unit/test_archive.py whatever the backend; here the sandbox itself plants what it
can (links, FIFOs, setuid bits, deep trees) and the real engines build the archive.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
from cases import ENGINES_ONLY, unavailable

import corral
from corral.core.archive import ArchiveLimits


def sh(sb: corral.Sandbox, script: str, **options: object) -> corral.ExecResult:
    return sb.exec(["sh", "-c", script], **options)  # type: ignore[arg-type]


def leftovers(folder: Path) -> list[str]:
    """What a refused download left beside its destination (it must leave nothing)."""
    return sorted(p.name for p in folder.iterdir())


# -- T43, T44, T54: paths ------------------------------------------------------------------

LEAVING = [
    "/workspace/../../etc/cron.d/x",  # T43
    "../../x",  # T43, relative
    "workspace/x",
    "/proc/sys/kernel/core_pattern",  # T44: the kernel's files
    "/sys/kernel/x",
    "/dev/x",  # Podman's copier would write into the container's /dev
    "/workspace/a\0b",  # T54
]


@pytest.mark.through_ray
def test_every_file_call_refuses_a_path_that_leaves_the_sandbox(sandbox, tmp_path):
    sb = sandbox()
    for path in LEAVING:
        with pytest.raises(corral.PathSecurityError):
            sb.write_file(path, b"x")
        with pytest.raises(corral.PathSecurityError):
            sb.read_file(path)
        with pytest.raises(corral.PathSecurityError):
            sb.download(path, tmp_path / "out")
        with pytest.raises(corral.PathSecurityError):
            sb.upload(tmp_path, path)
        assert not (tmp_path / "out").exists(), path
    sb.write_file("/workspace/ok", b"fine")  # the twin: a path inside works
    assert sb.read_file("/workspace/ok") == b"fine"


@pytest.mark.through_ray
def test_t43_shadow_is_never_read_through_dot_dot(sandbox):
    sb = sandbox()
    with pytest.raises(corral.PathSecurityError, match=r"'\.\.'"):
        sb.read_file("/workspace/../../etc/shadow")
    sb.write_file("/workspace/x", b"x")  # the twin: a normal path is read back
    assert sb.read_file("/workspace/./x") == b"x"


@pytest.mark.through_ray
def test_t44_absolute_paths_outside_the_writable_roots(sandbox, kind):
    sb = sandbox()
    targets = ["/etc/passwd", "/bin/sh"]
    if kind == "local":
        targets.append(os.path.expanduser("~/.bashrc"))  # os.path.join would have lost root
    for target in targets:
        with pytest.raises(corral.PathSecurityError):
            sb.write_file(target, b"owned\n")
    # The sandbox's own /etc/passwd is unchanged too (the host's is checked by the harness).
    assert b"owned" not in sb.exec(["cat", "/etc/passwd"]).stdout
    sb.write_file("/tmp/x", b"tmp is writable")  # the twin
    assert sb.exec(["cat", "/tmp/x"]).text == "tmp is writable"


@pytest.mark.through_ray
def test_t54_nul_in_any_path_is_refused_the_same_way_everywhere(sandbox, tmp_path):
    sb = sandbox()
    (tmp_path / "src").mkdir()
    calls = {
        "write_file": lambda: sb.write_file("/workspace/a\0b", b"x"),
        "read_file": lambda: sb.read_file("/workspace/a\0b"),
        "upload source": lambda: sb.upload(str(tmp_path / "s\0rc"), "/workspace"),
        "upload destination": lambda: sb.upload(tmp_path / "src", "/work\0space"),
        "download source": lambda: sb.download("/workspace\0", tmp_path / "out"),
        "download destination": lambda: sb.download("/workspace", str(tmp_path / "o\0ut")),
    }
    for name, call in calls.items():
        with pytest.raises(corral.PathSecurityError, match="NUL"):
            call()
        assert name  # (named for the failure message)
    with pytest.raises(corral.ConfigError):
        sb.exec(["true"], workdir="/work\0space")
    sb.upload(tmp_path / "src", "/workspace")  # the twins
    assert sb.exec(["test", "-d", "/workspace/src"]).exit_code == 0


# -- T46: the symlink-exchange race --------------------------------------------------------


@pytest.mark.destructive
def test_t46_symlink_exchange_race_never_reaches_the_host(sandbox, canary):
    """While the sandbox swaps a folder for a link to the host folder holding the canary,
    corral keeps reading and writing through that folder: no result ever holds the
    canary, and nothing new appears beside it."""
    host_folder = canary.parent
    before = leftovers(host_folder)
    sb = sandbox()
    inside = b"the sandbox's own file"
    sb.exec(["mkdir", "/workspace/dir"])
    sb.write_file(f"/workspace/dir/{canary.name}", inside)
    swap = (
        f"cd /workspace; end=$(( $(date +%s) + 8 )); while [ $(date +%s) -lt $end ]; do "
        f"mv dir real; ln -s {host_folder} dir; rm dir; mv real dir; done"
    )
    swapper = threading.Thread(target=sh, args=(sb, swap), kwargs={"timeout": 30})
    swapper.start()
    reads = writes = 0
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            try:
                got = sb.read_file(f"/workspace/dir/{canary.name}")
                assert got == inside, "a read went through the link to the host"
                reads += 1
            except corral.SandboxError:
                pass  # the folder was a link or missing at that instant: refused
            try:
                sb.write_file("/workspace/dir/planted", b"x")
                writes += 1
            except corral.SandboxError:
                pass
    finally:
        swapper.join()
    assert leftovers(host_folder) == before, "a write went through the link to the host"
    assert reads > 0 and writes > 0  # the twin: between swaps, the calls work
    # Once the race is over, the folder works as any other. (Not the last write's file:
    # a write that landed while the folder was missing made a new one, which the next
    # `mv real dir` then moved the real folder into.)
    sb.write_file("/workspace/dir/planted", b"after")
    assert sb.read_file("/workspace/dir/planted") == b"after"


# -- T48: hostile folders coming back ------------------------------------------------------

# What the sandbox can plant in a folder it hands back; each is refused.
HOSTILE_FOLDERS = {
    "a symlink to /etc": "ln -s /etc out/evil",
    "a symlink to the root": "ln -s / out/root",
    "a chain of symlinks": "ln -s b out/a && ln -s c out/b && ln -s / out/c",
    "a dangling symlink": "ln -s /nonexistent out/dangling",
    "a FIFO": "mkfifo out/fifo",
}
# cd goes in steps: the shell's own absolute $PWD must stay below PATH_MAX.
PAST_PATH_MAX = (
    "n=$(printf 'd%.0s' $(seq 200)); p=$n; for i in $(seq 17); do p=$p/$n; done; "
    "mkdir -p /workspace/out/$p && cd /workspace/out/$p && mkdir -p $n/$n/$n && "
    "echo deep > $n/$n/$n/f"
)


@pytest.mark.through_ray
def test_t48_a_hostile_folder_is_refused_and_leaves_nothing(sandbox, shared_tmp):
    sb = sandbox()
    landing = shared_tmp / "landing"
    landing.mkdir()
    for case, plant in HOSTILE_FOLDERS.items():
        # A good file first, so that the refusal comes halfway through the extraction.
        planted = sh(
            sb, f"cd /workspace && rm -rf out && mkdir out && echo good > out/0-good && {plant}"
        )
        assert planted.exit_code == 0, (case, planted.stderr)
        with pytest.raises(corral.ArchiveError):
            sb.download("/workspace/out", landing / "out")
        assert leftovers(landing) == [], case  # no destination, no half-written staging
    sh(sb, "rm -rf /workspace/out && mkdir /workspace/out && echo good > /workspace/out/0-good")
    got = sb.download("/workspace/out", landing / "out")  # the twin: a plain folder
    assert (got / "0-good").read_text() == "good\n"


@pytest.mark.through_ray
def test_t48_names_past_path_max_never_land_on_the_host(sandbox, shared_tmp):
    sb = sandbox()
    planted = sh(sb, PAST_PATH_MAX)
    assert planted.exit_code == 0, planted.stderr
    landing = shared_tmp / "landing"
    landing.mkdir()
    try:
        got = sb.download("/workspace/out", landing / "out")
    except corral.ArchiveError:  # corral refuses the name (the local backend sends it)
        assert leftovers(landing) == []
        return
    # Docker and Podman leave out what their own walk cannot reach: no error, and
    # nothing past PATH_MAX below the destination.
    assert leftovers(landing) == ["out"]
    deepest = max(len(str(p.relative_to(landing))) for p in got.rglob("*"))
    assert deepest < 4096


@pytest.mark.through_ray
def test_t48_a_hardlink_never_becomes_a_link_on_the_host(sandbox, shared_tmp):
    sb = sandbox()
    sh(sb, "cd /workspace && mkdir out && echo shared > out/a && ln out/a out/b")
    landing = shared_tmp / "landing"
    landing.mkdir()
    try:
        got = sb.download("/workspace/out", landing / "out")
    except corral.ArchiveError:  # Docker and Podman send the second name as a link
        assert leftovers(landing) == []
        return
    # The local backend copies both names as plain files: two copies, no link.
    for name in ("a", "b"):
        assert (got / name).read_text() == "shared\n"
        assert (got / name).stat().st_nlink == 1


@pytest.mark.through_ray
def test_t48_setuid_bits_never_reach_the_host(sandbox, shared_tmp):
    sb = sandbox()
    sh(sb, "cd /workspace && mkdir out && echo run > out/tool && chmod 6755 out/tool")
    assert sb.exec(["stat", "-c", "%a", "/workspace/out/tool"]).text.strip() == "6755"
    got = sb.download("/workspace/out", shared_tmp / "out")  # the twin: it downloads
    mode = (got / "tool").stat().st_mode
    assert mode & 0o7000 == 0 and mode & 0o100  # no setuid or setgid, still executable
    assert (got / "tool").read_text() == "run\n"


@pytest.mark.through_ray
def test_t48_reading_a_fifo_neither_hangs_nor_follows(sandbox):
    sb = sandbox()
    sb.exec(["mkfifo", "/workspace/fifo"])
    with pytest.raises(corral.ArchiveError):
        sb.read_file("/workspace/fifo")
    sb.write_file("/workspace/plain", b"ok")
    assert sb.read_file("/workspace/plain") == b"ok"


# -- T50: bombs ----------------------------------------------------------------------------


def _bytes_read_by_this_process() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.through_ray
def test_t50_a_sparse_giant_is_refused_at_its_header(sandbox, shared_tmp):
    """4 GiB of holes: refused by the per-file cap before it is read, so neither the
    host's disk nor this process ever holds it (rchar counts every byte read)."""
    sb = sandbox()
    made = sb.exec(["truncate", "-s", "4G", "/workspace/sparse"])
    assert made.exit_code == 0, made.stderr
    before = _bytes_read_by_this_process()
    with pytest.raises(corral.ResourceLimitError, match="larger than"):
        sb.download("/workspace/sparse", shared_tmp / "sparse")
    with pytest.raises(corral.ResourceLimitError, match="larger than"):
        sb.read_file("/workspace/sparse")
    assert _bytes_read_by_this_process() - before < 256 * 1024**2
    assert not (shared_tmp / "sparse").exists()
    sb.exec(["truncate", "-s", "1M", "/workspace/sparse"])  # the twin: a small one comes back
    assert sb.read_file("/workspace/sparse") == bytes(1024**2)


@pytest.mark.through_ray
def test_t50_too_many_members_stops_the_download(sandbox, shared_tmp):
    sb = sandbox()
    sh(sb, "mkdir /workspace/many && cd /workspace/many && for i in $(seq 300); do : > f$i; done")
    limits = ArchiveLimits(max_members=100)
    with pytest.raises(corral.ResourceLimitError, match="more than 100 members"):
        sb.download("/workspace/many", shared_tmp / "many", limits=limits)
    assert not (shared_tmp / "many").exists()
    assert [p for p in shared_tmp.iterdir() if p.name.startswith(".corral-download")] == []
    got = sb.download("/workspace/many", shared_tmp / "many")  # within the default caps
    assert len(list(got.iterdir())) == 300


@pytest.mark.through_ray
def test_t50_the_total_byte_cap_holds_across_files(sandbox, shared_tmp):
    sb = sandbox()
    sh(
        sb,
        "mkdir /workspace/fat && for i in 1 2 3; do "
        "head -c 400000 /dev/zero > /workspace/fat/$i; done",
    )
    limits = ArchiveLimits(max_bytes=1_000_000, max_file_bytes=500_000)
    landing = shared_tmp / "landing"
    landing.mkdir()
    with pytest.raises(corral.ResourceLimitError, match="more than 1000000 bytes"):
        sb.download("/workspace/fat", landing / "fat", limits=limits)
    assert leftovers(landing) == []
    got = sb.download("/workspace/fat", landing / "fat")  # the twin: default caps
    assert sorted(p.name for p in got.iterdir()) == ["1", "2", "3"]


# -- T51, T52: what an upload sends and how it lands ---------------------------------------

COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd", b"\x04\x22\x4d\x18")


@pytest.mark.through_ray
def test_t51_uploads_are_plain_tars_of_files_and_folders(sandbox, tmp_path, monkeypatch):
    sb = sandbox()
    sent: list[bytes] = []
    real_put = sb.backend.put_archive

    def recording_put(sandbox_id, path, archive):  # the real call, after a look at the tar
        data = archive.read()
        sent.append(data)
        return real_put(sandbox_id, path, io.BytesIO(data))

    monkeypatch.setattr(sb.backend, "put_archive", recording_put)
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool").write_text("#!/bin/sh\necho tool ran\n")
    os.chmod(src / "bin" / "tool", 0o6755)  # setuid and setgid on the host
    os.chmod(src / "bin", 0o1777)  # sticky
    sb.upload(src, "/workspace")
    sb.write_file("/workspace/one", b"1", mode=0o4755)
    assert len(sent) == 2
    for data in sent:
        assert not data.startswith(COMPRESSED_MAGIC)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:  # uncompressed
            for info in tar.getmembers():
                assert info.isreg() or info.isdir(), info.name
                assert info.mode & 0o7000 == 0, (info.name, oct(info.mode))
                assert (info.uid, info.gid) == (1000, 1000), info.name
    monkeypatch.undo()
    # The twin: it arrived whole and runs, without any special bit.
    assert sb.exec(["/workspace/src/bin/tool"]).text == "tool ran\n"
    modes = sb.exec(["stat", "-c", "%a", "/workspace/src/bin/tool", "/workspace/one"]).text
    assert modes.split() == ["755", "755"]


@pytest.mark.through_ray
@pytest.mark.parametrize("user", ["1000:1000", "2000:3000"])
def test_t52_uploaded_files_belong_to_the_sandbox_user(sandbox, tmp_path, user):
    sb = sandbox(user=user)
    sb.write_file("/workspace/file", b"one\n")
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("a\n")
    sb.upload(src, "/workspace")
    uid, gid = user.split(":")
    for path in ("/workspace/file", "/workspace/tree", "/workspace/tree/sub/f"):
        assert sb.exec(["stat", "-c", "%u:%g", path]).text.strip() == f"{uid}:{gid}", path
    appended = sh(
        sb,
        "echo two >> /workspace/file && echo b >> /workspace/tree/sub/f && "
        "touch /workspace/tree/sub/new && cat /workspace/file",
    )
    assert appended.exit_code == 0, appended.stderr
    assert appended.text == "one\ntwo\n"


# -- T56: nothing from the container runs on the host -------------------------------------

TROJAN_LIBRARY = r"""
#include <stdio.h>
__attribute__((constructor)) static void pwn(void) {
    FILE *f = fopen("/proc/1/root%s", "w");
    if (f) { fputs("pwned by libnss_files\n", f); fclose(f); }
}
"""


# As root inside: where the engines' helpers would look for a decompressor or an NSS
# library if they ever ran in the container's root (chmod: Podman's / is read-only).
PLANT_TROJANS = (
    "set -e; chmod 755 /; "
    "for d in /lib /lib64 /lib/x86_64-linux-gnu /usr/bin /usr/local/bin; do mkdir -p $d; done; "
    "for d in /lib /lib64 /lib/x86_64-linux-gnu; do cp /workspace/libnss_files.so.2 $d/; done; "
    "for t in unpigz xz gzip bzip2 zstd; do "
    "rm -f /bin/$t; cp /workspace/trojan /bin/$t; cp /workspace/trojan /usr/bin/$t; done"
)


@pytest.fixture
def trojan_library(tmp_path: Path, marker: Path) -> bytes:
    if shutil.which("gcc") is None:
        unavailable("gcc is not installed (it builds the trojan library)")
    source = tmp_path / "trojan.c"
    source.write_text(TROJAN_LIBRARY % marker)
    library = tmp_path / "libnss_files.so.2"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", library, source], check=True, timeout=120)
    return library.read_bytes()


@pytest.fixture
def marker(shared_tmp: Path) -> Path:
    """The host file a trojan writes if it ever runs in the host's context."""
    return shared_tmp / "pwned"


@ENGINES_ONLY
@pytest.mark.destructive
def test_t56_trojan_helpers_in_the_image_never_run(sandbox, marker, trojan_library, tmp_path):
    """The container's root holds a trojan NSS library and trojan decompressors; corral's
    file calls (and the engine's helpers under them) must never load or run them."""
    sb = sandbox(security={"read_only_root": False, "allow_unsafe": ["read_only_root"]})
    script = f"#!/bin/sh\necho pwned by $0 > /proc/1/root{marker}\nexec cat\n".encode()
    sb.write_file("/workspace/libnss_files.so.2", trojan_library)
    sb.write_file("/workspace/trojan", script, mode=0o755)
    planted = sh(
        sb,
        PLANT_TROJANS,
        user="0",
    )
    assert planted.exit_code == 0, planted.stderr
    # The twin of every attack: the calls themselves work.
    sb.write_file("/workspace/note", b"note")
    assert sb.read_file("/workspace/note") == b"note"
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "f").write_text("f")
    sb.upload(tmp_path / "dir", "/workspace")
    got = sb.download("/workspace/dir", tmp_path / "back")
    assert (got / "f").read_text() == "f"
    assert not marker.exists(), marker.read_text()
