"""THREATS.md B10, crash safety (T79, T80): a program that holds sandboxes is SIGKILLed,
a sandbox dies or vanishes from outside, a create fails halfway. Whatever happens,
every sandbox ends by itself within its lifetime, at once under ``corral gc``, and
nothing half-made is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import private_engines
import psutil
import pytest

import corral
from corral.core.plugins import get_host
from corral.core.settings import load_settings

CORRAL_CLI = Path(sys.executable).with_name("corral")
# Long enough for a loaded 2-core machine to create a few sandboxes and start their
# streams before the program is killed; short enough to wait out in a test.
SHORT_LIFETIME = 8
# Engine removal after a lifetime ends, on a busy machine.
REMOVAL_GRACE = 45


# -- helpers --------------------------------------------------------------------------------


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(folder: Path, backend: str, settings: corral.Settings) -> Path:
    """The test's settings as a corral.toml, for another process (CORRAL_CONFIG)."""
    lines = [f"backend = {_toml(backend)}", f"mount_roots = {_toml(list(settings.mount_roots))}"]
    lines.append(f"[backends.{backend}]")
    for key, value in settings.backends[backend].items():
        lines.append(f"{key} = {_toml(value)}")
    path = folder / "corral.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def child_environment(config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    return {**env, "CORRAL_CONFIG": str(config), "CORRAL_DISABLE_PLUGIN_AUTOLOAD": "1"}


# A program that makes sandboxes (each with a streaming exec running), prints their ids
# once every stream has produced output, then waits to be killed.
HOLDER = textwrap.dedent("""
    import json, sys, threading, time
    import corral
    plans = json.loads(sys.argv[1])
    boxes = [corral.create(**plan) for plan in plans]
    started = [threading.Event() for _ in boxes]
    def stream(sb, event):
        try:
            sb.exec(["sh", "-c", "echo started; exec sleep 3217"],
                    on_chunk=lambda chunk: event.set())
        finally:
            event.set()
    for sb, event in zip(boxes, started):
        threading.Thread(target=stream, args=(sb, event), daemon=True).start()
    for event in started:
        event.wait(120)
    print(json.dumps([[sb.id, sb.expires] for sb in boxes]), flush=True)
    time.sleep(3600)
""")


