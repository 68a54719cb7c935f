"""File transfer into and out of a local sandbox's folders, resolved by file descriptor.

The sandbox's own processes can rename folders and plant symlinks while corral copies,
so every path is walked one component at a time with ``O_NOFOLLOW`` from a folder
that corral opened itself, and files are written under a fresh name and renamed into
place (never written through an existing link).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
import uuid
from collections.abc import Iterator
from typing import IO

from ...core.archive import ArchiveLimits, iter_members
from ...core.errors import NotFoundError, PathSecurityError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1024 * 1024


def _open_dir(
    parent_fd: int, name: str, path: str, create: bool, owner: tuple[int, int] | None
) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise NotFoundError(f"{path!r} does not exist in the sandbox") from None
        os.mkdir(name, 0o755, dir_fd=parent_fd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        if owner is not None:
            os.fchown(fd, *owner)
        return fd
    except (NotADirectoryError, OSError) as e:
        raise PathSecurityError(
            f"{path!r}: {name!r} is a symlink or not a folder ({e.strerror})"
        ) from None


@contextlib.contextmanager
def walk(
    root: str,
    parts: list[str],
    path: str,
    *,
    create: bool = False,
    owner: tuple[int, int] | None = None,
) -> Iterator[int]:
    """An fd for folder ``root/parts...``, never following a link on the way."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts:
            next_fd = _open_dir(fd, part, path, create, owner)
            os.close(fd)
            fd = next_fd
        yield fd
    finally:
        os.close(fd)


def put_archive(
    root: str, parts: list[str], path: str, archive: IO[bytes], owner: tuple[int, int] | None
) -> None:
    """Unpack a corral-built tar into folder ``path`` (``root`` + ``parts`` on the host)."""
    with walk(root, parts, path) as base:
        for name, member, data in iter_members(archive, ArchiveLimits(max_bytes=2**62)):
            if name == ".":
                continue
            *folders, leaf = name.split("/")
            with walk_from(base, folders, path, owner) as parent:
                if data is None:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(leaf, member.mode & 0o777, dir_fd=parent)
                        if owner is not None:
                            os.chown(leaf, *owner, dir_fd=parent, follow_symlinks=False)
                    os.close(_open_dir(parent, leaf, path, False, None))  # refuse a link
                    continue
                _write_file(parent, leaf, data, member.mode & 0o777, owner)


@contextlib.contextmanager
def walk_from(
    base: int, parts: list[str], path: str, owner: tuple[int, int] | None
) -> Iterator[int]:
    fd = os.dup(base)
    try:
        for part in parts:
            next_fd = _open_dir(fd, part, path, True, owner)
            os.close(fd)
            fd = next_fd
        yield fd
    finally:
        os.close(fd)


def _write_file(
    parent: int, leaf: str, data: IO[bytes], mode: int, owner: tuple[int, int] | None
) -> None:
    temp = f".corral-{uuid.uuid4().hex}"
    fd = os.open(
        temp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=parent,
    )
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            shutil.copyfileobj(data, f, _CHUNK)
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        # rename replaces whatever is at leaf (a file or a planted link) without writing through it
        os.rename(temp, leaf, src_dir_fd=parent, dst_dir_fd=parent)
    except IsADirectoryError:
        os.unlink(temp, dir_fd=parent)
        raise PathSecurityError(f"{leaf!r} is a folder") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=parent)
        raise
    finally:
        os.close(fd)


def get_archive(root: str, parts: list[str], path: str) -> Iterator[bytes]:
    """A tar stream of the file or folder at ``path``, made as it is read.

    Links are listed as links, never followed. Nothing is staged on the host: the
    reader's caps (a 20 GB sparse file, a million files) stop the walk at the header
    that breaks them, instead of after a full copy onto the host's disk.
    """
    *folders, leaf = parts or ["."]
    with walk(root, folders, path) as parent:
        if leaf == ".":
            yield from _members(parent, None, os.path.basename(root.rstrip("/")) or "root")
        else:
            try:
                st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                raise NotFoundError(f"{path!r} does not exist in the sandbox") from None
            if stat.S_ISLNK(st.st_mode):
                raise PathSecurityError(f"{path!r} is a symlink; corral does not follow it")
            yield from _members(parent, leaf, leaf)
    yield bytes(tarfile.RECORDSIZE)  # the end-of-archive blocks, padded to a record


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def _members(parent: int, name: str | None, arcname: str) -> Iterator[bytes]:
    # O_NONBLOCK: a FIFO swapped in for a file must not hang the host on open.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    fd = os.open(name, flags, dir_fd=parent) if name else os.dup(parent)
    try:
        st = os.fstat(fd)
        info = tarfile.TarInfo(arcname)
        info.mode, info.mtime = st.st_mode & 0o7777, int(st.st_mtime)
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            yield _header(info)
            for entry in sorted(os.listdir(fd)):
                est = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(est.st_mode) or stat.S_ISREG(est.st_mode):
                    yield from _members(fd, entry, f"{arcname}/{entry}")
                else:
                    yield _header(_special(entry, fd, est, f"{arcname}/{entry}"))
        elif stat.S_ISREG(st.st_mode):
            info.size = st.st_size
            yield _header(info)
            yield from _file_data(fd, st.st_size)
        else:  # replaced by a FIFO or a device since it was listed
            yield _header(_special(name or ".", parent, st, arcname))
    finally:
        os.close(fd)


def _file_data(fd: int, size: int) -> Iterator[bytes]:
    """Exactly ``size`` bytes and the block padding, whatever the file does meanwhile."""
    remaining = size
    while remaining:
        chunk = os.read(fd, min(_CHUNK, remaining))
        if not chunk:  # it shrank while being read: keep the size the header promised
            chunk = bytes(min(_CHUNK, remaining))
        remaining -= len(chunk)
        yield chunk
    if size % tarfile.BLOCKSIZE:
        yield bytes(tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE)


def _special(name: str, parent: int, st: os.stat_result, arcname: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(arcname)
    info.mode = st.st_mode & 0o7777
    if stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=parent)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
    else:
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
    return info
