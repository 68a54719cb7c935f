"""Movable lifetimes: ``extend`` on an engine of this host.

A sandbox's end is the ``corral.expires`` label (immutable on the engines) and its
PID 1's sleep. A sandbox made on a local engine gets a host folder of its own:
``expires`` there is the moved end that ``list``, ``inspect`` and ``gc`` report, and
``timer/extra`` (the seconds the end was moved past the label's) is bound read-only
into the container, where PID 1 (``plan.movable_init_command``) reads it each time
its sleep ends. The sandbox cannot move its own end: the folder is the host's, bound
read-only, and the record that ``gc`` trusts is outside what is bound at all.

The folders live under ``$TMPDIR/corral-lifetimes-<euid>/<backend>/<sandbox>/``, the
user's own and readable by others (another user's ``corral ls`` sees the moved end),
writable by the user only. The label ``corral.lifetime`` names the folder, so any
program of this host finds it from the container alone.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import attrs

from ...core.errors import InternalError
from ...core.results import SandboxInfo

LABEL = "corral.lifetime"
# How old a folder of a sandbox the engine does not list must be to be swept: its
# sandbox may still be being made (its image pulled, say).
_GRACE = 600.0


def root() -> Path:
    return Path(tempfile.gettempdir()) / f"corral-lifetimes-{os.geteuid()}"


def _own_folder(path: Path) -> None:
    """Make ``path`` (if missing) and check it is this user's, a real folder, and
    writable by no one else: the temp folder is everyone's, and a folder another user
    planted there would let them move this user's sandboxes' ends."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o755)
    found = os.lstat(path)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid() or found.st_mode & 0o022:
        raise InternalError(f"{path} is not a folder of this user's alone; remove it")


def prepare(backend: str, sandbox_id: str) -> Path:
    """The new sandbox's folder, its timer at zero (the label's end)."""
    base = root()
    _own_folder(base)
    _own_folder(base / backend)
    folder = base / backend / sandbox_id
    _own_folder(folder)
    _own_folder(folder / "timer")
    _write(folder / "timer" / "extra", "0\n")
    return folder


def _write(path: Path, text: str) -> None:
    """Replace ``path`` at once (a reader never sees half a number)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def folder_of(labels: dict[str, str], backend: str, sandbox_id: str) -> Path | None:
    """The folder a sandbox's labels name, if it is one of this scheme's (a label is
    only read where a sandbox's folder can be)."""
    named = labels.get(LABEL)
    if not named:
        return None
    path = Path(named)
    if path.name != sandbox_id or path.parent.name != backend:
        return None
    return path


def moved_expires(labels: dict[str, str], backend: str, sandbox_id: str) -> float | None:
    """The end ``extend`` moved the sandbox to; None when never moved (or unreadable)."""
    folder = folder_of(labels, backend, sandbox_id)
    if folder is None:
        return None
    try:
        return float((folder / "expires").read_text())
    except (OSError, ValueError):
        return None


def with_moved_expires(info: SandboxInfo) -> SandboxInfo:
    """``info`` with the end ``extend`` moved it to, if it was."""
    moved = moved_expires(info.labels, info.backend, info.id)
    return info if moved is None else attrs.evolve(info, expires=moved)


def move(folder: Path, label_expires: float, expires: float) -> None:
    """Move the end to ``expires``: the record first (so that ``gc`` never sees the
    old end while PID 1 already sleeps longer), then PID 1's timer. PID 1 sleeps at
    least to the label's end: an end moved before it is kept by ``gc`` alone."""
    _write(folder / "expires", f"{expires!r}\n")
    extra = max(0, math.ceil(expires - label_expires))
    _write(folder / "timer" / "extra", f"{extra}\n")


def remove(backend: str, sandbox_id: str) -> None:
    shutil.rmtree(root() / backend / sandbox_id, ignore_errors=True)


def sweep(backend: str, live: set[str]) -> None:
    """Remove the folders of sandboxes not in ``live`` (the engine's list: their
    containers ended by themselves, and nothing called destroy), once a while old so
    that a sandbox being made is left alone."""
    now = time.time()
    with contextlib.suppress(OSError):
        for folder in (root() / backend).iterdir():
            with contextlib.suppress(OSError):
                if folder.name not in live and folder.stat().st_mtime < now - _GRACE:
                    shutil.rmtree(folder, ignore_errors=True)
