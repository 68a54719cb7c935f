"""Safe tar archives: what is built, and every way a hostile archive is refused."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral.core import archive


def member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def make_tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    """A tar holding exactly these members, however hostile; data for regular files."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            if data is None:
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def chunked(data: bytes, size: int = 100) -> Iterator[bytes]:
    """The archive as a backend streams it: small chunks of arbitrary size."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def a_folder(name: str = "top") -> tuple[tarfile.TarInfo, None]:
    return member(name, tarfile.DIRTYPE, mode=0o755), None


def a_file(name: str, data: bytes = b"data", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, mode=mode), data


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    """An empty folder that downloads land in; checked afterwards for leftovers."""
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder


def read_back(tar: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return t.getmembers()


# -- building --------------------------------------------------------------------------


def test_tar_from_bytes_clears_setuid_bits_and_sets_the_owner() -> None:
    with archive.build_tar_from_bytes("run.sh", b"#!/bin/sh\n", 0o6755, (1000, 1001)) as f:
        tar = f.read()
    (info,) = read_back(tar)
    assert info.name == "run.sh"
    assert info.isreg()
    assert info.mode == 0o755
    assert not info.mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
    assert (info.uid, info.gid) == (1000, 1001)
    assert (info.uname, info.gname) == ("", "")
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        assert t.extractfile(info).read() == b"#!/bin/sh\n"


def test_members_carry_a_real_modification_time(tmp_path: Path) -> None:
    # A member dated 1970 makes stale build targets and files zip cannot store.
    before = int(time.time())
    with archive.build_tar_from_bytes("f", b"x", 0o644, (0, 0)) as f:
        (info,) = read_back(f.read())
    assert before <= info.mtime <= time.time() + 1
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "old").write_text("x")
    os.utime(tmp_path / "src" / "old", (1_600_000_000, 1_600_000_000))
    with archive.build_tar_from_path(tmp_path / "src", (0, 0)) as f:
        members = {m.name: m for m in read_back(f.read())}
    assert members["src/old"].mtime == 1_600_000_000
    assert members["src"].mtime >= before


@pytest.mark.parametrize("name", ["a/b", "", ".", ".."])
def test_tar_from_bytes_wants_a_bare_file_name(name: str) -> None:
    with pytest.raises(corral.PathSecurityError, match="is not a file name"):
        archive.build_tar_from_bytes(name, b"x", 0o644, (0, 0))


def test_tar_from_path_holds_the_tree_under_its_base_name(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "mod.py").write_text("x = 1\n")
    (source / "tool").write_bytes(b"#!")
    os.chmod(source / "tool", 0o4755)
    with archive.build_tar_from_path(source, (1000, 1000)) as f:
        members = {m.name: m for m in read_back(f.read())}
    assert sorted(members) == ["src", "src/pkg", "src/pkg/mod.py", "src/tool"]
    assert members["src/pkg"].isdir()
    assert members["src/tool"].mode == 0o755
    assert all((m.uid, m.gid) == (1000, 1000) for m in members.values())


def test_tar_from_path_refuses_a_symlink_inside_the_tree(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "ok.txt").write_text("fine")
    (source / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(corral.PathSecurityError, match="only regular files and folders"):
        archive.build_tar_from_path(source, (0, 0))


def test_tar_from_path_refuses_a_symlinked_source(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(corral.PathSecurityError, match="only regular files and folders"):
        archive.build_tar_from_path(tmp_path / "link", (0, 0))


def test_tar_from_path_of_a_missing_source(tmp_path: Path) -> None:
    with pytest.raises(corral.ConfigError, match="no such file or folder"):
        archive.build_tar_from_path(tmp_path / "missing", (0, 0))


# -- extracting what is fine -----------------------------------------------------------


def test_extract_a_folder_with_safe_modes(parent: Path) -> None:
    tar = make_tar(
        a_folder("top"),
        a_folder("top/sub"),
        a_file("top/sub/a.txt", b"hello"),
        a_file("top/suid", b"#!", mode=0o4777),
    )
    out = archive.extract(chunked(tar), parent / "out")
    assert out == parent / "out"
    assert (out / "sub" / "a.txt").read_bytes() == b"hello"
    assert stat.S_IMODE((out / "suid").stat().st_mode) == 0o755
    assert sorted(os.listdir(parent)) == ["out"]  # no staging folder left beside it


def test_extract_a_single_file(parent: Path) -> None:
    out = archive.extract(io.BytesIO(make_tar(a_file("report.json", b"{}"))), parent / "r.json")
    assert out.read_bytes() == b"{}"


def test_a_round_trip_keeps_the_tree(tmp_path: Path, parent: Path) -> None:
    source = tmp_path / "src"
    (source / "a" / "b").mkdir(parents=True)
    (source / "a" / "b" / "c.bin").write_bytes(bytes(range(256)) * 100)
    with archive.build_tar_from_path(source, (0, 0)) as f:
        out = archive.extract(chunked(f.read(), 4096), parent / "copy")
    assert (out / "a" / "b" / "c.bin").read_bytes() == bytes(range(256)) * 100


def test_extract_refuses_an_existing_destination(parent: Path) -> None:
    (parent / "out").mkdir()
    with pytest.raises(corral.ConflictError, match="already exists"):
        archive.extract(chunked(make_tar(a_file("x"))), parent / "out")
    (parent / "link").symlink_to(parent / "nowhere")
    with pytest.raises(corral.ConflictError, match="already exists"):
        archive.extract(chunked(make_tar(a_file("x"))), parent / "link")
    assert sorted(os.listdir(parent)) == ["link", "out"]


# -- extracting what is hostile --------------------------------------------------------

HOSTILE = {
    "absolute name": [a_file("/etc/cron.d/evil")],
    "dot-dot": [a_folder("top"), a_file("top/../../evil")],
    "dot-dot at the top": [a_file("../evil")],
    "symlink": [a_folder("top"), (member("top/l", tarfile.SYMTYPE, linkname="/etc"), None)],
    "hardlink": [a_folder("top"), (member("top/h", tarfile.LNKTYPE, linkname="/etc/shadow"), None)],
    "char device": [(member("top", tarfile.CHRTYPE, devmajor=1, devminor=3), None)],
    "block device": [a_folder("top"), (member("top/sda", tarfile.BLKTYPE), None)],
    "fifo": [a_folder("top"), (member("top/pipe", tarfile.FIFOTYPE), None)],
    "empty name": [a_file("")],
    "second top entry": [a_folder("top"), a_file("top/a"), a_file("other")],
    "repeated member": [a_folder("top"), a_file("top/a"), a_file("top/a", b"again")],
    "file then child": [a_file("top"), a_file("top/a")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_extract_refuses_and_leaves_nothing(case: str, parent: Path) -> None:
    tar = make_tar(*HOSTILE[case])
    with pytest.raises(corral.ArchiveError):
        archive.extract(chunked(tar), parent / "out")
    assert not (parent / "out").exists()
    assert os.listdir(parent) == []  # the staging folder is gone too


def test_refusals_say_why(parent: Path) -> None:
    reasons = {
        "absolute name": "would land outside the destination",
        "dot-dot": "would land outside the destination",
        "symlink": "is not a regular file or a folder",
        "hardlink": "is not a regular file or a folder",
        "char device": "is not a regular file or a folder",
        "fifo": "is not a regular file or a folder",
        "empty name": "has an invalid name",
        "second top entry": "more than one top entry",
        "repeated member": "clashes with an earlier one",
    }
    for case, reason in reasons.items():
        with pytest.raises(corral.ArchiveError, match=reason):
            archive.extract(chunked(make_tar(*HOSTILE[case])), parent / "out")


def test_over_the_member_cap(parent: Path) -> None:
    tar = make_tar(a_folder("top"), *(a_file(f"top/{i}") for i in range(5)))
    limits = corral.ArchiveLimits(max_members=3)
    with pytest.raises(corral.ResourceLimitError, match="more than 3 members"):
        archive.extract(chunked(tar), parent / "out", limits)
    assert os.listdir(parent) == []


def test_over_the_byte_cap(parent: Path) -> None:
    tar = make_tar(a_folder("top"), a_file("top/a", b"x" * 600), a_file("top/b", b"x" * 600))
    limits = corral.ArchiveLimits(max_bytes=1000)
    with pytest.raises(corral.ResourceLimitError, match="more than 1000 bytes"):
        archive.extract(chunked(tar), parent / "out", limits)
    assert os.listdir(parent) == []


def test_over_the_file_cap(parent: Path) -> None:
    tar = make_tar(a_file("big", b"x" * 2000))
    with pytest.raises(corral.ResourceLimitError, match="larger than 1000 bytes"):
        archive.extract(chunked(tar), parent / "out", corral.ArchiveLimits(max_file_bytes=1000))
    assert os.listdir(parent) == []


def test_not_a_tar_and_an_empty_tar(parent: Path) -> None:
    with pytest.raises(corral.ArchiveError):
        archive.extract([b"this is not a tar archive" * 40], parent / "out")
    with pytest.raises(corral.ArchiveError, match="the archive is empty"):
        archive.extract(chunked(make_tar()), parent / "out")
    assert os.listdir(parent) == []


def test_resource_limit_errors_are_sandbox_errors_but_not_archive_errors() -> None:
    error = corral.ResourceLimitError("too big")
    assert isinstance(error, corral.SandboxError)
    assert error.category == "resource_limit"
    assert not isinstance(error, corral.ArchiveError)


# -- single files and sandbox paths ----------------------------------------------------


def test_read_single_file() -> None:
    assert archive.read_single_file(chunked(make_tar(a_file("a.txt", b"abc"))), 10) == b"abc"


def test_read_single_file_refuses_folders_big_files_and_links() -> None:
    with pytest.raises(corral.ConfigError, match="is a folder, not a file"):
        archive.read_single_file(chunked(make_tar(a_folder("top"))), 10)
    with pytest.raises(corral.ResourceLimitError, match="larger than 10 bytes"):
        archive.read_single_file(chunked(make_tar(a_file("a", b"x" * 11))), 10)
    link = (member("a", tarfile.SYMTYPE, linkname="/etc/shadow"), None)
    with pytest.raises(corral.ArchiveError, match="not a regular file"):
        archive.read_single_file(chunked(make_tar(link)), 10)
    with pytest.raises(corral.ArchiveError, match="empty"):
        archive.read_single_file(chunked(make_tar()), 10)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("relative/file", "is not absolute"),
        ("/workspace/../etc/passwd", "contains '..'"),
        ("/..", "contains '..'"),
        ("/tmp/a\0b", "contains a NUL byte"),
        (b"/tmp/a", "is not a string path"),
    ],
)
def test_check_sandbox_path_refuses(path: object, reason: str) -> None:
    with pytest.raises(corral.PathSecurityError, match=reason):
        archive.check_sandbox_path(path)


def test_check_sandbox_path_normalises_and_names_its_field() -> None:
    assert archive.check_sandbox_path("/workspace//a/./b/") == "/workspace/a/b"
    assert archive.check_sandbox_path("/") == "/"
    with pytest.raises(corral.PathSecurityError, match=r"^destination: 'x' is not absolute"):
        archive.check_sandbox_path("x", "destination")
