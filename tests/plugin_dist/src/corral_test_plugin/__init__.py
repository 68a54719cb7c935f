"""``subprocess-test``: a corral backend of plain host processes in a temporary folder.

It is NOT isolating: commands run as the caller, with the caller's rights; only their
working folder is the sandbox's. It exists to test plugin discovery and hooks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import operator
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import attrs

import corral
from corral.core.convert import structure, unstructure

_STATE = "corral-sandbox.json"
_NOT_ENFORCED = (
    corral.Capability.ISOLATION
    | corral.Capability.NETWORK_NONE
    | corral.Capability.READ_ONLY_ROOT
    | corral.Capability.NO_NEW_PRIVILEGES
    | corral.Capability.IMAGES
    | corral.Capability.INIT_COMMAND
    # Of the long-lived features it has background processes only (PROCESSES: its
    # exec takes streamed input and a name to signal by), which corral's keeper runs.
    | corral.Capability.PAUSE
    | corral.Capability.TTY
    | corral.Capability.EXTEND
    | corral.Capability.SNAPSHOTS
    | corral.Capability.MEMORY_SNAPSHOTS
    | corral.Capability.PORTS
    | corral.Capability.CHANGES
)


@attrs.frozen
class Settings:
    """``[backends.subprocess-test]``: ``root`` is the folder sandboxes are made in."""

    root: str | None = None


def _pump(pipe, stream: str, sink: corral.OutputSink) -> None:
    for chunk in iter(lambda: pipe.read1(65536), b""):
        sink.write(stream, chunk)


def _feed(pipe, data: bytes | corral.InputFeed) -> None:
    with contextlib.suppress(BrokenPipeError), pipe:
        if isinstance(data, bytes):
            pipe.write(data)
            return
        while (part := data.read()) != b"":  # a spawned process's input, as it comes
            pipe.write(part)
            pipe.flush()


class SubprocessTestBackend(corral.Backend):
    """Runs each command with ``subprocess.Popen`` in the sandbox's host folder.

    NOT isolating: it declares no ISOLATION capability, so corral refuses it unless the
    spec sets ``security.isolate = false``. It exists to test plugin discovery.
    """

    name = "subprocess-test"
    Settings = Settings

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self._running: dict[str | None, subprocess.Popen] = {}  # exec name: its process

    def _root(self) -> Path:
        default = Path(tempfile.gettempdir(), f"corral-subprocess-test-{os.getuid()}")
        return Path(self.settings.root) if self.settings.root else default

    def _folder(self, sandbox_id: str) -> Path:
        folder = self._root() / sandbox_id
        if not (folder / _STATE).is_file():
            raise corral.NotFoundError("no such sandbox", backend=self.name, sandbox_id=sandbox_id)
        return folder.resolve()

    def _host_path(self, sandbox_id: str, path: str) -> Path:
        folder = self._folder(sandbox_id)
        target = (folder / path.lstrip("/")).resolve()
        if target != folder and folder not in target.parents:
            raise corral.PathSecurityError(f"{path!r} leaves the sandbox", backend=self.name)
        return target

    def check(self) -> corral.Availability:
        return corral.Availability(True, "plain host processes; NOT isolating")

    def capabilities(self) -> corral.Capability:
        enforced = (c for c in corral.Capability if not c & _NOT_ENFORCED)
        return functools.reduce(operator.or_, enforced)

    def create(self, sandbox_id: str, spec: corral.SandboxSpec, labels: dict[str, str]) -> None:
        folder = self._root() / sandbox_id
        folder.mkdir(parents=True)
        now = time.time()
        expires = float(labels.get("corral.expires", now + spec.limits.lifetime))
        info = corral.SandboxInfo(sandbox_id, self.name, "running", now, expires, labels=labels)
        state = {"info": unstructure(info), "spec": unstructure(spec)}
        (folder / _STATE).write_text(json.dumps(state))

    def exec(self, sandbox_id, request: corral.ExecRequest, sink) -> corral.ExecStatus:
        env = {**request.env, "PATH": os.environ.get("PATH", os.defpath)}
        given = request.stdin if request.input is None else request.input
        stdin = subprocess.DEVNULL if given is None else subprocess.PIPE
        try:
            proc = subprocess.Popen(
                request.argv,
                cwd=self._folder(sandbox_id),
                env=env,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            sink.write("stderr", f"{request.argv[0]}: {e.strerror}\n".encode())
            return corral.ExecStatus(exit_code=127)
        deadline = time.monotonic() + (request.timeout or float("inf"))
        timed_out = False
        # Known by name before any output can reach a reader, who may signal at once.
        self._running[request.name] = proc
        with proc:
            pipes = ((proc.stdout, "stdout"), (proc.stderr, "stderr"))
            readers = [threading.Thread(target=_pump, args=(p, n, sink)) for p, n in pipes]
            feeder = None
            if proc.stdin is not None:
                feeder = threading.Thread(target=_feed, args=(proc.stdin, given), daemon=True)
                feeder.start()
            for reader in readers:
                reader.start()
            while proc.poll() is None and not timed_out:
                timed_out = sink.cancelled or time.monotonic() >= deadline
                time.sleep(0.01)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the command and all it left running
            proc.wait()
            self._running.pop(request.name, None)
            if request.input is not None:
                request.input.close()  # the feeder's read ends
            for reader in [*readers, *([feeder] if feeder else [])]:
                reader.join()
        code = proc.returncode
        if code < 0:
            return corral.ExecStatus(exit_code=128 - code, timed_out=timed_out, signal=-code)
        return corral.ExecStatus(exit_code=code, timed_out=timed_out)

    def exec_signal(self, sandbox_id: str, name: str, signum: int) -> None:
        proc = self._running.get(name)
        if proc is None:
            raise corral.ConflictError(f"no running exec {name}", sandbox_id=sandbox_id)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)

    def put_archive(self, sandbox_id: str, path: str, archive) -> None:
        target = self._host_path(sandbox_id, path)
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=archive, mode="r|") as tar:
            tar.extractall(target, filter="data")

    def get_archive(self, sandbox_id: str, path: str):
        target = self._host_path(sandbox_id, path)
        if not target.exists():
            raise corral.NotFoundError(f"{path}: no such file", sandbox_id=sandbox_id)
        out = tempfile.SpooledTemporaryFile(max_size=8 * 1024**2)  # noqa: SIM115
        with tarfile.open(fileobj=out, mode="w") as tar:
            tar.add(target, arcname=target.name or ".")
        out.seek(0)

        def chunks():
            with out:
                yield from iter(lambda: out.read(65536), b"")

        return chunks()

    def usage(self, sandbox_id: str) -> corral.ResourceUsage:
        self._folder(sandbox_id)
        return corral.ResourceUsage()

    def destroy(self, sandbox_id: str) -> None:
        shutil.rmtree(self._root() / sandbox_id, ignore_errors=True)

    def list(self) -> list[corral.SandboxInfo]:
        root = self._root()
        folders = sorted(root.iterdir()) if root.is_dir() else []
        return [self._load(f)[0] for f in folders if (f / _STATE).is_file()]

    def inspect(self, sandbox_id: str) -> tuple[corral.SandboxInfo, corral.SandboxSpec]:
        return self._load(self._folder(sandbox_id))

    @staticmethod
    def _load(folder: Path) -> tuple[corral.SandboxInfo, corral.SandboxSpec]:
        state = json.loads((folder / _STATE).read_text())
        info = structure(state["info"], corral.SandboxInfo)
        return info, structure(state["spec"], corral.SandboxSpec)


@corral.hookimpl
def corral_backends() -> list[corral.BackendInfo]:
    description = "plain host processes in a temporary folder; NOT isolating (tests only)"
    return [corral.BackendInfo("subprocess-test", SubprocessTestBackend, description)]