def run_and_kill_holder(config: Path, cwd: Path, plans: list[dict[str, Any]]) -> list[list]:
    """Run HOLDER with ``plans`` (create() keywords), SIGKILL it once its sandboxes are
    up; their [id, expires] pairs."""
    import json

    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, json.dumps(plans)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_environment(config),
        cwd=cwd,
    )
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        assert line, f"the holder failed: {child.stderr.read()}"  # type: ignore[union-attr]
        made = json.loads(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()  # type: ignore[union-attr]
        child.stderr.close()  # type: ignore[union-attr]
    assert child.returncode == -signal.SIGKILL
    return made


def sandbox_processes(marker: str = "sleep 3217") -> list[int]:
    """Host processes running the holder's exec (on any backend, seen from the host)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if marker in " ".join(p.info["cmdline"] or []):
            found.append(p.pid)
    return found


def engine_has(raw_client_of: Callable, engine: str, sandbox_id: str) -> bool:
    client = raw_client_of(engine)
    try:
        label = f"corral.sandbox={sandbox_id}"
        containers = client.containers(all=True, filters={"label": label})
        volumes = client.volumes(filters={"label": label})["Volumes"] or []
    finally:
        client.close()
    return bool(containers or volumes)


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def local_folders(settings: corral.Settings) -> set[str]:
    root = Path(settings.backends["local"]["state_dir"]) / "local"
    return {p.name for p in root.iterdir()} if root.exists() else set()


# -- T79: the program that made them is SIGKILLed ------------------------------------------


def test_a_killed_programs_sandboxes_end_within_their_lifetime(
    backend, backend_settings, shared_tmp, raw_client_of
):
    config = write_config(shared_tmp, backend, backend_settings)
    plans = [{"lifetime": SHORT_LIFETIME} for _ in range(3)]
    made = run_and_kill_holder(config, shared_tmp, plans)
    ids = [sandbox_id for sandbox_id, _ in made]
    assert len(set(ids)) == 3
    if backend == "local":
        # No process of a local sandbox outlives its program (bwrap --die-with-parent)...
        assert wait_until(lambda: sandbox_processes() == [], 15), sandbox_processes()
        assert set(ids) <= local_folders(backend_settings)
        # ...and the next program's first create sweeps the expired folders and cgroups.
        time.sleep(max(expires for _, expires in made) - time.time() + 0.5)
        with corral.create(backend="local", settings=backend_settings) as next_one:
            assert local_folders(backend_settings) == {next_one.id}
        return
    # Containers: PID 1 ends with the lifetime and the engine removes the rest; no gc.
    gone = wait_until(
        lambda: not any(engine_has(raw_client_of, backend, i) for i in ids),
        SHORT_LIFETIME + REMOVAL_GRACE,
    )
    assert gone, "sandboxes (or their volumes) outlived their lifetime"
    assert sandbox_processes() == []


@pytest.fixture
def gc_target(
    backend, backend_settings, request, state_dir, mount_root
) -> Iterator[corral.Settings]:
    """Settings where ``corral gc --all`` may remove everything: the local backend's own
    state folder, or a private engine (never the shared ones other tests are using)."""
    if backend == "local":
        yield backend_settings
        return
    engine = private_engines.private_engine(backend, request.config)
    settings = load_settings(
        {
            "mount_roots": [str(mount_root)],
            "backends": {
                backend: {"url": engine.url, "pull": "never", "default_image": engine_image()}
            },
        },
        cwd=state_dir,
        environ={},
    )
    yield settings
    # Whatever the case left on the private engine goes, so later cases start empty.
    corral.gc(backend=backend, settings=settings, everything=True)


def engine_image() -> str:
    return private_engines.IMAGE


def corral_gc(config: Path, cwd: Path, *options: str) -> list[str]:
    done = subprocess.run(
        [str(CORRAL_CLI), "gc", *options],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_environment(config),
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_corral_gc_removes_a_killed_programs_sandboxes_at_once(backend, gc_target, shared_tmp):
    config = write_config(shared_tmp, backend, gc_target)
    expired: dict[str, Any] = {"lifetime": 5}
    if backend != "local":
        # A command of its own as PID 1: bounded by the lifetime too.
        expired["command"] = ["sleep", "600"]
    made = run_and_kill_holder(config, shared_tmp, [expired, {"lifetime": "10m"}])
    (old, old_expires), (young, _) = made
    listed = {i.id for i in corral.list(backend=backend, settings=gc_target)}
    assert {old, young} <= listed
    time.sleep(max(old_expires - time.time() + 1, 0))

    # Plain gc: what is past its lifetime goes at once, the rest stays. (A container's
    # PID 1 may have ended it already, command and all: then gc finds nothing to do.)
    removed = corral_gc(config, shared_tmp)
    assert removed == [old] if backend == "local" else set(removed) <= {old}
    listed = {i.id for i in corral.list(backend=backend, settings=gc_target)}
    assert old not in listed and young in listed
    # --all: every sandbox of corral's there, whatever its lifetime.
    assert corral_gc(config, shared_tmp, "--all") == [young]
    assert corral.list(backend=backend, settings=gc_target) == []
    assert sandbox_processes() == []
    if backend == "local":
        assert local_folders(gc_target) == set()


# -- a sandbox killed or removed from outside ------------------------------------------------


def _expect_gone(call: Callable[[], object], sandbox_id: str) -> corral.SandboxError:
    with pytest.raises(corral.SandboxError) as info:
        call()
    error = info.value
    # Dead (not running) or removed: either way final, never worth retrying.
    assert isinstance(error, (corral.NotFoundError, corral.ConflictError)), repr(error)
    assert error.retryable is False, repr(error)
    assert error.sandbox_id == sandbox_id
    return error


@pytest.mark.parametrize("how", ["kill", "remove"])
def test_a_sandbox_ended_from_outside_reports_it_and_closes_cleanly(
    backend, sandbox, raw_client_of, how
):
    if backend == "local" and how == "kill":
        pytest.skip(
            "a local sandbox's agent killed from outside is replaced at the next exec "
            "(test_local), and its exec killed from outside is the next case"
        )
    sb = sandbox()
    twin = sandbox()  # the same treatment spares the one not touched
    sb.write_file("/workspace/a", b"before")
    if backend == "local":
        folder = Path(sb.backend.root) / sb.id  # type: ignore[attr-defined]
        # Everything in it goes; the folder itself stays when it is a tmpfs (corral as root).
        subprocess.run(["rm", "-rf", str(folder)], check=False)
        assert not (folder / "meta.json").exists()
    else:
        client = raw_client_of(backend)
        try:
            if how == "kill":
                client.kill(f"corral-{sb.id}")
            else:
                client.remove_container(f"corral-{sb.id}", force=True, v=True)
        finally:
            client.close()
    # At once: the container may still be stopping (a final conflict) or gone already.
    _expect_gone(lambda: sb.exec(["true"]), sb.id)
    if backend != "local":
        gone = wait_until(lambda: not engine_has(raw_client_of, backend, sb.id), REMOVAL_GRACE)
        assert gone, "the engine kept a container killed from outside"
    for call in (
        lambda: sb.exec(["true"]),
        lambda: sb.write_file("/workspace/a", b"after"),
        lambda: sb.read_file("/workspace/a"),
        sb.usage,
    ):
        assert isinstance(_expect_gone(call, sb.id), corral.NotFoundError)
    sb.close()
    sb.close()  # idempotent
    with pytest.raises(corral.SandboxClosedError):
        sb.exec(["true"])
    assert twin.exec(["cat", "/etc/passwd"]).exit_code == 0


def test_a_local_exec_killed_from_outside_ends_and_the_sandbox_lives_on(backend, sandbox):
    if backend != "local":
        pytest.skip("the container backends' case is the container killed from outside")
    sb = sandbox()
    token = uuid.uuid4().hex[:8]
    holder: list[corral.ExecResult] = []
    worker = threading.Thread(
        # The token stays in the shell's arguments: the shell waits for its sleep.
        target=lambda: holder.append(sb.exec(["sh", "-c", f"sleep 3217; : {token}"]))
    )
    worker.start()
    assert wait_until(lambda: sandbox_processes(token) != [], 30, 0.05)
    for pid in sandbox_processes(token):
        os.kill(pid, signal.SIGKILL)
    worker.join(60)
    assert not worker.is_alive(), "the exec hung after its process was killed"
    assert holder[0].exit_code == 137 and holder[0].signal == 9
    assert sb.exec(["echo", "alive"]).text == "alive\n"


# -- T80: failure partway through create ---------------------------------------------------


class _RefusingObserver:
    """A plugin whose corral_sandbox_created raises (a user's hook failing halfway)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.seen: list[str] = []

    @corral.hookimpl
    def corral_sandbox_created(self, sandbox: corral.Sandbox) -> None:
        self.seen.append(sandbox.id)
        raise self.error


@pytest.fixture
def refusing_observer() -> Iterator[Callable[[BaseException], _RefusingObserver]]:
    registered: list[_RefusingObserver] = []

    def _register(error: BaseException) -> _RefusingObserver:
        plugin = _RefusingObserver(error)
        get_host().pm.register(plugin, name=f"refusing-{uuid.uuid4().hex}")
        registered.append(plugin)
        return plugin

    yield _register
    for plugin in registered:
        if get_host().pm.is_registered(plugin):
            get_host().pm.unregister(plugin)


@pytest.mark.parametrize(
    "error", [RuntimeError("observer refused"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
def test_a_hook_failing_after_the_backend_made_it_removes_the_sandbox(
    backend, backend_settings, refusing_observer, error
):
    plugin = refusing_observer(error)
    # An interrupt passes unchanged; any other error is the core's, naming the plugin,
    # with the plugin's own as its cause (the error boundary).
    raised = type(error) if isinstance(error, KeyboardInterrupt) else corral.InternalError
    with pytest.raises(raised) as info:
        corral.create(backend=backend, settings=backend_settings, lifetime="10m")
    assert error in (info.value, info.value.__cause__)
    assert len(plugin.seen) == 1
    listed = {i.id for i in corral.list(backend=backend, settings=backend_settings)}
    assert plugin.seen[0] not in listed
    get_host().pm.unregister(plugin)
    # The twin: without the failing hook the same create works.
    with corral.create(backend=backend, settings=backend_settings) as sb:
        assert sb.exec(["echo", "ok"]).text == "ok\n"


def test_a_container_that_cannot_start_is_removed(backend, sandbox, mount_root, raw_client_of):
    if backend == "local":
        pytest.skip("the local backend starts nothing at create")
    token = uuid.uuid4().hex
    # The engine accepts the container, and runc then fails to start it: a folder
    # cannot be bound onto the image's /bin/busybox file.
    with pytest.raises(corral.SandboxError) as info:
        sandbox(mounts=[corral.Mount(str(mount_root), "/bin/busybox")], labels={"t80": token})
    assert "/bin/busybox" in str(info.value)
    client = raw_client_of(backend)
    try:
        assert client.containers(all=True, filters={"label": f"t80={token}"}) == []
    finally:
        client.close()
    # The twin: the same mount on a folder path starts.
    sb = sandbox(mounts=[corral.Mount(str(mount_root), "/data")], labels={"t80": token})
    assert sb.exec(["ls", "/data"]).exit_code == 0


def test_an_interrupt_in_the_middle_of_create_removes_the_half_made_container(
    backend, backend_settings, settings_of, shared_tmp, raw_client_of
):
    """SIGINT lands while create() waits on the engine, after the container exists."""
    if backend == "local":
        pytest.skip("a local create makes nothing an engine could keep")
    url = os.environ[
        {"docker": "CORRALTEST_DOCKER_URL", "podman": "CORRALTEST_PODMAN_URL"}[backend]
    ]
    proxy = private_engines.EngineProxy(url, shared_tmp)
    try:
        proxy.delay = 1.0  # every answer: the create spans several seconds
        slow = settings_of(backend, url=proxy.url)
        token = uuid.uuid4().hex
        seen = threading.Event()
        main = threading.main_thread().ident

        def interrupt_once_it_exists() -> None:
            client = raw_client_of(backend)
            try:
                while not seen.is_set():
                    # Once it runs: interrupted any earlier, while the engine is still
                    # creating it, Docker may finish the container after the clean-up
                    # removed it (left for `corral gc`: it never started, so its
                    # lifetime cannot end it).
                    running = {"label": f"t80={token}", "status": "running"}
                    if client.containers(all=True, filters=running):
                        seen.set()
                        signal.pthread_kill(main, signal.SIGINT)  # type: ignore[arg-type]
                    time.sleep(0.02)
            finally:
                client.close()

        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        watcher = threading.Thread(target=interrupt_once_it_exists, daemon=True)
        watcher.start()
        try:
            try:
                made = corral.create(backend=backend, settings=slow, labels={"t80": token})
            except KeyboardInterrupt:
                made = None
            else:
                made.close()
            assert made is None, "the interrupt came only after create() had returned"
        finally:
            seen.set()
            watcher.join(30)
            signal.signal(signal.SIGINT, previous)
        client = raw_client_of(backend)
        try:
            assert client.containers(all=True, filters={"label": f"t80={token}"}) == []
        finally:
            client.close()
    finally:
        get_host().close()  # the proxied client's connections, before the proxy goes
        proxy.stop()
    # The twin, through the engine directly: the same create works.
    with corral.create(backend=backend, settings=backend_settings, labels={"t80": token}) as sb:
        assert sb.exec(["echo", "ok"]).text == "ok\n"
