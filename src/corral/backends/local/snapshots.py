"""Snapshots of local sandboxes: a copy of what a sandbox can write, under corral's state.

A snapshot is a folder of corral's (``{state}/local-snapshots/ID``, private to the
user corral runs as) holding a copy of each of the sandbox's own writable folders (its
workspace, its /tmp, its host tmpfs mounts) and ``snapshot.json`` (its labels). A
sandbox made with ``image="corral-snapshot:ID"`` starts with those folders copied in.

The sandbox's code wrote every byte and name being copied, and may still be running:
the copy walks by file descriptor from a folder corral opened, never following a link
(a symlink is copied as a link, to whatever it names, which is only ever resolved inside
a sandbox), opens each file with ``O_NOFOLLOW`` and checks it is still a regular file,
skips FIFOs, sockets and devices, copies only a sparse file's data (its holes stay
holes) and drops set-id bits. A snapshot appears under its id by a rename once complete,
and disappears by one before it is removed: a half-made one is never listed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator

from ...core.backend import SNAPSHOT_IMAGE
from ...core.errors import ConfigError, ConflictError, NotFoundError, ResourceLimitError
from ...core.results import SnapshotInfo

__all__ = ["SnapshotStore", "copy_tree"]

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_DEPTH = 256  # folders nested deeper are refused: each level holds two descriptors
_CHUNK = 1024 * 1024
_META = "snapshot.json"


def check_id(snapshot_id: str) -> str:
    if not _ID.fullmatch(snapshot_id):
        raise ConfigError("snapshot", f"{snapshot_id!r} is not a snapshot id", backend="local")
    return snapshot_id


class SnapshotStore:
    """The local backend's snapshots, in folder ``root``."""

    def __init__(self, root: str) -> None:
        self.root = root

    def _folder(self, snapshot_id: str) -> str:
        return os.path.join(self.root, check_id(snapshot_id))

    def take(
        self,
        snapshot_id: str,
        sources: dict[str, str],
        sandbox_id: str,
        labels: dict[str, str],
    ) -> SnapshotInfo:
        """Copy each host folder of ``sources`` (key: its name in the snapshot)."""
        final = self._folder(snapshot_id)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if os.path.lexists(final):
            raise ConflictError(f"a snapshot {snapshot_id} exists already", backend="local")
        staging = os.path.join(self.root, f".staging-{snapshot_id}-{uuid.uuid4().hex[:8]}")
        os.mkdir(staging, 0o700)
        try:
            size = 0
            with _opened(staging) as into:
                for key, folder in sources.items():
                    os.mkdir(key, 0o700, dir_fd=into)
                    with _opened(folder) as src, _opened(key, into) as dst:
                        size += copy_tree(src, dst, None)
                        _copy_attributes(os.fstat(src), dst, None)
            created = time.time()
            info = SnapshotInfo(
                id=snapshot_id,
                backend="local",
                image=f"{SNAPSHOT_IMAGE}:{snapshot_id}",
                sandbox_id=sandbox_id,
                created=created,
                expires=_expires(labels),
                size=size,
                labels=dict(labels),
            )
            meta = {"sandbox_id": sandbox_id, "created": created, "size": size, "labels": labels}
            with open(os.path.join(staging, _META), "x") as f:
                f.write(json.dumps(meta))
            try:
                os.rename(staging, final)  # to a missing name only: an empty folder...
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise ConflictError(
                        f"a snapshot {snapshot_id} exists already", backend="local"
                    ) from None
                raise
            return info
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def restore(
        self, snapshot_id: str, targets: dict[str, str], owner: tuple[int, int] | None
    ) -> None:
        """Copy the snapshot's folders into ``targets`` (key: the name in the snapshot;
        the host folders, made and empty), owned by ``owner`` where given."""
        folder = self._folder(snapshot_id)
        if not os.path.isfile(os.path.join(folder, _META)):
            raise NotFoundError(f"no snapshot {snapshot_id}", backend="local")
        with _opened(folder) as snapshot:
            for key, target in targets.items():
                try:
                    src_fd = os.open(key, _DIR_FLAGS, dir_fd=snapshot)
                except FileNotFoundError:
                    continue  # the snapshot's sandbox had no such folder
                try:
                    with _opened(target) as dst:
                        copy_tree(src_fd, dst, owner)
                        _copy_attributes(os.fstat(src_fd), dst, owner)
                finally:
                    os.close(src_fd)

    def exists(self, snapshot_id: str) -> bool:
        return os.path.isfile(os.path.join(self._folder(snapshot_id), _META))

    def list(self) -> list[SnapshotInfo]:
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            if name.startswith(".") or not _ID.fullmatch(name):
                continue
            try:
                with open(os.path.join(self.root, name, _META)) as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue  # being removed
            labels = meta.get("labels", {})
            found.append(
                SnapshotInfo(
                    id=name,
                    backend="local",
                    image=f"{SNAPSHOT_IMAGE}:{name}",
                    sandbox_id=meta.get("sandbox_id", ""),
                    created=float(meta.get("created", 0)),
                    expires=_expires(labels),
                    size=meta.get("size"),
                    labels=labels,
                )
            )
        return found

    def remove(self, snapshot_id: str) -> None:
        """Remove a snapshot; gone already is fine."""
        folder = self._folder(snapshot_id)
        doomed = os.path.join(self.root, f".removing-{snapshot_id}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(folder, doomed)  # unlisted at once, removed after
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)  # fd-based: never follows a link


