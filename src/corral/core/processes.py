"""Spawned processes, the callers' side: the Backend's default process methods.

Each sandbox's processes live in a folder of this host, private to the user:
``$TMPDIR/corral-<euid>/processes/<backend>/<sandbox>/``, holding the keeper's socket
and lock, and one folder per process (``meta.json``, ``output``: frames of what it
printed, ``result.json`` once it ended). ``keeper.py`` is the other side. A process
that ended stays readable from its files after its keeper left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from .errors import ConflictError, InternalError, NotFoundError, SandboxError, rebuilt
from .results import ProcessInfo, ProcessRead

if TYPE_CHECKING:
    from .backend import Backend
    from .spec import ExecRequest

_START_WITHIN = 30.0  # seconds for a keeper to start listening


def root() -> Path:
    return Path(tempfile.gettempdir()) / f"corral-{os.geteuid()}" / "processes"


def folder(backend: Backend, sandbox_id: str) -> Path:
    return root() / backend.name / sandbox_id


def _private(path: Path) -> None:
    """Make ``path`` and its parents up to the temp folder, each the user's own and
    closed to others: the temp folder is everyone's, and a folder planted there by
    another user must not receive our processes' output (others may pass through a
    folder, as the local backend's sandboxes do through ``corral-<euid>``, never write)."""
    at = Path(tempfile.gettempdir())
    for part in path.relative_to(at).parts:
        at = at / part
        with contextlib.suppress(FileExistsError):
            os.mkdir(at, 0o700)
        found = os.lstat(at)
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid() or found.st_mode & 0o022:
            raise InternalError(
                f"{at} is not a private folder of this user; remove it and try again"
            )


def _call(where: Path, op: str, timeout: float = 60.0, **args: Any) -> Any:
    """One request to the keeper of ``where``; ConnectionError when none listens."""
    from .keeper import receive, send, socket_path

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        with socket_path(where) as address:
            sock.connect(address)
        send(sock, (op, args))
        answer = receive(sock)
    if answer[0] == "ok":
        return answer[1]
    raise rebuilt(answer[1], answer[2])


