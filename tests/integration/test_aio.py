"""corral.aio: the asyncio API on real sandboxes (no asyncio plugin: asyncio.run per test)."""

from __future__ import annotations

import asyncio
import contextlib
import sys

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
    for _ in range(100):
        if not await asyncio.to_thread(_host_processes_with, token):
            return True
        await asyncio.sleep(0.05)
    return False


def test_import_corral_does_not_import_aio():
    assert "corral.aio" not in sys.modules or corral.aio is aio
    code = "import sys, corral; assert 'corral.aio' not in sys.modules"
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.local
def test_create_exec_close_with_async_with(settings):
    async def main() -> None:
        async with await aio.create(backend="local", settings=settings) as sb:
            assert isinstance(sb, aio.AsyncSandbox)
            result = await sb.exec(["sh", "-c", "echo hi; echo oops >&2; exit 3"])
            assert (result.text, result.stderr, result.exit_code) == ("hi\n", b"oops\n", 3)
            ids = [i.id for i in await aio.list(backend="local", settings=settings)]
            assert sb.id in ids
            again = await aio.attach(sb.id, backend="local", settings=settings)
            assert (await again.exec(["echo", "attached"])).text == "attached\n"
            again.detach()
            assert (await sb.health()).status == "none"
            assert isinstance(await sb.usage(), corral.ResourceUsage)
        assert sb.closed
        assert sb.id not in [i.id for i in await aio.list(backend="local", settings=settings)]
        with pytest.raises(corral.SandboxClosedError):
            await sb.exec(["true"])
        await sb.close()  # idempotent

    asyncio.run(main())


@pytest.mark.local
def test_concurrent_execs_in_several_sandboxes(settings):
    async def main() -> None:
        boxes = await asyncio.gather(
            *(aio.create(backend="local", settings=settings) for _ in range(4))
        )
        try:
            results = await asyncio.gather(
                *(
                    sb.exec(["sh", "-c", f"sleep 0.5; echo {n}"])
                    for n, sb in enumerate(boxes)
                    for _ in range(2)
                )
            )
            assert [r.text for r in results] == [f"{n}\n" for n in range(4) for _ in range(2)]
        finally:
            await asyncio.gather(*(sb.close() for sb in boxes))

    asyncio.run(main())


@pytest.mark.local
def test_the_loop_stays_responsive_during_a_long_exec(settings):
    """The exec waits for a file that only a concurrent coroutine writes: a blocked loop
    would never write it (and the exec would time out)."""

    async def main() -> None:
        async with await aio.create(backend="local", settings=settings) as sb:
            ticks = 0
            running = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                await running.wait()
                for _ in range(5):
                    await asyncio.sleep(0.01)
                    ticks += 1
                await sb.write_file("/tmp/go", "now")
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            waiting = "while [ ! -e /tmp/go ]; do sleep 0.05; done; echo seen"
            exec_task = asyncio.create_task(sb.exec(["sh", "-c", waiting], timeout=60))
            tick_task = asyncio.create_task(ticker())
            running.set()
            result = await exec_task
            tick_task.cancel()
            assert result.text == "seen\n" and not result.timed_out
            assert ticks >= 5

    asyncio.run(main())


@pytest.mark.local
@pytest.mark.parametrize(
    ("argv", "tokens"),
    [
        (["sleep", "1001"], ["sleep 1001"]),
        (["sh", "-c", "sleep 1002 & sleep 1003"], ["sleep 1002", "sleep 1003"]),
    ],
)
def test_cancelling_an_exec_stops_the_command(settings, argv, tokens):
    async def main() -> None:
        async with await aio.create(backend="local", settings=settings) as sb:
            task = asyncio.create_task(sb.exec(argv))
            for token in tokens:
                await _until_running(token)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for token in tokens:
                assert await _gone(token), f"{token!r} still runs"
            assert (await sb.exec(["echo", "still here"])).text == "still here\n"

    asyncio.run(main())


