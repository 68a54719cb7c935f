"""Safe tar archives: the one place corral builds and reads them.

Uploads are uncompressed tars of regular files and folders only, setuid, setgid and
sticky bits cleared, owned by the sandbox user. Downloads are read as a stream and
refused member by member: anything but a regular file or a folder, absolute names,
``..``, over-long names, and archives past the size or member caps. Extraction goes
into a fresh folder that nobody else writes, and is removed if anything fails.
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
import time
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING, cast

import attrs

from .errors import ArchiveError, ConfigError, ConflictError, PathSecurityError, ResourceLimitError

# deferred: tarfile, shutil, tempfile and pathlib (with bz2, lzma, random and
# urllib.parse) cost ~15 ms at `import corral`, and only file copies and checks of host
# paths need them; each function imports its own.
if TYPE_CHECKING:
    import tarfile
    from pathlib import Path

    from _typeshed import WriteableBuffer

__all__ = [
    "ArchiveLimits",
    "build_tar_from_bytes",
    "build_tar_from_path",
    "check_host_path",
    "check_sandbox_path",
    "extract",
    "iter_members",
    "read_single_file",
]

_SPOOL = 8 * 1024 * 1024  # build small archives in memory, big ones on disk
_NAME_MAX = 4096
_KERNEL_ROOTS = ("/proc", "/sys", "/dev")


@attrs.frozen
class ArchiveLimits:
    """Caps on what a download may bring back."""

    max_bytes: int = 1024**3
    max_members: int = 100_000
    max_file_bytes: int = 1024**3


def check_sandbox_path(path: object, field: str = "path") -> str:
    """A path inside a sandbox: absolute, no ``..``, no NUL; returned normalised."""
    if not isinstance(path, str):
        raise PathSecurityError(f"{field}: {path!r} is not a string path")
    if "\0" in path:
        raise PathSecurityError(f"{field}: {path!r} contains a NUL byte")
    if not path.startswith("/"):
        raise PathSecurityError(f"{field}: {path!r} is not absolute")
    if ".." in path.split("/"):
        raise PathSecurityError(f"{field}: {path!r} contains '..'")
    normal = posixpath.normpath(path)
    # The kernel's files are not the sandbox's to copy: engines answer "not found",
    # "read-only" or even write into a container's /dev; refuse the same everywhere.
    if any(normal == root or normal.startswith(root + "/") for root in _KERNEL_ROOTS):
        raise PathSecurityError(f"{field}: {path!r} is inside a kernel filesystem")
    return normal


def check_host_path(path: str | os.PathLike[str], field: str) -> Path:
    """A local path as the file helpers take it; a NUL byte is refused, not a ValueError."""
    from pathlib import Path

    text = os.fspath(path)
    if "\0" in (text.decode(errors="replace") if isinstance(text, bytes) else text):
        raise PathSecurityError(f"{field}: {text!r} contains a NUL byte")
    return Path(text)


def _safe_mode(mode: int, is_dir: bool) -> int:
    # Keep the owner's execute bit for scripts; never setuid, setgid or sticky.
    return (mode & 0o777) | (0o700 if is_dir else 0o600)


def _tarinfo(
    name: str, kind: bytes, mode: int, size: int, owner: tuple[int, int], mtime: float
) -> tarfile.TarInfo:
    import tarfile

    info = tarfile.TarInfo(name)
    info.type = kind
    # Without it, files land dated 1970: make sees stale targets, zip refuses them.
    info.mtime = int(mtime)
    info.mode = _safe_mode(mode, kind == tarfile.DIRTYPE)
    info.size = size
    info.uid, info.gid = owner
    info.uname = info.gname = ""
    return info


def _spooled() -> IO[bytes]:
    import tempfile

    return tempfile.SpooledTemporaryFile(max_size=_SPOOL)


def build_tar_from_bytes(name: str, data: bytes, mode: int, owner: tuple[int, int]) -> IO[bytes]:
    """An uncompressed tar holding one regular file ``name`` (a bare file name)."""
    import tarfile

    if "/" in name or name in ("", ".", ".."):
        raise PathSecurityError(f"{name!r} is not a file name")
    out = _spooled()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = _tarinfo(name, tarfile.REGTYPE, mode, len(data), owner, time.time())
        tar.addfile(info, io.BytesIO(data))
    out.seek(0)
    return out


def build_tar_from_path(source: Path, owner: tuple[int, int]) -> IO[bytes]:
    """An uncompressed tar of a local file or folder, named by its base name.

    Only regular files and folders go in; a symlink, device or socket anywhere in the
    tree is refused (PathSecurityError), since following it could ship host files the
    caller never meant to send.
    """
    import tarfile
    from pathlib import Path

    source = Path(source)
    root = source.name
    out = _spooled()
    try:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path, arcname in _walk(source, root):
                st = path.lstat()
                if stat.S_ISDIR(st.st_mode):
                    tar.addfile(
                        _tarinfo(arcname, tarfile.DIRTYPE, st.st_mode, 0, owner, st.st_mtime)
                    )
                elif stat.S_ISREG(st.st_mode):
                    with path.open("rb") as f:
                        info = _tarinfo(
                            arcname, tarfile.REGTYPE, st.st_mode, st.st_size, owner, st.st_mtime
                        )
                        tar.addfile(info, f)
                else:
                    raise PathSecurityError(
                        f"{path}: only regular files and folders can be uploaded"
                    )
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out


def _walk(source: Path, arcname: str) -> Iterator[tuple[Path, str]]:
    if not source.exists() and not source.is_symlink():
        raise ConfigError("source", f"{str(source)!r}: no such file or folder")
    yield source, arcname
    if source.is_dir() and not source.is_symlink():
        for child in sorted(source.iterdir()):
            yield from _walk(child, f"{arcname}/{child.name}")


class _ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks, for streaming tar reads."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: WriteableBuffer) -> int:
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        view = memoryview(target).cast("B")
        n = min(len(view), len(self._buffer))
        view[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


class _MemberData(io.RawIOBase):
    """A member's content as it streams in; a stream cut short (an engine's copy failing
    halfway) is an ArchiveError like any other broken archive, never tarfile's own."""

    def __init__(self, data: IO[bytes]) -> None:
        self._data = data

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        import tarfile  # loaded already: only iter_members makes these

        try:
            return self._data.read(-1 if size is None else size)
        except tarfile.TarError as e:
            raise ArchiveError(f"broken tar archive: {e}") from None

    def readinto(self, target: WriteableBuffer) -> int:
        view = memoryview(target).cast("B")
        chunk = self.read(len(view))
        view[: len(chunk)] = chunk
        return len(chunk)