def _keeper_alive(where: Path) -> bool:
    """Whether a keeper holds the folder's lock (it does for its whole life)."""
    try:
        with open(where / "keeper.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False


def _start_keeper(backend: Backend, sandbox_id: str, where: Path) -> None:
    _private(where)
    with open(where / "keeper.log", "ab") as log:
        keeper = subprocess.Popen(
            [sys.executable, "-m", "corral.core.keeper", str(where)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # a terminal's Ctrl-C to the caller never reaches it
            cwd="/",
        )
    assert keeper.stdin is not None and keeper.stdout is not None
    try:
        keeper.stdin.write(pickle.dumps((type(backend), backend.settings, sandbox_id)))
        keeper.stdin.close()
        said = keeper.stdout.readline().strip()
    finally:
        keeper.stdout.close()
        keeper.wait(_START_WITHIN)  # the first fork: it leaves at once
    if said not in (b"ready", b"busy"):
        raise InternalError(
            f"corral's keeper of sandbox {sandbox_id} did not start (see {where}/keeper.log)",
            backend=backend.name,
            sandbox_id=sandbox_id,
        )


def _ask(backend: Backend, sandbox_id: str, op: str, **args: Any) -> Any:
    """A request to the sandbox's keeper, started first where none runs, or again where
    the one there is leaving (it leaves once idle, and may be going as we ask)."""
    from .keeper import LEAVING

    where = folder(backend, sandbox_id)
    for attempt in range(3):
        try:
            return _call(where, op, **args)
        except (FileNotFoundError, ConnectionError) as e:
            # None listens, or one closed without an answer as it left.
            if attempt == 2:
                raise _unreachable(backend, sandbox_id, where, e) from e
        except ConflictError as e:
            if e.message != LEAVING or attempt == 2:
                raise
        except OSError as e:
            raise _unreachable(backend, sandbox_id, where, e) from e
        _await_gone(where)
        _start_keeper(backend, sandbox_id, where)
    raise AssertionError("unreachable")


def _await_gone(where: Path) -> None:
    """Until a leaving keeper let go of the folder's lock (it does within seconds)."""
    deadline = time.monotonic() + 15
    while _keeper_alive(where) and time.monotonic() < deadline:
        time.sleep(0.01)


def _unreachable(
    backend: Backend, sandbox_id: str, where: Path, error: BaseException | None = None
) -> InternalError:
    why = f": {error}" if error else ""
    return InternalError(
        f"corral's keeper of this sandbox cannot be reached{why} (see {where}/keeper.log)",
        backend=backend.name,
        sandbox_id=sandbox_id,
    )


def spawn(
    backend: Backend, sandbox_id: str, request: ExecRequest, idle_timeout: float | None
) -> ProcessInfo:
    process_id = "p-" + uuid.uuid4().hex[:12]
    if idle_timeout is not None:
        request = attrs.evolve(request, idle_timeout=idle_timeout)
    info: ProcessInfo = _ask(backend, sandbox_id, "spawn", process_id=process_id, request=request)
    return info


def _process_folder(backend: Backend, sandbox_id: str, process_id: str) -> Path:
    where = folder(backend, sandbox_id) / process_id
    if "/" in process_id or not (where / "meta.json").exists():
        raise NotFoundError(
            f"no process {process_id!r} in this sandbox",
            backend=backend.name,
            sandbox_id=sandbox_id,
        )
    return where


def listing(backend: Backend, sandbox_id: str) -> list[ProcessInfo]:
    where = folder(backend, sandbox_id)
    if not where.is_dir():
        return []
    alive = _keeper_alive(where)
    found = []
    for meta_path in sorted(where.glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        result = _record(meta_path.parent)
        found.append(
            ProcessInfo(
                id=meta_path.parent.name,
                argv=tuple(meta["argv"]),
                tty=meta["tty"],
                started=meta["started"],
                running=result is None and alive,
                exit_code=None if result is None else result.get("exit_code"),
            )
        )
    return sorted(found, key=lambda p: p.started)


def _record(process_folder: Path) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads((process_folder / "result.json").read_text())
    except FileNotFoundError:
        return None
    return record


def read(
    backend: Backend, sandbox_id: str, process_id: str, offset: int, wait: float
) -> ProcessRead:
    where = _process_folder(backend, sandbox_id, process_id)
    try:
        answer: ProcessRead = _call(
            where.parent, "read", timeout=wait + 30, process_id=process_id, offset=offset, wait=wait
        )
        return answer
    except (FileNotFoundError, ConnectionError, NotFoundError):
        pass  # no keeper (it left after the end), or one that never ran this process
    except OSError as e:
        raise _unreachable(backend, sandbox_id, where.parent, e) from e
    from .keeper import read_output, result_of

    record = _record(where)
    if record is None:
        raise InternalError(
            f"the keeper of process {process_id} ended before the process did "
            f"(see {where.parent}/keeper.log)",
            backend=backend.name,
            sandbox_id=sandbox_id,
        )
    if "error" in record:
        raise rebuilt(*record["error"])
    size = (where / "output").stat().st_size if (where / "output").exists() else 0
    offset = size if offset < 0 else offset
    chunks, after = read_output(where / "output", offset) if offset < size else ([], offset)
    result = result_of(record, where / "output") if after >= size else None
    return ProcessRead(tuple(chunks), after, result)


def control(backend: Backend, sandbox_id: str, process_id: str, op: str, **args: Any) -> None:
    where = _process_folder(backend, sandbox_id, process_id)
    if op not in ("write", "close_stdin", "signal", "kill", "resize"):
        raise ValueError(f"no such process operation: {op}")
    try:
        _call(where.parent, op, process_id=process_id, **args)
    except NotFoundError:  # a later keeper, that never ran it: it ended under another
        raise ConflictError(
            f"process {process_id} has ended", backend=backend.name, sandbox_id=sandbox_id
        ) from None
    except OSError as e:
        if not isinstance(e, (FileNotFoundError, ConnectionError)):
            raise _unreachable(backend, sandbox_id, where.parent, e) from e
        raise ConflictError(
            f"process {process_id} has ended", backend=backend.name, sandbox_id=sandbox_id
        ) from None


def forget(backend: Backend, sandbox_id: str) -> None:
    """Stop the sandbox's keeper (its processes with it) and remove its folder."""
    where = folder(backend, sandbox_id)
    if not where.exists():
        return
    with contextlib.suppress(OSError, SandboxError, ConnectionError):
        _call(where, "shutdown", timeout=5)
    _await_gone(where)
    shutil.rmtree(where, ignore_errors=True)


def kept_sandboxes(backend: Backend) -> list[str]:
    """The sandboxes of ``backend`` this host keeps processes of (for ``gc``)."""
    where = root() / backend.name
    try:
        return sorted(p.name for p in where.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