@pytest.mark.local
def test_wait_for_timeout_stops_the_command(settings):
    async def main() -> None:
        async with await aio.create(backend="local", settings=settings) as sb:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(sb.exec(["sleep", "1004"]), 0.5)
            assert await _gone("sleep 1004")
            assert (await sb.exec(["echo", "ok"])).text == "ok\n"

    asyncio.run(main())


@pytest.mark.local
def test_stream_yields_chunks_then_the_result(settings):
    async def main() -> None:
        async with await aio.create(backend="local", settings=settings) as sb:
            script = "echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three; exit 4"
            events = [e async for e in sb.stream(["sh", "-c", script])]
            *chunks, result = events
            assert chunks and all(isinstance(c, corral.OutputChunk) for c in chunks)
            assert isinstance(result, corral.ExecResult) and result.exit_code == 4
            out = b"".join(c.data for c in chunks if c.stream == "stdout")
            err = b"".join(c.data for c in chunks if c.stream == "stderr")
            assert (out, err) == (b"one\nthree\n", b"two\n")
            assert result.stdout == out

    asyncio.run(main())


@pytest.mark.local
def test_stream_is_bounded_and_complete_with_a_slow_consumer(settings):
    """A lot of output, read slowly, all arrives; the result keeps only the capped copy."""

    async def main() -> None:
        async with await aio.create(backend="local", settings=settings) as sb:
            total = 0
            argv = ["head", "-c", "20000000", "/dev/zero"]
            async for event in sb.stream(argv, max_output=1000):
                if isinstance(event, corral.OutputChunk):
                    total += len(event.data)
                    if total < 200_000:
                        await asyncio.sleep(0.01)
                else:
                    result = event
            assert total == 20_000_000
            assert result.exit_code == 0 and result.truncated and len(result.stdout) == 1000

    asyncio.run(main())


@pytest.mark.local
def test_leaving_a_stream_early_or_cancelling_it_stops_the_command(settings):
    async def main() -> None:
        async with await aio.create(backend="local", settings=settings) as sb:
            argv = ["sh", "-c", "echo started; sleep 1005"]
            async with contextlib.aclosing(sb.stream(argv)) as events:
                async for event in events:
                    assert isinstance(event, corral.OutputChunk)
                    break
            assert await _gone("sleep 1005")

            async def consume() -> None:
                async for _ in sb.stream(["sleep", "1006"]):
                    pass

            task = asyncio.create_task(consume())
            await _until_running("sleep 1006")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await _gone("sleep 1006")
            assert (await sb.exec(["echo", "ok"])).text == "ok\n"

    asyncio.run(main())


@pytest.mark.local
def test_files_round_trip(settings, shared_tmp):
    async def main() -> None:
        async with await aio.create(backend="local", settings=settings) as sb:
            data = bytes(range(256)) * 100
            await sb.write_file("/tmp/data.bin", data)
            assert await sb.read_file("/tmp/data.bin") == data
            source = shared_tmp / "tree"
            (source / "inner").mkdir(parents=True)
            (source / "inner" / "a.txt").write_text("hello")
            await sb.upload(source, "/tmp")
            assert (await sb.exec(["cat", "/tmp/tree/inner/a.txt"])).text == "hello"
            out = await sb.download("/tmp/tree", shared_tmp / "back")
            assert (out / "inner" / "a.txt").read_text() == "hello"

    asyncio.run(main())


def test_on_every_engine(engine, engine_settings):
    async def main() -> None:
        async with await aio.create(backend=engine, settings=engine_settings) as sb:
            assert (await sb.exec(["echo", "hi"])).text == "hi\n"
            await sb.write_file("/tmp/f", b"data")
            assert await sb.read_file("/tmp/f") == b"data"
            events = [e async for e in sb.stream(["sh", "-c", "echo a; echo b >&2"])]
            assert isinstance(events[-1], corral.ExecResult) and events[-1].exit_code == 0
            assert b"".join(e.data for e in events[:-1] if e.stream == "stdout") == b"a\n"

            task = asyncio.create_task(sb.exec(["sh", "-c", "sleep 1007 & sleep 1008"]))
            await _until_running("sleep 1008")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await _gone("sleep 1007") and await _gone("sleep 1008")
            assert (await sb.exec(["echo", "ok"])).text == "ok\n"
            assert isinstance(await sb.usage(), corral.ResourceUsage)
            sandbox_id = sb.id
        left = [i.id for i in await aio.list(backend=engine, settings=engine_settings)]
        assert sandbox_id not in left

    asyncio.run(main())


