"""What a local sandbox changed: a manifest of its writable folders, compared later.

At create (after a snapshot's files are copied in) the backend lists every entry under
the sandbox's own writable folders with ``lstat`` alone (type, mode, size, times, inode;
never a file's contents, so a file the sandbox made unreadable is listed as well) and
keeps that baseline in the sandbox's state folder, beside its metadata, where the
sandbox's code cannot reach it. ``changes`` lists the folders again and compares.
The folders' own entries are left out: their times move with every file made in them.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable

from ...core.results import Change

__all__ = ["compare", "load", "manifest", "save"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_DEPTH = 256  # deeper folders are listed, their contents not (a descriptor per level)
Entry = list[int]  # file type, mode, size, mtime, ctime (ns), inode
Manifest = dict[str, Entry]


def _entry(st: os.stat_result) -> Entry:
    return [
        stat.S_IFMT(st.st_mode),
        stat.S_IMODE(st.st_mode),
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
    ]


def manifest(roots: Iterable[tuple[str, str]]) -> Manifest:
    """Every entry below each root, as (sandbox path prefix, host folder) pairs, by its
    path in the sandbox."""
    found: Manifest = {}
    for prefix, folder in roots:
        try:
            fd = os.open(folder, _DIR_FLAGS)
        except OSError:
            continue
        try:
            _walk(fd, prefix.rstrip("/"), found, 0)
        finally:
            os.close(fd)
    return found


def _walk(fd: int, prefix: str, found: Manifest, depth: int) -> None:
    try:
        names = os.listdir(fd)
    except OSError:  # a folder this program may not list: its entry says it is there
        return
    for name in names:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:  # removed meanwhile
            continue
        path = f"{prefix}/{name}"
        found[path] = _entry(st)
        if stat.S_ISDIR(st.st_mode) and depth + 1 < MAX_DEPTH:
            try:
                inner = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue
            try:
                _walk(inner, path, found, depth + 1)
            finally:
                os.close(inner)


def compare(before: Manifest, after: Manifest) -> list[Change]:
    """Added, changed and deleted paths, sorted by path."""
    changes = [Change(path, "deleted") for path in before.keys() - after.keys()]
    for path, entry in after.items():
        old = before.get(path)
        if old is None:
            changes.append(Change(path, "added"))
        elif old != entry:
            changes.append(Change(path, "changed"))
    return sorted(changes, key=lambda c: c.path)


def save(path: str, found: Manifest) -> None:
    """Write the baseline at ``path`` (a folder of corral's the sandbox cannot see)."""
    with open(path, "x") as f:
        f.write(json.dumps(found, separators=(",", ":")))


def load(path: str) -> Manifest:
    """The baseline; an empty one where none was kept (a sandbox made before)."""
    try:
        with open(path) as f:
            return {k: list(v) for k, v in json.load(f).items()}
    except FileNotFoundError:
        return {}
