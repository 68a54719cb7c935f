"""A size-capped sandbox folder: a tmpfs of its own, mounted over it when corral is root.

A local sandbox's workspace and /tmp are folders on the host, so without a cap a command
could fill the host's disk. A tmpfs mounted on the sandbox folder bounds them, and its
pages are charged to the memory cgroup of whoever writes them (the sandbox's own). Each
``Tmpfs`` of a spec is a tmpfs of its own there too, mounted below the folder.
"""

from __future__ import annotations

import ctypes
import errno
import os

__all__ = ["mount_capped", "mount_tmpfs", "unmount"]

_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def mount_capped(folder: str, size: int) -> None:
    """Mount a tmpfs of ``size`` bytes on ``folder`` (root only); OSError on failure."""
    mount_tmpfs(folder, size, 0o711)


def mount_tmpfs(
    folder: str,
    size: int,
    mode: int,
    owner: tuple[int, int] | None = None,
    *,
    executable: bool = True,
) -> None:
    """Mount a tmpfs of ``size`` bytes on ``folder``, its root of ``mode`` and ``owner``,
    noexec unless ``executable`` (root only); OSError on failure. A bind of it keeps
    those flags, and one into a user namespace cannot lift them."""
    options = f"size={size},mode={mode & 0o7777:o}"
    if owner is not None:
        options += f",uid={owner[0]},gid={owner[1]}"
    flags = _MS_NOSUID | _MS_NODEV | (0 if executable else _MS_NOEXEC)
    if _libc.mount(b"tmpfs", os.fsencode(folder), b"tmpfs", flags, options.encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot mount a tmpfs on {folder}: {os.strerror(code)}")


def unmount(folder: str) -> None:
    """Detach the tmpfs on ``folder``, if there is one, with every mount below it (its
    memory is freed once unused)."""
    if _libc.umount2(os.fsencode(folder), _MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):  # not a mount point, or gone
            raise OSError(code, f"cannot unmount {folder}: {os.strerror(code)}")
