"""Copying tars into and out of a sandbox folder without ever following a link.

The sandbox's commands can plant symlinks while we copy, so every path is walked one
component at a time with ``O_NOFOLLOW`` from a folder opened by file descriptor, and
files are written under a fresh name and renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO

from corral import ArchiveError, ArchiveLimits, NotFoundError, PathSecurityError
from corral.core.archive import iter_members

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1024 * 1024
Owner = tuple[int, int] | None


def _open_dir(parent: int, name: str, path: str, create: bool, owner: Owner) -> int:
    try:
        return os.open(name, _DIR, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise NotFoundError(f"{path!r} does not exist in the sandbox") from None
        os.mkdir(name, 0o755, dir_fd=parent)
        fd = os.open(name, _DIR, dir_fd=parent)
        if owner is not None:
            os.fchown(fd, *owner)
        return fd
    except OSError as e:  # ELOOP for a link, ENOTDIR for a file
        raise PathSecurityError(f"{path!r}: {name!r} is a symlink or not a folder") from e


@contextlib.contextmanager
def _walk(
    start: str | int, parts: list[str], path: str, create: bool = False, owner: Owner = None
) -> Iterator[int]:
    """A descriptor of folder ``start/parts...``, opened component by component."""
    fd = os.open(start, _DIR) if isinstance(start, str) else os.dup(start)
    try:
        for part in parts:
            next_fd = _open_dir(fd, part, path, create, owner)
            os.close(fd)
            fd = next_fd
        yield fd
    finally:
        os.close(fd)


def put_archive(root: str, parts: list[str], path: str, archive: IO[bytes], owner: Owner) -> None:
    """Unpack a corral-built tar into the existing folder ``root/parts``."""
    with _walk(root, parts, path) as base:
        for name, member, data in iter_members(archive, ArchiveLimits(max_bytes=2**62)):
            if name == ".":
                continue
            *folders, leaf = name.split("/")
            with _walk(base, folders, path, create=True, owner=owner) as parent:
                if data is None:  # a folder
                    os.close(_open_dir(parent, leaf, path, True, owner))
                else:
                    _write_file(parent, leaf, data, member.mode & 0o777, owner)


def _write_file(parent: int, leaf: str, data: IO[bytes], mode: int, owner: Owner) -> None:
    temp = f".corral-{uuid.uuid4().hex}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, 0o600, dir_fd=parent)
    try:
        with os.fdopen(os.dup(fd), "wb") as f:
            shutil.copyfileobj(data, f, _CHUNK)
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        # rename replaces a file or a planted link at leaf without writing through it
        os.rename(temp, leaf, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=parent)
        if isinstance(e, IsADirectoryError):
            raise PathSecurityError(f"{leaf!r} is a folder") from None
        raise
    finally:
        os.close(fd)


def get_archive(root: str, parts: list[str], path: str) -> Iterator[bytes]:
    """A tar of the file or folder ``root/parts``; a symlink anywhere is refused."""
    *folders, leaf = parts or ["."]
    out = tempfile.SpooledTemporaryFile(max_size=8 * _CHUNK)  # noqa: SIM115 - closed below
    try:
        with _walk(root, folders, path) as parent, tarfile.open(fileobj=out, mode="w") as tar:
            if leaf == ".":
                _add(tar, parent, None, os.path.basename(path.rstrip("/")) or "root", path)
            else:
                try:
                    st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    raise NotFoundError(f"{path!r} does not exist in the sandbox") from None
                if stat.S_ISLNK(st.st_mode):
                    raise PathSecurityError(f"{path!r} is a symlink; it is not followed")
                _add(tar, parent, leaf, leaf, path)
        out.seek(0)
        while chunk := out.read(_CHUNK):
            yield chunk
    finally:
        out.close()


def _add(tar: tarfile.TarFile, parent: int, name: str | None, arcname: str, path: str) -> None:
    if name is None:
        fd = os.dup(parent)
    else:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except OSError as e:  # planted or swapped since it was listed
            raise ArchiveError(f"{path!r}: {arcname!r} is a symlink") from e
    try:
        st = os.fstat(fd)
        info = tarfile.TarInfo(arcname)
        info.mode, info.mtime = st.st_mode & 0o777, int(st.st_mtime)
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            for entry in sorted(os.listdir(fd)):
                est = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                if not (stat.S_ISDIR(est.st_mode) or stat.S_ISREG(est.st_mode)):
                    raise ArchiveError(
                        f"{path!r}: {arcname}/{entry} is a symlink or a special file"
                    )
                _add(tar, fd, entry, f"{arcname}/{entry}", path)
        elif stat.S_ISREG(st.st_mode):
            info.size = st.st_size
            with os.fdopen(os.dup(fd), "rb") as f:
                tar.addfile(info, f)
        else:
            raise ArchiveError(f"{path!r}: {arcname} is a special file")
    finally:
        os.close(fd)
