"""Issue 15's benchmarks: long-lived sandboxes, corral against the raw way, per backend.

    .venv/bin/python bench/run.py --only long-lived [--backends local,docker] [--rounds N]

Per backend, corral and a reference alternate round by round doing the same work:
spawn-to-first-output (a spawned ``sh -c 'echo ready; exec cat'`` until ``ready`` is
read back; corral's first spawn in a sandbox starts its keeper, so a first spawn in a
fresh sandbox and a warm one in a sandbox whose keeper runs are measured apart), the
write-to-echo round trip through that ``cat``, pause plus resume (of a sandbox running
that ``cat``), a snapshot of an empty sandbox and of one holding 100 MiB in its
workspace, and a fork of the latter (a snapshot, then a sandbox made from it, ready).

The references: on the engines, docker-py's low-level client (``exec_create`` and
``exec_start(socket=True)``, ``pause``/``unpause``, ``commit``, then ``containers.run``
of the committed image); on Podman the same calls of docker-py to Podman's Docker-
compatible REST API for the exec socket (podman-py's ``exec_run`` has no socket) and
podman-py for the rest. On local, the same work by hand: a ``cat`` in a bwrap with two
pipes, cgroup v2's freezer written directly, and ``cp -a`` of the sandbox's folders.
Everything made carries the run's label and is removed at the end, also after an error.
Not a test: never asserts on time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import measure
from common import RAW_LABEL, Config, Row, Target, interleave, markdown, row, timed
from sides import CorralSide, Side

import corral
from corral.core.backend import snapshot_id_of

MIB = 1024 * 1024
BIG_MIB = 100
BIG_ROUNDS = 5  # each round copies 100 MiB two or three times: the minimum the issue asks
READY = b"ready\n"
PING = b"ping\n"
SPAWNED = ["sh", "-c", "echo ready; exec cat"]
_READ_TIMEOUT = 60.0
FAILED = "long-lived (failed)"
WITHIN = Target("≤ 1.1x reference", ratio=1.1)


# -- what each side does ------------------------------------------------------------------


class Spawned:
    """A running ``cat`` (behind ``echo ready``) of either side: write to it, read it."""

    def echo(self, data: bytes) -> None:
        """Write ``data`` and return once it came back."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class LongLived:
    """The long-lived operations of one side on the sandboxes its ``Side`` makes."""

    name = "?"

    def __init__(self, side: Side) -> None:
        self.side = side

    def fill(self, handle: Any, mib: int) -> None:
        """Put ``mib`` MiB of random bytes in the sandbox (untimed set-up)."""
        raise NotImplementedError

    def spawn(self, handle: Any) -> Spawned:
        """Start SPAWNED and return once ``ready`` was read from it."""
        raise NotImplementedError

    def hold(self, handle: Any) -> Callable[[], None]:
        """Start SPAWNED in the sandbox (so that pause has a process to freeze);
        the function returned stops it."""
        spawned = self.spawn(handle)
        return spawned.stop

    def pause_resume(self, handle: Any) -> None:
        raise NotImplementedError

    def snapshot(self, handle: Any) -> Callable[[], None]:
        """Snapshot the sandbox; the function returned removes the snapshot."""
        raise NotImplementedError

    def fork(self, handle: Any) -> Callable[[], None]:
        """Snapshot the sandbox and make a ready sandbox from it; the function returned
        removes both."""
        raise NotImplementedError

    def cleanup(self) -> None:
        """Remove every snapshot this side made and did not remove; never raises."""

    def leftover_snapshots(self) -> int:
        """Snapshots (folders, images) of this run still there."""
        return 0


