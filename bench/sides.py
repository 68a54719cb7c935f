"""The two sides of every measurement: corral, and a raw client doing the same work.

A side makes a ready sandbox, runs ``true`` in it, reads its usage, copies a file in and
out, destroys it, and keeps a warm pool. ``CorralSide`` does it through corral's public
API on any backend; each backend module has its raw side (docker-py, podman-py, bwrap).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import corral

_POOL_FILL_TIMEOUT = 120.0


class Side:
    """The work both sides do; a handle is whatever the side's sandbox is."""

    name = "?"

    def create(self) -> Any:
        raise NotImplementedError

    def destroy(self, handle: Any) -> None:
        raise NotImplementedError

    def exec_true(self, handle: Any) -> None:
        raise NotImplementedError

    def usage(self, handle: Any) -> None:
        raise NotImplementedError

    def write(self, handle: Any, name: str, data: bytes) -> None:
        raise NotImplementedError

    def read(self, handle: Any, name: str) -> bytes:
        raise NotImplementedError

    def alive(self, handle: Any) -> bool:
        """What a pool checks before hand-out (raw sides: one inspect, as corral does)."""
        raise NotImplementedError

    def pool(self, size: int) -> Any:
        return RawPool(self, size)

    def leftovers(self) -> list[str]:
        """What this side made and has not removed (containers, folders)."""
        raise NotImplementedError

    def cleanup(self) -> None:
        """Remove every leftover; never raises."""

    def close(self) -> None:
        """Close clients."""

    def cycle(self) -> None:
        """Create, exec, destroy: the full cold cycle (and the concurrency worker)."""
        handle = self.create()
        try:
            self.exec_true(handle)
        finally:
            self.destroy(handle)


class RawPool:
    """A raw client's warm pool: sandboxes made ahead, handed out once after an inspect."""

    def __init__(self, side: Side, size: int) -> None:
        self.side = side
        self.size = size
        self.ready: list[Any] = []
        self.fill()

    def fill(self) -> None:
        while len(self.ready) < self.size:
            self.ready.append(self.side.create())

    @contextlib.contextmanager
    def acquire(self) -> Iterator[Any]:
        while True:
            handle = self.ready.pop(0)
            if self.side.alive(handle):
                break
            self.side.destroy(handle)
        try:
            yield handle
        finally:
            self.side.destroy(handle)

    def close(self) -> None:
        for handle in self.ready:
            self.side.destroy(handle)
        self.ready.clear()


class CorralPool:
    """corral.Pool, with ``fill()`` waiting (untimed) until it is full again."""

    def __init__(self, pool: corral.Pool) -> None:
        self.pool = pool

    def fill(self) -> None:
        deadline = time.monotonic() + _POOL_FILL_TIMEOUT
        while self.pool.stats().ready < self.pool.size:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the pool did not fill: {self.pool.stats()}")
            time.sleep(0.005)

    def acquire(self) -> Any:
        return self.pool.acquire()

    def close(self) -> None:
        self.pool.close()


class CorralSide(Side):
    """corral's public API on one backend, with the run's label on every sandbox."""

    name = "corral"

    def __init__(
        self,
        backend: str,
        settings: corral.Settings,
        labels: dict[str, str],
        leftovers: Callable[[], list[str]],
        cleanup: Callable[[], None],
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.labels = labels
        self._leftovers = leftovers
        self._cleanup = cleanup

    def create(self) -> corral.Sandbox:
        return corral.create(backend=self.backend, settings=self.settings, labels=self.labels)

    def destroy(self, handle: corral.Sandbox) -> None:
        handle.close()

    def exec_true(self, handle: corral.Sandbox) -> None:
        result = handle.exec(["true"])
        if result.exit_code != 0:
            raise RuntimeError(f"true exited {result.exit_code}: {result.stderr!r}")

    def one_shot(self) -> None:
        """``corral.run``: one command in a fresh sandbox, in one call."""
        result = corral.run(
            ["true"], backend=self.backend, settings=self.settings, labels=self.labels
        )
        if result.exit_code != 0:
            raise RuntimeError(f"true exited {result.exit_code}: {result.stderr!r}")

    def usage(self, handle: corral.Sandbox) -> None:
        handle.usage()

    def write(self, handle: corral.Sandbox, name: str, data: bytes) -> None:
        handle.write_file(f"{handle.spec.workdir}/{name}", data)

    def read(self, handle: corral.Sandbox, name: str) -> bytes:
        return handle.read_file(f"{handle.spec.workdir}/{name}")

    def alive(self, handle: corral.Sandbox) -> bool:
        return not handle.closed

    def pool(self, size: int) -> CorralPool:
        made = corral.Pool(size, backend=self.backend, settings=self.settings, labels=self.labels)
        return CorralPool(made)

    def leftovers(self) -> list[str]:
        return self._leftovers()

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self._cleanup()

    def close(self) -> None:
        # The shared engine clients stay open for the next backend; the host closes them.
        pass
