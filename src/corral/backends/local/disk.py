"""A size-capped sandbox folder: a tmpfs of its own, mounted over it when corral is root.

A local sandbox's workspace and /tmp are folders on the host, so without a cap a command
could fill the host's disk. A tmpfs mounted on the sandbox folder bounds them, and its
pages are charged to the memory cgroup of whoever writes them (the sandbox's own).
"""

from __future__ import annotations

import ctypes
import errno
import os

__all__ = ["mount_capped", "unmount"]

_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def mount_capped(folder: str, size: int) -> None:
    """Mount a tmpfs of ``size`` bytes on ``folder`` (root only); OSError on failure."""
    options = f"size={size},mode=0711".encode()
    flags = _MS_NOSUID | _MS_NODEV
    if _libc.mount(b"tmpfs", os.fsencode(folder), b"tmpfs", flags, options) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot mount a tmpfs on {folder}: {os.strerror(code)}")


def unmount(folder: str) -> None:
    """Detach the tmpfs on ``folder``, if there is one (its memory is freed once unused)."""
    if _libc.umount2(os.fsencode(folder), _MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):  # not a mount point, or gone
            raise OSError(code, f"cannot unmount {folder}: {os.strerror(code)}")
