"""Snapshots and changes of a container sandbox (issue 15): the engine-neutral parts.

A snapshot is an image, ``corral-snapshot:<id>``, that ``create`` starts from. The
engines' commit captures the container's writable layer only, not its volumes: the
workspace and /tmp are tmpfs-backed volumes (``plan.TmpfsVolume``), so their files are
copied, through the archive API (links as links), into a holder container made from the
committed layer and never started, whose own commit is the snapshot. A sandbox created
from it gets them back in its volumes by the plan's copy-up on Podman; Docker loses
that copy in a tmpfs volume (it copies at create into a mount it then drops), so there
the holder stays with the snapshot and ``create`` puts its files in, engine to engine.
Nothing of a sandbox's files passes through corral but opaque tar bytes.

Changes compare a sandbox with a baseline taken when it was made: the writable layer
through the engine's diff, and every writable mount by a metadata walk from the host
(``/proc/<init>/root``, one ``lstat`` per entry, never following a link, never opening a
file). The baseline is a file of this host's, out of the sandbox's reach, which another
program (``corral.attach``) reads too; ``destroy`` removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import stat
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Literal

import attrs

from ...core.backend import SNAPSHOT_IMAGE
from ...core.errors import InternalError
from ...core.results import LEFTOVER_GRACE, Change, SnapshotInfo
from ...core.spec import SandboxSpec
from .naming import NAME_PREFIX, SPEC_LABEL
from .plan import ContainerPlan, plan

SNAPSHOT_LABEL = "corral.snapshot"
SNAPSHOT_REPO = SNAPSHOT_IMAGE  # the image's repository; its tag is the snapshot's id
# On the holder container: what it is for (its corral.managed is blanked, so that the
# engine's listing of sandboxes never shows it as the sandbox its image came from).
HOLDER_LABEL = "corral.snapshot-holder"
# The engines' diff kinds (Docker and Podman alike).
_KINDS: dict[int, Literal["added", "changed", "deleted"]] = {
    0: "changed",
    1: "added",
    2: "deleted",
}
# Deeper folders than this are listed but not walked into (one descriptor per level).
MAX_DEPTH = 256


def image_of(snapshot_id: str) -> str:
    """The image name ``create`` takes to start from the snapshot."""
    return f"{SNAPSHOT_IMAGE}:{snapshot_id}"


def holder_name(snapshot_id: str) -> str:
    return f"{NAME_PREFIX}snapshot-{snapshot_id}"


@attrs.frozen
class ListedImage:
    """An image as the engine lists it."""

    id: str
    tags: tuple[str, ...]
    labels: dict[str, str]
    size: int | None


def snapshot_labels(
    labels: dict[str, str],
    source: dict[str, str],
    *,
    backend: str,
    sandbox_id: str,
    snapshot_id: str,
) -> dict[str, str]:
    """The snapshot image's labels: ``labels`` (the caller's), with corral's own.

    A commit keeps every label of the container it captures (both engines merge them
    in, and a new container inherits its image's labels in turn): corral's labels of
    the source that the snapshot does not set itself (its spec, ``corral.loosened``)
    are blanked, so that they never describe a sandbox made from it. Without a
    ``corral.expires`` of the caller's, the snapshot ends with its sandbox.
    """
    blanked = {k: "" for k in source if k.startswith("corral.")}
    defaults = {
        "corral.created": str(int(time.time())),
        "corral.expires": source.get("corral.expires", "0"),
    }
    fixed = {
        "corral.managed": "true",
        "corral.backend": backend,
        "corral.sandbox": sandbox_id,
        SNAPSHOT_LABEL: snapshot_id,
    }
    return {**blanked, **defaults, **labels, **fixed}


def holder_labels(snapshot_id: str) -> dict[str, str]:
    """Labels of the holder container: not one of corral's sandboxes to list or gc."""
    return {
        "corral.managed": "",
        "corral.backend": "",
        "corral.sandbox": "",
        HOLDER_LABEL: snapshot_id,
    }


def copied_trees(spec: SandboxSpec, labels: dict[str, str], workspace_size: int) -> list[str]:
    """The folders a snapshot carries beyond the writable layer: the tmpfs volumes that
    a new sandbox fills from its image (the workspace and /tmp). A tmpfs the spec asks
    for starts empty in any sandbox, so its files are not kept; bind mounts and named
    volumes are the host's and the engine's, not the sandbox's."""
    # The plan's tmpfs volumes only: not its other parts (a seccomp profile's file).
    bare = attrs.evolve(spec, security=attrs.evolve(spec.security, seccomp=None))
    made = plan(bare, labels, image="-", workspace_size=workspace_size)
    return [t.target for t in made.tmpfs_volumes if t.copy_up]


def parent_of(tree: str) -> str:
    """Where a tree's archive (whose members start with the tree's own name) unpacks."""
    return posixpath.dirname(posixpath.normpath(tree)) or "/"


def contents_of(tree: str) -> str:
    """The archive path of a folder's entries (named ``./...``), to unpack into it."""
    return posixpath.normpath(tree).rstrip("/") + "/."


def listing(backend: str, images: Iterable[ListedImage]) -> dict[str, SnapshotInfo]:
    """Snapshots by id. The tagged image is the snapshot; an untagged one carrying its
    label is what a snapshot cut short left (listed, so that gc removes it)."""
    found: dict[str, SnapshotInfo] = {}
    for image in images:
        info = info_of(backend, image)
        if info is None:
            continue
        tagged = any(t.endswith(image_of(info.id)) for t in image.tags)
        if info.id not in found or tagged:
            found[info.id] = info
    return found


def info_of(backend: str, image: ListedImage) -> SnapshotInfo | None:
    """The snapshot an image of corral's is, from its labels; None for another image."""
    labels = image.labels or {}
    snapshot_id = labels.get(SNAPSHOT_LABEL)
    if not snapshot_id or labels.get("corral.backend") != backend:
        return None
    if labels.get("corral.managed") != "true":
        return None
    public = {k: v for k, v in labels.items() if k != SPEC_LABEL and v != ""}
    return SnapshotInfo(
        id=snapshot_id,
        backend=backend,
        image=image_of(snapshot_id),
        sandbox_id=labels.get("corral.sandbox", ""),
        created=_number(labels.get("corral.created")),
        expires=_number(labels.get("corral.expires")),
        memory=False,
        size=image.size,
        labels=public,
    )


def _number(text: str | None) -> float:
    try:
        return float(text or 0)
    except ValueError:
        return 0.0


def spooled_archive(chunks: Iterable[bytes]) -> IO[bytes]:
    """The tar stream, whole, in a temporary file of this host's, rewound: read while the
    sandbox is paused, sent once it runs again. Opaque bytes, never unpacked here."""
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller, who closes it
    try:
        for chunk in chunks:
            spool.write(chunk)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool


# -- changes: the baseline --------------------------------------------------------------

# What each walked entry is compared by: type and mode, owner, size, modification and
# change times (ns) and inode. Metadata only: a file's bytes are never read.
Meta = tuple[int, int, int, int, int, int, int]


def _meta(found: os.stat_result) -> Meta:
    return (
        found.st_mode,
        found.st_uid,
        found.st_gid,
        found.st_size,
        found.st_mtime_ns,
        found.st_ctime_ns,
        found.st_ino,
    )


def writable_trees(plan: ContainerPlan) -> list[str]:
    """Every folder mounted writable: the tmpfs volumes, and read-write binds and
    volumes (walked from the host, as the sandbox sees them)."""
    trees = [t.target for t in plan.tmpfs_volumes]
    trees += [b.target for b in plan.binds if not b.read_only]
    trees += [v.target for v in plan.volumes if not v.read_only]
    return list(dict.fromkeys(posixpath.normpath(t) for t in trees))


def mount_targets(plan: ContainerPlan) -> list[str]:
    """Every mount of the plan's: the writable layer's entries there are the engine's
    mount points, not the sandbox's files."""
    targets = [t.target for t in plan.tmpfs_volumes] + [b.target for b in plan.binds]
    targets += [v.target for v in plan.volumes]
    return list(dict.fromkeys(posixpath.normpath(t) for t in targets))


def is_own(path: str) -> bool:
    """corral's own files in a sandbox, never listed as changes: ``/.corral-*`` (the
    movable lifetime's timer) and ``/tmp/.corral-*`` (the repository plugin's helper and
    credential files), with everything below them."""
    return path.startswith(("/.corral-", "/tmp/.corral-"))


def _under(path: str, folders: Iterable[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def walk(pid: int, trees: Iterable[str]) -> dict[str, Meta]:
    """Every entry under ``trees`` in the container whose init is ``pid``, by path, seen
    from the host: each folder opened below the container's root one name at a time
    with O_NOFOLLOW (a link of the sandbox's never leads the host's root to its own
    files), each entry ``lstat``ed, nothing below another filesystem walked."""
    found: dict[str, Meta] = {}
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for tree in trees:
            top = _open_inside(root, tree)
            if top is None:
                continue  # not there (or not a plain folder): nothing to list
            try:
                _walk_folder(top, tree, found)
            finally:
                os.close(top)
    finally:
        os.close(root)
    return found


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_STEP_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_inside(root: int, path: str) -> int | None:
    folder = os.dup(root)
    try:
        for part in [p for p in path.split("/") if p]:
            inner = os.open(part, _STEP_FLAGS, dir_fd=folder)
            os.close(folder)
            folder = inner
        # Readable, for its entries: reopened through its own descriptor, not by name.
        readable = os.open(".", _DIR_FLAGS, dir_fd=folder)
    except OSError:
        os.close(folder)
        return None
    os.close(folder)
    return readable


def _walk_folder(top: int, top_path: str, found: dict[str, Meta]) -> None:
    device = os.fstat(top).st_dev
    found[top_path] = _meta(os.fstat(top))
    # A stack of (folder descriptor, its path, depth); each folder is listed whole, then
    # its subfolders are walked one at a time, so at most one descriptor per level.
    stack: list[tuple[int, str, int]] = [(os.dup(top), top_path, 0)]
    while stack:
        fd, path, depth = stack.pop()
        subfolders: list[str] = []
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        meta = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # removed meanwhile
                    child = posixpath.join(path, entry.name)
                    found[child] = _meta(meta)
                    if stat.S_ISDIR(meta.st_mode) and meta.st_dev == device:
                        subfolders.append(entry.name)
            if depth + 1 < MAX_DEPTH:
                for name in reversed(subfolders):
                    with contextlib.suppress(OSError):  # removed or replaced meanwhile
                        sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                        if os.fstat(sub).st_dev != device:
                            os.close(sub)
                            continue
                        stack.append((sub, posixpath.join(path, name), depth + 1))
        finally:
            os.close(fd)


def compare(before: dict[str, Meta], after: dict[str, Meta]) -> list[Change]:
    """Added, changed (any of ``Meta`` differs) and deleted entries."""
    out = [Change(p, "added") for p in after.keys() - before.keys()]
    out += [Change(p, "deleted") for p in before.keys() - after.keys()]
    out += [Change(p, "changed") for p in after.keys() & before.keys() if after[p] != before[p]]
    return [c for c in out if not is_own(c.path)]


def layer_changes(
    now: Iterable[tuple[str, int]], baseline: Iterable[tuple[str, int]], mounts: list[str]
) -> list[Change]:
    """The engine's diff of the writable layer, less what it said at create (the mount
    points and files the engine itself made) and anything at or under a mount."""
    known = {(p, k) for p, k in baseline}
    return [
        Change(path, _KINDS.get(kind, "changed"))
        for path, kind in now
        if (path, kind) not in known and not _under(path, mounts) and not is_own(path)
    ]


@attrs.frozen
class Baseline:
    """What a sandbox was when made: its walked trees, and (a writable root) the engine's
    diff of its layer then; ``mounts`` are the layer's paths that are not its own."""

    trees: list[str]
    mounts: list[str]
    entries: dict[str, Meta]
    layer: list[tuple[str, int]] | None


def baseline_folder(backend: str) -> Path:
    return Path(tempfile.gettempdir()) / f"corral-{os.geteuid()}" / "changes" / backend


def _private(path: Path) -> None:
    """``path`` and its parents below the temp folder, each this user's own and closed
    to others (the temp folder is everyone's: a folder planted there by another user
    must not hold the baselines)."""
    at = Path(tempfile.gettempdir())
    for part in path.relative_to(at).parts:
        at = at / part
        with contextlib.suppress(FileExistsError):
            os.mkdir(at, 0o700)
        found = os.lstat(at)
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid() or found.st_mode & 0o022:
            raise InternalError(f"{at} is not a private folder of this user; remove it")


def save_baseline(backend: str, sandbox_id: str, baseline: Baseline) -> None:
    folder = baseline_folder(backend)
    _private(folder)
    record = {
        "trees": baseline.trees,
        "mounts": baseline.mounts,
        "entries": baseline.entries,
        "layer": baseline.layer,
    }
    # Written whole, then renamed: a reader never sees half a file.
    temp = folder / f".{sandbox_id}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(record, out, separators=(",", ":"))
    os.replace(temp, folder / f"{sandbox_id}.json")


def load_baseline(backend: str, sandbox_id: str) -> Baseline | None:
    try:
        record = json.loads((baseline_folder(backend) / f"{sandbox_id}.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise InternalError(f"the sandbox's baseline of changes is unreadable: {e}") from e
    layer = record.get("layer")
    return Baseline(
        trees=list(record["trees"]),
        mounts=list(record["mounts"]),
        entries={p: tuple(m) for p, m in record["entries"].items()},
        layer=None if layer is None else [(p, int(k)) for p, k in layer],
    )


def drop_baseline(backend: str, sandbox_id: str) -> None:
    with contextlib.suppress(OSError):
        (baseline_folder(backend) / f"{sandbox_id}.json").unlink()


_swept: set[str] = set()


def sweep_due(backend: str) -> bool:
    """True once per program and backend: when to look for stale baselines."""
    if backend in _swept:
        return False
    _swept.add(backend)
    return True


def stale_baselines(backend: str) -> list[str]:
    """Sandbox ids of baselines older than a minute (their sandbox may have ended on its
    own, its container removed by the engine): candidates the caller checks against
    the engine's listing, taken after this (a baseline is written once its container
    runs, so a younger one is never taken for gone)."""
    folder = baseline_folder(backend)
    old = time.time() - LEFTOVER_GRACE
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name.endswith(".json") and entry.stat(follow_symlinks=False).st_mtime < old:
                found.append(entry.name.removesuffix(".json"))
    return found
