"""File transfers as the hooks see them: what is copied, which way, and how many bytes."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Literal

import attrs

from . import archive

if TYPE_CHECKING:
    from pathlib import Path

    from .sandbox import Sandbox

__all__ = ["FileTransfer", "Transferred", "perform"]

Operation = Literal["write_file", "read_file", "upload", "download"]
_INWARD = frozenset({"write_file", "upload"})


@attrs.frozen
class FileTransfer:
    """One copy into or out of a sandbox, checked, before it runs.

    Attributes:
        operation: the Sandbox method: ``write_file``, ``read_file``, ``upload`` or
            ``download``.
        path: the path inside the sandbox: the file written or read, upload's
            destination folder, download's source.
        host_path: upload's local source or download's local destination; else None.
        data: write_file's content (not in the repr).
        mode: write_file's file mode.
        max_size: read_file's cap, in bytes.
        limits: download's caps.
    """

    operation: Operation
    path: str
    host_path: str | None = None
    data: bytes | None = attrs.field(default=None, repr=False)
    mode: int = 0o644
    max_size: int = 256 * 1024**2
    limits: archive.ArchiveLimits = archive.ArchiveLimits()

    @property
    def direction(self) -> Literal["in", "out"]:
        """``in`` for what goes into the sandbox, ``out`` for what comes out."""
        return "in" if self.operation in _INWARD else "out"


@attrs.frozen
class Transferred:
    """What a transfer moved.

    Attributes:
        size: bytes moved: the file's content for write_file and read_file, the tar
            stream for upload and download.
        data: read_file's content; else None (not in the repr).
        local: download's new local path; else None.
    """

    size: int
    data: bytes | None = attrs.field(default=None, repr=False)
    local: Path | None = None


class _Counted:
    """Chunks passed through as they are, their bytes counted."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.size += len(chunk)
            yield chunk


def perform(sandbox: Sandbox, transfer: FileTransfer) -> Transferred:
    """Run ``transfer`` on the sandbox's backend: the core's answer to ``corral_transfer``."""
    backend, sandbox_id = sandbox.backend, sandbox.id
    owner = sandbox.spec.uid_gid() or (0, 0)
    if transfer.operation == "write_file":
        data = transfer.data or b""
        folder, name = posixpath.split(transfer.path)
        with archive.build_tar_from_bytes(name, data, transfer.mode, owner) as tar:
            backend.put_archive(sandbox_id, folder, tar)
        return Transferred(len(data))
    if transfer.operation == "upload":
        local = archive.check_host_path(transfer.host_path or "", "source")
        with archive.build_tar_from_path(local, owner) as tar:
            size = tar.seek(0, 2)
            tar.seek(0)
            backend.put_archive(sandbox_id, transfer.path, tar)
        return Transferred(size)
    stream = backend.get_archive(sandbox_id, transfer.path)
    chunks = _Counted(stream)
    # Closed here, also when the archive is refused half-read (a 4 GiB sparse file): a
    # stream left to the garbage collector keeps the engine's connection, and the
    # engine sending, until then (an error's traceback holds this frame).
    try:
        if transfer.operation == "read_file":
            content = archive.read_single_file(chunks, transfer.max_size)
            return Transferred(len(content), data=content)
        target = archive.check_host_path(transfer.host_path or "", "destination")
        local = archive.extract(chunks, target, transfer.limits)
        return Transferred(chunks.size, local=local)
    finally:
        close = getattr(stream, "close", None)  # a generator's; an iterator may have none
        if close is not None:
            close()
