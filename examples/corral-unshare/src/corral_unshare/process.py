"""Running one command line: output to the sink as it comes, and a hard stop on timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from typing import IO

from corral import ExecStatus, OutputSink

_CHUNK = 64 * 1024


def run(
    argv: list[str],
    env: dict[str, str],
    stdin: bytes | None,
    sink: OutputSink,
    timeout: float | None,
    running: set[int],
) -> ExecStatus:
    """Run ``argv``; on timeout or cancel, SIGKILL it (``unshare --kill-child`` does the rest).

    Its pid is in ``running`` while it runs, for ``destroy`` to kill.

    Raises:
        OSError: when ``argv[0]`` itself cannot start.
    """
    process = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd="/",
        close_fds=True,
        start_new_session=True,  # a Ctrl-C meant for the caller does not reach it
    )
    running.add(process.pid)
    try:
        return _supervise(process, stdin, sink, timeout)
    finally:
        running.discard(process.pid)


def _supervise(
    process: subprocess.Popen[bytes], stdin: bytes | None, sink: OutputSink, timeout: float | None
) -> ExecStatus:
    threads = [
        threading.Thread(target=_drain, args=(process.stdout, "stdout", sink), daemon=True),
        threading.Thread(target=_drain, args=(process.stderr, "stderr", sink), daemon=True),
    ]
    if stdin is not None:
        threads.append(threading.Thread(target=_feed, args=(process.stdin, stdin), daemon=True))
    for thread in threads:
        thread.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out = False
    while True:
        try:
            process.wait(0.05)
            break
        except subprocess.TimeoutExpired:
            if sink.cancelled or (deadline is not None and time.monotonic() >= deadline):
                timed_out = True
                process.kill()
                process.wait()
                break
    for thread in threads:
        # Every process of the command is gone with its pid namespace, so the pipes
        # close; the bound only guards against a bug here hanging the caller.
        thread.join(10)
    code = process.returncode
    if code < 0:
        return ExecStatus(exit_code=128 - code, timed_out=timed_out, signal=-code)
    return ExecStatus(exit_code=code, timed_out=timed_out)


def _drain(pipe: IO[bytes], stream: str, sink: OutputSink) -> None:
    with pipe:
        fd = pipe.fileno()
        while data := os.read(fd, _CHUNK):
            sink.write(stream, data)


def _feed(pipe: IO[bytes], data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError, OSError), pipe:
        pipe.write(data)


def kill_all(pids: list[int]) -> None:
    """SIGKILL each pid; gone is fine."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