class CorralLongLived(LongLived):
    name = "corral"

    def __init__(self, side: CorralSide) -> None:
        super().__init__(side)
        self.snapshots: set[tuple[Any, str]] = set()  # (backend, id) not yet removed
        # What was snapshotted, so that a snapshot whose id a failure lost is found too.
        self.sources: dict[Any, set[str]] = {}

    def fill(self, handle: corral.Sandbox, mib: int) -> None:
        done = handle.exec(
            ["dd", "if=/dev/urandom", f"of={handle.spec.workdir}/blob", "bs=1M", f"count={mib}"]
        )
        if done.exit_code != 0:
            raise RuntimeError(f"dd exited {done.exit_code}: {done.stderr!r}")

    def spawn(self, handle: corral.Sandbox) -> Spawned:
        return _CorralSpawned(handle.spawn(SPAWNED))

    def pause_resume(self, handle: corral.Sandbox) -> None:
        handle.pause()
        handle.resume()

    def _removal(self, backend: Any, snapshot_id: str) -> Callable[[], None]:
        key = (backend, snapshot_id)
        self.snapshots.add(key)

        def remove() -> None:
            backend.remove_snapshot(snapshot_id)
            self.snapshots.discard(key)

        return remove

    def snapshot(self, handle: corral.Sandbox) -> Callable[[], None]:
        self.sources.setdefault(handle.backend, set()).add(handle.id)
        made = handle.snapshot()
        return self._removal(handle.backend, made.id)

    def fork(self, handle: corral.Sandbox) -> Callable[[], None]:
        self.sources.setdefault(handle.backend, set()).add(handle.id)
        (child,) = handle.fork()
        remove_snapshot = self._removal(handle.backend, snapshot_id_of(child.spec.image))

        def remove() -> None:
            child.close()
            remove_snapshot()

        return remove

    def cleanup(self) -> None:
        for backend, snapshot_id in list(self.snapshots):
            with contextlib.suppress(Exception):
                backend.remove_snapshot(snapshot_id)
        for backend, sandbox_ids in self.sources.items():
            with contextlib.suppress(Exception):
                for info in backend.snapshots():
                    if info.sandbox_id in sandbox_ids:
                        backend.remove_snapshot(info.id)

    def leftover_snapshots(self) -> int:
        """Snapshots of this run's sandboxes the backends still list."""
        return sum(
            1
            for backend, sandbox_ids in self.sources.items()
            for info in backend.snapshots()
            if info.sandbox_id in sandbox_ids
        )


class _CorralSpawned(Spawned):
    def __init__(self, process: corral.Process) -> None:
        self.process = process
        self.chunks = _stdout(process.output(timeout=_READ_TIMEOUT))
        _read_until(self.chunks, READY)

    def echo(self, data: bytes) -> None:
        self.process.write(data)
        _read_until(self.chunks, data)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=_READ_TIMEOUT)


def _stdout(chunks: Iterator[Any]) -> Iterator[bytes]:
    return (chunk.data for chunk in chunks if chunk.stream == "stdout")


def _read_until(chunks: Iterator[bytes], wanted: bytes) -> None:
    """Read until ``wanted`` came whole (a cat's echo may come in pieces)."""
    got = b""
    while not got.endswith(wanted):
        try:
            got += next(chunks)
        except StopIteration:
            raise RuntimeError(f"the output ended after {got!r}, before {wanted!r}") from None


# -- local: by hand -----------------------------------------------------------------------


