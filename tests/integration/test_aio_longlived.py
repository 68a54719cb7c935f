"""corral.aio and long-lived sandboxes: spawned processes fed and read from asyncio, and
cancels that stop the waiting, never the process. On the local backend and the
container engines (asyncio.run per test: no asyncio plugin)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import psutil
import pytest

import corral
import corral.aio as aio


def _host_processes_with(token: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if token in " ".join(p.info["cmdline"] or ()):
                found.append(p)
    return found


async def _until_running(token: str) -> None:
    """Wait (without blocking the loop) until a host process shows ``token``."""
    for _ in range(600):
        if await asyncio.to_thread(_host_processes_with, token):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{token!r} never started")


async def _gone(token: str) -> bool:
    """True once no host process shows ``token`` (a kill takes a moment to be reaped)."""
    for _ in range(200):
        if not await asyncio.to_thread(_host_processes_with, token):
            return True
        await asyncio.sleep(0.05)
    return False


def _token() -> str:
    """A number no other process of the host has on its command line (``sleep`` takes it)."""
    return f"{300 + uuid.uuid4().int % 10**6 / 10**6:.6f}"


@pytest.fixture(
    params=[
        pytest.param("local", marks=pytest.mark.local),
        pytest.param("docker", marks=pytest.mark.docker),
        pytest.param("podman", marks=pytest.mark.podman),
    ]
)
def opened(request: pytest.FixtureRequest, settings: corral.Settings, settings_of: Any) -> Opener:
    """``async with opened() as sandbox``: an AsyncSandbox on a backend that can run
    background processes; on leaving, proves the sandbox is gone from its list."""
    backend = request.param
    return Opener(backend, settings if backend == "local" else settings_of(backend))


@attrs.frozen
class Opener:
    backend: str
    settings: corral.Settings

    @contextlib.asynccontextmanager
    async def __call__(self, **keywords: Any) -> AsyncIterator[aio.AsyncSandbox]:
        async with await aio.create(
            backend=self.backend, settings=self.settings, **keywords
        ) as sandbox:
            if corral.Capability.PROCESSES not in sandbox.sync.backend.capabilities():
                pytest.skip(f"the {self.backend} backend has no background processes here")
            yield sandbox
        listed = await aio.list(backend=self.backend, settings=self.settings)
        assert sandbox.id not in [info.id for info in listed], "the sandbox leaked"


async def _text_until(process: aio.AsyncProcess, wanted: str, since: str = "start") -> str:
    """The output from ``since`` up to the first chunk that completes ``wanted``."""
    seen = ""
    async for chunk in process.output(since, timeout=60):  # type: ignore[arg-type]
        seen += chunk.text
        if wanted in seen:
            return seen
    raise AssertionError(f"the process ended before printing {wanted!r}: {seen!r}")


def test_a_shell_fed_line_by_line(opened: Opener) -> None:
    async def main() -> None:
        async with opened() as sandbox:
            shell = await sandbox.spawn(["sh"])
            assert isinstance(shell, aio.AsyncProcess)
            assert shell.argv == ("sh",) and shell.tty is False
            await shell.write("x=6; echo first $((x * 7))\n")
            assert "first 42" in await _text_until(shell, "first 42")
            await shell.write(b"echo second $x\n")
            assert "second 6" in await _text_until(shell, "second 6")
            assert await shell.running()
            assert [p.id for p in await sandbox.processes()] == [shell.id]
            again = await sandbox.process(shell.id)
            await again.write("exit 5\n")
            result = await shell.wait(timeout=60)
            assert result.exit_code == 5 and not result.timed_out
            assert result.text == "first 42\nsecond 6\n"
            assert not await shell.running()

    asyncio.run(main())


def test_cancelling_wait_leaves_the_process_running(opened: Opener) -> None:
    token = _token()

    async def main() -> None:
        async with opened() as sandbox:
            process = await sandbox.spawn(["sleep", token])
            await _until_running(token)

            waiting = asyncio.create_task(process.wait())
            await asyncio.sleep(0.6)  # a few read steps in
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.6):
                    await process.wait()
            with pytest.raises(corral.TimeoutError):
                await process.wait(timeout=0.3)

            assert await process.running()
            assert _host_processes_with(token), "a cancelled wait stopped the process"
            await process.kill()
            result = await process.wait(timeout=60)
            assert not result.timed_out and result.signal == signal.SIGKILL
        assert await _gone(token)

    asyncio.run(main())


def test_leaving_or_cancelling_output_leaves_the_process_running(opened: Opener) -> None:
    token = _token()
    script = f'i=0; while true; do echo "tick $i"; i=$((i+1)); sleep 0.05; done; : {token}'

    async def main() -> None:
        async with opened() as sandbox:
            process = await sandbox.spawn(["sh", "-c", script])
            async for chunk in process.output():
                if "tick" in chunk.text:
                    break  # the generator is closed when collected: a way out
            assert await process.running()

            async def read_forever() -> None:
                async for _ in process.output(since="now"):
                    pass

            reading = asyncio.create_task(read_forever())
            await asyncio.sleep(0.6)
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.6):
                    await read_forever()
            with pytest.raises(corral.TimeoutError):
                async for _ in process.output(since="now", timeout=0.5):
                    pass

            # Still printing after all of that: new ticks arrive.
            assert "tick" in await _text_until(process, "tick", since="now")
            assert _host_processes_with(token)
            await process.terminate()
            result = await process.wait(timeout=60)
            assert result.signal == signal.SIGTERM and not result.timed_out
        assert await _gone(token)

    asyncio.run(main())


def test_idle_timeout_through_aio(opened: Opener) -> None:
    async def main() -> None:
        async with opened() as sandbox:
            quiet = await sandbox.spawn(["sh", "-c", "echo start; sleep 60"], idle_timeout=1)
            result = await quiet.wait(timeout=60)
            assert result.timed_out and result.timed_out_by == "idle_timeout"
            assert result.text == "start\n"

            done = await sandbox.exec(["sh", "-c", "echo a; sleep 60"], idle_timeout="1s")
            assert done.timed_out and done.timed_out_by == "idle_timeout"
            assert done.text == "a\n"

            chatty = await sandbox.exec(
                ["sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.2; done"], idle_timeout=5
            )
            assert chatty.ok and chatty.text == "1\n2\n3\n"

    asyncio.run(main())


def test_a_cancelled_spawn_leaves_no_process(opened: Opener) -> None:
    token = _token()

    async def main() -> None:
        async with opened() as sandbox:
            spawning = asyncio.create_task(sandbox.spawn(["sleep", token]))
            await asyncio.sleep(0)  # the spawn is in its worker thread
            spawning.cancel()
            with pytest.raises(asyncio.CancelledError):
                await spawning
            # The caller never got a handle: the process it started anyway is killed.
            for _ in range(200):
                listed = await sandbox.processes()
                if listed and not any([await p.running() for p in listed]):
                    break
                await asyncio.sleep(0.05)
            assert listed, "the spawn never reached the backend"
            assert not any([await p.running() for p in listed])
            assert await _gone(token)

    asyncio.run(main())


def _needs(sandbox: aio.AsyncSandbox, *capabilities: corral.Capability) -> None:
    have = sandbox.sync.backend.capabilities()
    missing = [c.name for c in capabilities if c not in have]
    if missing:
        pytest.skip(f"the {sandbox.backend_name} backend lacks {', '.join(missing)} here")


def test_pause_resume_status_and_extend(opened: Opener) -> None:
    async def main() -> None:
        async with opened() as sandbox:
            _needs(sandbox, corral.Capability.PAUSE, corral.Capability.EXTEND)
            assert await sandbox.status() == "running"
            await sandbox.pause()
            assert await sandbox.status() == "paused"
            with pytest.raises(corral.ConflictError, match="paused"):
                await sandbox.exec(["true"])
            await sandbox.resume()
            assert await sandbox.status() == "running"
            assert (await sandbox.exec(["echo", "back"])).text == "back\n"
            before = sandbox.expires
            after = await sandbox.extend("10m")
            assert after == sandbox.expires and after > before
            listed = await aio.list(backend=opened.backend, settings=opened.settings)
            (listed_expires,) = [i.expires for i in listed if i.id == sandbox.id]
            assert abs(listed_expires - after) < 2  # labels hold whole seconds
        assert await sandbox.status() == "closed"

    asyncio.run(main())


def test_snapshot_fork_and_changes(opened: Opener) -> None:
    async def main() -> None:
        async with opened() as sandbox:
            _needs(sandbox, corral.Capability.SNAPSHOTS, corral.Capability.CHANGES)
            await sandbox.write_file("/workspace/note.txt", "kept\n")
            changed = {c.path: c.kind for c in await sandbox.changes()}
            assert changed.get("/workspace/note.txt") == "added", changed

            snap = await sandbox.snapshot(lifetime="10m")
            assert isinstance(snap, aio.AsyncSnapshot)
            settings = opened.settings
            listed = await aio.snapshots(backend=sandbox.backend_name, settings=settings)
            assert snap.id in [s.id for s in listed]
            try:
                async with await aio.create(
                    image=snap, backend=sandbox.backend_name, settings=settings
                ) as started:
                    assert await started.read_file("/workspace/note.txt") == b"kept\n"
                (fork,) = await sandbox.fork()
                async with fork:
                    assert isinstance(fork, aio.AsyncSandbox) and fork.id != sandbox.id
                    assert await fork.read_file("/workspace/note.txt") == b"kept\n"
            finally:
                await snap.remove()
            listed = await aio.snapshots(backend=sandbox.backend_name, settings=settings)
            assert snap.id not in [s.id for s in listed]
            # The fork's own snapshot goes at gc (expired), or now with everything.
            for other in listed:
                if other.info.sandbox_id == sandbox.id:
                    await other.remove()

    asyncio.run(main())