@pytest.mark.local
def test_run_and_its_cancellation(settings):
    async def main() -> None:
        result = await aio.run(["sh", "-c", "echo hi; exit 2"], backend="local", settings=settings)
        assert (result.text, result.exit_code) == ("hi\n", 2)
        task = asyncio.create_task(aio.run(["sleep", "1009"], backend="local", settings=settings))
        await _until_running("sleep 1009")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _gone("sleep 1009")
        assert await aio.list(backend="local", settings=settings) == []

    asyncio.run(main())


def test_run_on_every_engine(engine, engine_settings):
    async def main() -> None:
        result = await aio.run(["sh", "-c", "echo hi"], backend=engine, settings=engine_settings)
        assert result.text == "hi\n" and result.ok
        task = asyncio.create_task(
            aio.run(["sh", "-c", "sleep 1010"], backend=engine, settings=engine_settings)
        )
        await _until_running("sleep 1010")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _gone("sleep 1010")

    asyncio.run(main())


async def _ready(pool: aio.Pool, count: int) -> None:
    for _ in range(1200):
        if pool.stats().ready >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the pool never filled: {pool.stats()}")


@pytest.mark.local
def test_a_pool_hands_out_async_sandboxes_once(settings):
    async def main() -> None:
        async with aio.Pool(2, backend="local", settings=settings) as pool:
            await _ready(pool, 2)
            async with pool.acquire() as sb:
                assert isinstance(sb, aio.AsyncSandbox)
                await sb.write_file("/tmp/mine", b"secret")
                first = sb.id
            assert sb.closed
            async with pool.acquire() as sb:
                assert sb.id != first
                assert (await sb.exec(["cat", "/tmp/mine"])).exit_code != 0  # a fresh one
            with pytest.raises(RuntimeError):  # an error in the block still destroys it
                async with pool.acquire() as sb:
                    raise RuntimeError("boom")
            assert sb.closed
        assert pool.sync is not None and pool.sync.closed
        assert await aio.list(backend="local", settings=settings) == []

    asyncio.run(main())


@pytest.mark.local
def test_a_task_cancelled_while_waiting_for_a_pool_takes_nothing(settings, mount_root):
    async def main() -> None:
        source = mount_root / "repo"
        source.mkdir()
        mount = corral.Mount(str(source), "/repo")
        async with aio.Pool(1, backend="local", settings=settings, mounts=[mount]) as pool:
            await _ready(pool, 1)
            source.rmdir()  # from now on every creation fails: the pool cannot refill
            async with pool.acquire() as held:
                waiter = asyncio.create_task(pool.acquire(timeout=60).__aenter__())
                for _ in range(600):
                    if pool.stats().failures:
                        break
                    await asyncio.sleep(0.05)
                assert pool.stats().failures and not waiter.done()
                waiter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiter
                assert pool.stats().in_use == 1 and not held.closed  # only the held one
            assert pool.stats().in_use == 0
        assert await aio.list(backend="local", settings=settings) == []

    asyncio.run(main())


def test_a_pool_on_every_engine(engine, engine_settings):
    async def main() -> None:
        pool = aio.Pool(1, backend=engine, settings=engine_settings)
        async with pool, pool.acquire() as sb:
            assert (await sb.exec(["echo", "pooled"])).text == "pooled\n"
            sandbox_id = sb.id
        left = [i.id for i in await aio.list(backend=engine, settings=engine_settings)]
        assert sandbox_id not in left

    asyncio.run(main())