class LocalByHand(LongLived):
    """bwrap with pipes, the cgroup v2 freezer written directly, ``cp -a`` of folders."""

    name = "bwrap + pipes, freezer, cp -a"

    def __init__(self, side: Any, snapshot_root: str) -> None:
        super().__init__(side)
        self.raw = side  # backend_local.RawLocalSide
        self.snapshot_root = snapshot_root
        os.makedirs(snapshot_root, exist_ok=True)

    def _unified(self, folder: str) -> Path | None:
        found = [c for c in self.raw._cgroups(os.path.basename(folder)) if "unified" in c.parts]
        return found[0] if found else None

    def fill(self, handle: str, mib: int) -> None:
        with open(f"{handle}/workspace/blob", "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MIB))
        if self.raw.as_root:
            os.chown(f"{handle}/workspace/blob", 65534, 65534)

    def spawn(self, handle: str) -> Spawned:
        cgroups = self.raw._cgroups(os.path.basename(handle))

        def join() -> None:
            # As corral's commands: in the sandbox's cgroups, then the host user.
            for cgroup in cgroups:
                with open(cgroup / "cgroup.procs", "w") as f:
                    f.write(str(os.getpid()))
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)

        popen = subprocess.Popen(
            self.raw.argv(handle, SPAWNED),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin"},
            preexec_fn=join if self.raw.as_root else None,
        )
        return _PipeSpawned(popen)

    def pause_resume(self, handle: str) -> None:
        unified = self._unified(handle)
        if unified is None:
            raise RuntimeError("no cgroup v2 folder to freeze (run as root on cgroup v2)")
        for wanted in ("1", "0"):
            (unified / "cgroup.freeze").write_text(wanted)
            while f"frozen {wanted}" not in (unified / "cgroup.events").read_text():
                time.sleep(0.002)  # what corral's Cgroup.freeze polls at

    def _copy(self, handle: str, target: str) -> None:
        os.mkdir(target)
        subprocess.run(
            ["cp", "-a", f"{handle}/workspace", f"{handle}/tmp", target + "/"], check=True
        )

    def snapshot(self, handle: str) -> Callable[[], None]:
        target = os.path.join(self.snapshot_root, uuid.uuid4().hex[:12])
        self._copy(handle, target)
        return lambda: shutil.rmtree(target, ignore_errors=True)

    def fork(self, handle: str) -> Callable[[], None]:
        target = os.path.join(self.snapshot_root, uuid.uuid4().hex[:12])
        self._copy(handle, target)
        child = self.raw.create()
        for sub in ("workspace", "tmp"):  # the copy's contents into the new sandbox's folders
            subprocess.run(["cp", "-a", f"{target}/{sub}/.", f"{child}/{sub}/"], check=True)

        def remove() -> None:
            self.raw.destroy(child)
            shutil.rmtree(target, ignore_errors=True)

        return remove

    def cleanup(self) -> None:
        shutil.rmtree(self.snapshot_root, ignore_errors=True)

    def leftover_snapshots(self) -> int:
        return len(os.listdir(self.snapshot_root))