def _member_name(member: tarfile.TarInfo) -> str:
    name = member.name
    if not name or "\0" in name or len(name) > _NAME_MAX:
        raise ArchiveError(f"archive member {name!r} has an invalid name")
    if name.startswith("/") or ".." in name.split("/"):
        raise ArchiveError(f"archive member {name!r} would land outside the destination")
    normal = posixpath.normpath(name)
    if normal in (".", ""):
        return "."
    return normal


def iter_members(
    chunks: Iterable[bytes] | IO[bytes], limits: ArchiveLimits = ArchiveLimits()
) -> Iterator[tuple[str, tarfile.TarInfo, IO[bytes] | None]]:
    """Each member of a tar stream as ``(normalised name, info, data)``, checked.

    Refuses (ArchiveError) links, devices, FIFOs and unsafe names; stops
    (ResourceLimitError) past the caps. ``data`` is None for folders and must be read
    before the next member is asked for.
    """
    import tarfile

    # A file is told from an iterable of chunks by its read method (a response body, a
    # pipe and an open file all have one; none is one class).
    if hasattr(chunks, "read"):
        fileobj = cast("IO[bytes]", chunks)
    else:
        fileobj = io.BufferedReader(_ChunkReader(chunks))
    total = members = 0
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|")  # noqa: SIM115
    except tarfile.TarError as e:
        raise ArchiveError(f"not a tar archive: {e}") from None
    with tar:
        try:
            for member in tar:
                members += 1
                if members > limits.max_members:
                    raise ResourceLimitError(
                        f"the archive has more than {limits.max_members} members"
                    )
                name = _member_name(member)
                if member.isdir():
                    yield name, member, None
                    continue
                if not member.isreg():
                    raise ArchiveError(
                        f"archive member {member.name!r} is not a regular file or a folder "
                        "(links and devices are never extracted)"
                    )
                if member.size > limits.max_file_bytes:
                    raise ResourceLimitError(
                        f"{member.name!r} is larger than {limits.max_file_bytes} bytes"
                    )
                total += member.size
                if total > limits.max_bytes:
                    raise ResourceLimitError(
                        f"the archive holds more than {limits.max_bytes} bytes"
                    )
                data = tar.extractfile(member)
                if data is None:  # tarfile gives None only for what is not a file
                    raise ArchiveError(f"archive member {member.name!r} has no data")
                yield name, member, io.BufferedReader(_MemberData(data))
        except tarfile.TarError as e:
            raise ArchiveError(f"broken tar archive: {e}") from None


def extract(
    chunks: Iterable[bytes] | IO[bytes], destination: Path, limits: ArchiveLimits = ArchiveLimits()
) -> Path:
    """Extract a tar stream so that its single top entry becomes ``destination``.

    ``destination`` must not exist. Everything is written first into a new, private
    folder beside it and moved into place at the end; on any failure that folder is
    removed, so a refused archive leaves nothing behind.
    """
    import shutil
    import tempfile
    from pathlib import Path

    destination = Path(destination)
    if destination.exists() or destination.is_symlink():
        raise ConflictError(f"{destination} already exists", retryable=False)
    staging = Path(tempfile.mkdtemp(prefix=".corral-download-", dir=destination.parent))
    try:
        top = None
        for name, member, data in iter_members(chunks, limits):
            head = name.split("/", 1)[0]
            if top is None:
                top = head
            elif head != top:
                raise ArchiveError(f"archive has more than one top entry ({top!r}, {head!r})")
            try:
                _write_member(staging / name, member, data)
            except (FileExistsError, NotADirectoryError):
                # A repeated name, or a file where a folder is needed: refuse, never merge.
                raise ArchiveError(f"archive member {name!r} clashes with an earlier one") from None
        if top is None:
            raise ArchiveError("the archive is empty")
        os.rename(staging / top, destination)
        return destination
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_member(target: Path, member: tarfile.TarInfo, data: IO[bytes] | None) -> None:
    import shutil

    if data is None:
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(target, _safe_mode(member.mode, True) & 0o777)
        return
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        shutil.copyfileobj(data, f)
    os.chmod(target, _safe_mode(member.mode, False) & 0o755)


def read_single_file(chunks: Iterable[bytes], max_bytes: int) -> bytes:
    """The content of the one regular file a tar stream holds (``read_file``)."""
    limits = ArchiveLimits(max_bytes=max_bytes, max_members=1, max_file_bytes=max_bytes)
    for name, _, data in iter_members(chunks, limits):
        if data is None:
            raise ConfigError("path", f"{name!r} is a folder, not a file")
        return data.read()
    raise ArchiveError("the archive is empty")