def _expires(labels: dict[str, str]) -> float:
    try:
        return float(labels["corral.expires"])
    except (KeyError, ValueError):
        return math.inf


@contextlib.contextmanager
def _opened(path: str, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def copy_tree(src: int, dst: int, owner: tuple[int, int] | None, depth: int = 0) -> int:
    """Copy folder ``src``'s entries into folder ``dst`` (both fds), never following a
    link; owned by ``owner``, or as they were (as root) with None. The bytes copied."""
    if depth >= MAX_DEPTH:
        raise ResourceLimitError(
            f"folders nested more than {MAX_DEPTH} deep cannot be copied", backend="local"
        )
    size = 0
    for name in os.listdir(src):
        try:
            st = os.stat(name, dir_fd=src, follow_symlinks=False)
        except FileNotFoundError:  # removed by the sandbox meanwhile
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                inner = os.open(name, _DIR_FLAGS, dir_fd=src)
            except PermissionError:
                raise _unreadable(name) from None
            except OSError:  # replaced by a link or removed meanwhile
                continue
            try:
                os.mkdir(name, 0o700, dir_fd=dst)
                with _opened(name, dst) as copy:
                    size += copy_tree(inner, copy, owner, depth + 1)
                    _copy_attributes(os.fstat(inner), copy, owner)
            finally:
                os.close(inner)
        elif stat.S_ISREG(st.st_mode):
            size += _copy_file(src, dst, name, owner)
        elif stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(name, dir_fd=src)
            except OSError:
                continue
            os.symlink(target, name, dir_fd=dst)
            ids = owner or (st.st_uid, st.st_gid)
            if os.geteuid() == 0:
                os.chown(name, *ids, dir_fd=dst, follow_symlinks=False)
            times = (st.st_atime_ns, st.st_mtime_ns)
            os.utime(name, ns=times, dir_fd=dst, follow_symlinks=False)
        # FIFOs, sockets and devices are skipped: nothing to copy, and a hang to avoid.
    return size


def _copy_file(src: int, dst: int, name: str, owner: tuple[int, int] | None) -> int:
    try:
        fd_in = os.open(name, _FILE_FLAGS, dir_fd=src)
    except PermissionError:
        raise _unreadable(name) from None
    except OSError:  # swapped for a link or a FIFO, or removed, since it was listed
        return 0
    try:
        st = os.fstat(fd_in)
        if not stat.S_ISREG(st.st_mode):
            return 0
        fd_out = os.open(name, _NEW_FILE, 0o600, dir_fd=dst)
        try:
            copied = _copy_data(fd_in, fd_out, st.st_size)
            _copy_attributes(st, fd_out, owner)
        finally:
            os.close(fd_out)
        return copied
    finally:
        os.close(fd_in)


def _unreadable(name: str) -> ConflictError:
    """Without root, corral reads the sandbox's files as their owner, whose mode bits
    may deny it: the snapshot is refused rather than taken without the file."""
    return ConflictError(
        f"{name!r} in the sandbox denies corral reading it (corral runs without root): "
        "the snapshot would miss it",
        backend="local",
        retryable=False,
        fix="let its owner read it (chmod u+r) before the snapshot, or run corral as root",
    )


def _copy_data(fd_in: int, fd_out: int, size: int) -> int:
    """Copy a file's data extents (holes stay holes), up to the size it had when looked
    at; the bytes copied."""
    copied = position = 0
    while position < size:
        try:
            start = os.lseek(fd_in, position, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: only a hole is left
                raise
            break
        end = min(os.lseek(fd_in, start, os.SEEK_HOLE), size)
        offset = start
        while offset < end:
            data = os.pread(fd_in, min(_CHUNK, end - offset), offset)
            if not data:  # it shrank meanwhile
                end = offset
                break
            os.pwrite(fd_out, data, offset)
            offset += len(data)
        if end <= start:
            break
        copied += end - start
        position = end
    os.ftruncate(fd_out, size)
    return copied


def _copy_attributes(st: os.stat_result, fd: int, owner: tuple[int, int] | None) -> None:
    """Mode (without set-id bits), owner and times of ``st`` onto ``fd``."""
    ids = owner or (st.st_uid, st.st_gid)
    if os.geteuid() == 0:
        os.fchown(fd, *ids)
    os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