class _PipeSpawned(Spawned):
    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.out = popen.stdout.fileno()  # type: ignore[union-attr]
        self._read_until(READY)

    def _read_until(self, wanted: bytes) -> None:
        got = b""
        while not got.endswith(wanted):
            data = os.read(self.out, 65536)
            if not data:
                raise RuntimeError(f"the pipe closed after {got!r}")
            got += data

    def echo(self, data: bytes) -> None:
        os.write(self.popen.stdin.fileno(), data)  # type: ignore[union-attr]
        self._read_until(data)

    def stop(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
        self.popen.stdin.close()  # type: ignore[union-attr]
        self.popen.stdout.close()  # type: ignore[union-attr]


# -- the engines: their own clients -------------------------------------------------------


class EngineByClient(LongLived):
    """docker-py (or podman-py with docker-py's exec socket on Podman's Docker API)."""

    def __init__(self, side: Any, name: str, exec_api: Any, run_id: str) -> None:
        super().__init__(side)
        self.raw = side  # engine_raw.EngineRawSide
        self.name = name
        self.exec_api = exec_api  # a docker.APIClient on the engine's socket
        self.run_id = run_id
        self.images: set[str] = set()

    def fill(self, handle: Any, mib: int) -> None:
        # In the writable layer, which commit captures (a tmpfs would not be).
        command = f"mkdir -p /data && dd if=/dev/urandom of=/data/blob bs=1M count={mib}"
        exit_code, output = handle.exec_run(["sh", "-c", command])
        if exit_code != 0:
            raise RuntimeError(f"dd exited {exit_code}: {output!r}")

    def spawn(self, handle: Any) -> Spawned:
        made = self.exec_api.exec_create(handle.id, SPAWNED, stdin=True, stdout=True, stderr=True)
        sock = self.exec_api.exec_start(made["Id"], detach=False, socket=True)
        return _SocketSpawned(sock)

    def pause_resume(self, handle: Any) -> None:
        handle.pause()
        handle.unpause()

    def pause_resume_by_name(self, handle: Any) -> None:
        self.raw.client.api.pause(handle.name)
        self.raw.client.api.unpause(handle.name)

    def commit(self, handle: Any) -> str:
        image = handle.commit(conf={"Labels": {RAW_LABEL: self.run_id}})
        self.images.add(image.id)
        return image.id

    def remove_image(self, image_id: str) -> None:
        self.raw.client.images.remove(image_id, force=True)
        self.images.discard(image_id)

    def snapshot(self, handle: Any) -> Callable[[], None]:
        image_id = self.commit(handle)
        return lambda: self.remove_image(image_id)

    def fork(self, handle: Any) -> Callable[[], None]:
        image_id = self.commit(handle)
        child = self.raw.client.containers.run(image_id, **self.raw.run_keywords())

        def remove() -> None:
            self.raw.destroy(child)
            self.remove_image(image_id)

        return remove

    def archive_copy(self, handle: Any) -> float:
        """Seconds to copy /data out of ``handle`` and into a container never started,
        through the archive API (the path corral's snapshot takes for a tmpfs volume)."""
        holder = self.raw.client.containers.create(
            self.raw.image, ["true"], labels=self.raw.labels, network_mode="none"
        )
        try:
            started = time.perf_counter()
            stream, _ = handle.get_archive("/data")
            holder.put_archive("/", b"".join(stream))
            return time.perf_counter() - started
        finally:
            self.raw.destroy(holder)

    def leftover_snapshots(self) -> int:
        return len(self.raw.client.images.list(filters={"label": f"{RAW_LABEL}={self.run_id}"}))

    def cleanup(self) -> None:
        for image_id in list(self.images):
            with contextlib.suppress(Exception):
                self.remove_image(image_id)
        with contextlib.suppress(Exception):
            self.exec_api.close()


class PodmanByClient(EngineByClient):
    def pause_resume_by_name(self, handle: Any) -> None:
        for step in ("pause", "unpause"):  # podman-py's own calls, with the name in the path
            response = self.raw.client.api.post(f"/containers/{handle.name}/{step}")
            response.raise_for_status()

    def commit(self, handle: Any) -> str:
        # podman-py's commit: libpod's, labels as Dockerfile instructions.
        image = handle.commit(changes=[f"LABEL {RAW_LABEL}={self.run_id}"])
        self.images.add(image.id)
        return image.id


class _SocketSpawned(Spawned):
    """An attached exec: Docker's multiplexed frames (8-byte header, then the data)."""

    def __init__(self, sock: Any) -> None:
        self.wrapper = sock
        self.sock: socket.socket = getattr(sock, "_sock", sock)
        self.sock.settimeout(_READ_TIMEOUT)
        self.pending = b""
        self._read_until(READY)

    def _frame(self) -> tuple[int, bytes]:
        while len(self.pending) < 8 or len(self.pending) < 8 + _size(self.pending):
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError(f"the exec's socket closed ({self.pending!r} pending)")
            self.pending += data
        size = _size(self.pending)
        stream, payload = self.pending[0], self.pending[8 : 8 + size]
        self.pending = self.pending[8 + size :]
        return stream, payload

    def _read_until(self, wanted: bytes) -> None:
        got = b""
        while not got.endswith(wanted):
            stream, payload = self._frame()
            if stream == 1:
                got += payload

    def echo(self, data: bytes) -> None:
        self.sock.sendall(data)
        self._read_until(data)

    def stop(self) -> None:
        # End of input: the cat ends, and the engine's exec with it.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while self.sock.recv(65536):
                pass
        self.wrapper.close()


def _size(header: bytes) -> int:
    return struct.unpack(">I", header[4:8])[0]


# -- the measurements ---------------------------------------------------------------------


@dataclass
class Pair:
    """One backend's two sides, and what names the reference in its rows."""

    backend: str
    ours: CorralLongLived
    raw: LongLived

    @property
    def raw_name(self) -> str:
        return self.raw.name


def _timed_then(step: Callable[[], Callable[[], None]]) -> float:
    """Seconds ``step()`` took; what it returns (its undoing) runs untimed after."""
    started = time.perf_counter()
    undo = step()
    elapsed = time.perf_counter() - started
    undo()
    return elapsed


def _in_fresh(side: LongLived, timed_part: Callable[[Any], Callable[[], None]]) -> float:
    """A fresh sandbox (untimed), ``timed_part`` in it, then everything removed."""
    handle = side.side.create()
    try:
        return _timed_then(lambda: timed_part(handle))
    finally:
        side.side.destroy(handle)


def spawn_rows(pair: Pair, rounds: int) -> list[Row]:
    """Spawn-to-first-output, first in a fresh sandbox and warm, and the echo round trip."""

    def started(side: LongLived) -> Callable[[Any], Callable[[], None]]:
        return lambda handle: side.spawn(handle).stop

    first = interleave(
        rounds,
        lambda: _in_fresh(pair.ours, started(pair.ours)),
        lambda: _in_fresh(pair.raw, started(pair.raw)),
    )
    rows = [
        row(
            pair.backend,
            "spawn to first output, first in a sandbox",
            first,
            pair.raw_name,
            note="corral's first spawn starts the sandbox's keeper; the reference's first exec",
        )
    ]
    mine, theirs = pair.ours.side.create(), pair.raw.side.create()
    try:
        pair.ours.spawn(mine).stop()  # the keeper runs from here on
        pair.raw.spawn(theirs).stop()
        warm = interleave(
            rounds,
            lambda: _timed_then(lambda: started(pair.ours)(mine)),
            lambda: _timed_then(lambda: started(pair.raw)(theirs)),
        )
        rows.append(
            row(
                pair.backend,
                "spawn to first output, warm (keeper running)",
                warm,
                pair.raw_name,
                WITHIN,
                "the ratio the target is held to: a spawn in a sandbox that has spawned before",
            )
        )
        ours_cat, raw_cat = pair.ours.spawn(mine), pair.raw.spawn(theirs)
        try:
            echo = interleave(
                rounds * 2,
                lambda: timed(lambda: ours_cat.echo(PING)),
                lambda: timed(lambda: raw_cat.echo(PING)),
            )
            breakdown = _keeper_rows(pair.backend, mine, ours_cat, rounds)  # type: ignore[arg-type]
        finally:
            ours_cat.stop()
            raw_cat.stop()
        rows.append(
            row(
                pair.backend,
                "write-to-echo round trip (spawned cat)",
                echo,
                pair.raw_name,
                WITHIN,
                "5 bytes written, read back whole",
            )
        )
        rows += breakdown
        rows += _pause_rows(pair, mine, theirs, rounds)
    finally:
        pair.ours.side.destroy(mine)
        pair.raw.side.destroy(theirs)
    return rows


def _keeper_rows(backend: str, sandbox: Any, cat: _CorralSpawned, rounds: int) -> list[Row]:
    """corral alone: the parts of a spawn and of an echo that go through the keeper (each
    call a request over its Unix socket), to show what bounds the two rows above."""

    def spawn_returns() -> float:
        started = time.perf_counter()
        process = sandbox.spawn(SPAWNED)
        elapsed = time.perf_counter() - started
        _read_until(_stdout(process.output(timeout=_READ_TIMEOUT)), READY)
        process.kill()
        process.wait(timeout=_READ_TIMEOUT)
        return elapsed

    def write_returns() -> float:
        elapsed = timed(lambda: cat.process.write(PING))
        _read_until(cat.chunks, PING)
        return elapsed

    # What a first spawn adds: a new interpreter importing the keeper and the backend.
    modules = f"import corral.core.keeper, {type(sandbox.backend).__module__}"
    interpreter = [sys.executable, "-c", modules]
    measured = {
        f"a new interpreter: python -c '{modules}'": lambda: timed(
            lambda: subprocess.run(interpreter, check=True)
        ),
        "spawn() returns, warm (the keeper's answer; the exec starts after)": spawn_returns,
        "Process.write returns (one keeper request)": write_returns,
        "Process.running (one keeper request, nothing waited for)": lambda: timed(
            lambda: cat.process.running
        ),
    }
    return [
        row(
            backend,
            name,
            (statistics.median([one() for _ in range(rounds * 2)]), None),
            "",
            note="corral alone: a part of the rows above",
        )
        for name, one in measured.items()
    ]


def _pause_rows(pair: Pair, mine: Any, theirs: Any, rounds: int) -> list[Row]:
    stop_ours, stop_raw = pair.ours.hold(mine), pair.raw.hold(theirs)
    try:
        seconds = interleave(
            rounds,
            lambda: timed(lambda: pair.ours.pause_resume(mine)),
            lambda: timed(lambda: pair.raw.pause_resume(theirs)),
        )
        rows = [
            row(
                pair.backend,
                "pause + resume",
                seconds,
                pair.raw_name,
                WITHIN,
                "a sandbox running a spawned cat; each side waits until it is frozen, then thawed",
            )
        ]
        if isinstance(pair.raw, EngineByClient):
            # corral names its containers in its calls; the reference uses their full id.
            seconds = interleave(
                rounds,
                lambda: timed(lambda: pair.ours.pause_resume(mine)),
                lambda: timed(lambda: pair.raw.pause_resume_by_name(theirs)),
            )
            rows.append(
                row(
                    pair.backend,
                    "pause + resume, the reference by the container's name",
                    seconds,
                    pair.raw_name,
                    note="the same REST calls as corral's: the container named, not its id",
                )
            )
    finally:
        stop_ours()
        stop_raw()
    return rows


def snapshot_rows(pair: Pair, rounds: int) -> list[Row]:
    """Snapshot of an empty sandbox and of one holding 100 MiB, and a fork of the latter."""
    rows = []
    mine, theirs = pair.ours.side.create(), pair.raw.side.create()
    try:
        seconds = interleave(
            rounds,
            lambda: _timed_then(lambda: pair.ours.snapshot(mine)),
            lambda: _timed_then(lambda: pair.raw.snapshot(theirs)),
        )
        rows.append(
            row(
                pair.backend,
                "snapshot, empty workspace",
                seconds,
                pair.raw_name,
                note="the fixed cost of a snapshot; removed untimed after each round",
            )
        )
        pair.ours.fill(mine, BIG_MIB)
        pair.raw.fill(theirs, BIG_MIB)
        seconds = interleave(
            BIG_ROUNDS,
            lambda: _timed_then(lambda: pair.ours.snapshot(mine)),
            lambda: _timed_then(lambda: pair.raw.snapshot(theirs)),
        )
        rows.append(
            row(
                pair.backend,
                f"snapshot, {BIG_MIB} MiB in the workspace",
                seconds,
                pair.raw_name,
                WITHIN,
                _big_note(pair.backend),
            )
        )
        if isinstance(pair.raw, EngineByClient):
            copy = statistics.median([pair.raw.archive_copy(theirs) for _ in range(BIG_ROUNDS)])
            rows.append(
                row(
                    pair.backend,
                    f"get_archive + put_archive of {BIG_MIB} MiB, by hand",
                    (None, copy),
                    pair.raw_name,
                    note="the reference alone: one copy of a tmpfs volume's files through "
                    "the engine, which a commit does not capture",
                )
            )
        seconds = interleave(
            BIG_ROUNDS,
            lambda: _timed_then(lambda: pair.ours.fork(mine)),
            lambda: _timed_then(lambda: pair.raw.fork(theirs)),
        )
        targets = [WITHIN.text]
        ratio_met = WITHIN.check(seconds[0] * 1000, seconds[1] * 1000)
        met = ratio_met
        if pair.backend == "docker":
            targets.append("< 1000 ms")
            met = bool(ratio_met) and seconds[0] < 1.0
        rows.append(
            row(
                pair.backend,
                f"fork (snapshot + ready sandbox), {BIG_MIB} MiB in the workspace",
                seconds,
                pair.raw_name,
                Target(", ".join(targets), met=met),
                _big_note(pair.backend) + "; the fork removed untimed after each round",
            )
        )
    finally:
        pair.ours.side.destroy(mine)
        pair.raw.side.destroy(theirs)
    return rows


def _big_note(backend: str) -> str:
    if backend == "local":
        return "reference: cp -a of the workspace and /tmp (and into the new sandbox's, to fork)"
    return (
        "reference: the 100 MiB in the container's writable layer, which commit captures; "
        "corral's workspace is a tmpfs volume, copied through the archive API"
    )


# -- the section --------------------------------------------------------------------------


def _pair(backend: str, config: Config) -> Pair:
    if backend == "local":
        import backend_local

        ours, raw = backend_local.make_sides(config)
        snapshots = os.path.join(config.state_dir, "raw-snapshots")
        return Pair("local", CorralLongLived(ours), LocalByHand(raw, snapshots))
    import docker

    if backend == "docker":
        import backend_docker

        ours, raw = backend_docker.make_sides(config)
        api = docker.APIClient(base_url=config.docker_url)
        return Pair(
            "docker", CorralLongLived(ours), EngineByClient(raw, "docker-py", api, config.run_id)
        )
    import backend_podman

    ours, raw = backend_podman.make_sides(config)
    api = docker.APIClient(base_url=config.podman_url)
    name = "podman-py (exec: docker-py on Podman's Docker API)"
    return Pair("podman", CorralLongLived(ours), PodmanByClient(raw, name, api, config.run_id))


def backend_rows(backend: str, config: Config, rounds: int) -> list[Row]:
    """Every long-lived measurement on one backend; whatever is left is removed."""
    pair = _pair(backend, config)
    try:
        # Warm both sides (bubblewrap probe, connections, image look-ups) untimed.
        pair.ours.side.cycle()
        pair.raw.side.cycle()
        rows = spawn_rows(pair, rounds)
        rows += snapshot_rows(pair, rounds)
        rows.append(measure.leftover_row(backend, pair.ours.side, pair.raw.side))
        rows[-1].note += (
            f"; snapshots of this run still there: corral {pair.ours.leftover_snapshots()}, "
            f"reference {pair.raw.leftover_snapshots()}"
        )
    finally:
        pair.ours.cleanup()
        pair.raw.cleanup()
        pair.ours.side.cleanup()
        pair.raw.side.cleanup()
        pair.raw.side.close()
    return rows


def run(config: Config, rounds: int, chosen: list[str]) -> list[Row]:
    """The section for every chosen backend; one backend's failure keeps the others'."""
    import traceback

    rows: list[Row] = []
    for backend in chosen:
        print(f"== long-lived sandboxes: {backend}", file=sys.stderr, flush=True)
        try:
            got = backend_rows(backend, config, rounds)
        except Exception as e:
            traceback.print_exc()
            got = [Row(backend, FAILED, None, None, "", note=f"{type(e).__name__}: {e}")]
        print(markdown(got, ""), file=sys.stderr, flush=True)
        rows += got
    return rows


def write(out: Path, rows: list[Row], meta: dict) -> Path:
    """long_lived.md and long_lived.json under ``out`` (``--only long-lived``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_lived.json").write_text(
        json.dumps({"meta": meta, "rows": [r.as_json() for r in rows]}, indent=2) + "\n"
    )
    misses = [f"{r.backend}: {r.name}" for r in rows if r.met is False]
    header = "\n".join(
        [
            "## Long-lived sandboxes (issue 15)",
            "",
            f"Run {meta['started']} ({meta['seconds']:.0f} s), rounds={meta['rounds']} "
            f"({BIG_ROUNDS} for the {BIG_MIB} MiB rows), backends: "
            f"{', '.join(meta['backends'])}; {meta['cpus']} CPUs, load average "
            f"{meta['load_average'][0]} at the start and {meta['load_average'][1]} at the end.",
            "Medians; ratio = corral / reference; the two alternate round by round.",
            "",
            "Targets missed: " + ("; ".join(misses) if misses else "none"),
        ]
    )
    path = out / "long_lived.md"
    path.write_text(markdown(rows, header))
    return path
