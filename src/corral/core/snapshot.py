"""A captured sandbox (``Sandbox.snapshot``), which new sandboxes start from."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .results import SnapshotInfo

if TYPE_CHECKING:
    from .backend import Backend

__all__ = ["Snapshot"]


class Snapshot:
    """A sandbox's files (and, with ``memory=True``, its processes) as they were.

    ``corral.create(image=snapshot)`` starts a sandbox from it, on the backend that took
    it. It carries corral's labels, ``corral.snapshots()`` lists it, and ``corral gc``
    removes it once its own lifetime is over; ``remove()`` does at once.
    """

    def __init__(self, info: SnapshotInfo, backend: Backend) -> None:
        self.info = info
        self.backend = backend

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def image(self) -> str:
        """What ``create`` takes as its image to start from this snapshot."""
        return self.info.image

    @property
    def expires(self) -> float:
        return self.info.expires

    def __repr__(self) -> str:
        return f"<Snapshot {self.id} of sandbox {self.info.sandbox_id} on {self.backend.name}>"

    def remove(self) -> None:
        """Remove the snapshot (ConflictError while a sandbox still starts from it)."""
        self.backend.remove_snapshot(self.id)
