"""Engines of a test's own, to stop and restart without touching the shared ones, and a
loopback proxy that slows, silences or records an engine's answers.

A private engine lives under a folder of its own (socket, data, exec root, pid file,
log). It runs detached from the test process (so that restarting it inside a case
does not look like a process the case leaked), with a watchdog that stops it if the
test process dies without its finalizer. ``stop()`` ends only that engine, by its pid.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import psutil

IMAGE = os.environ.get("CORRALTEST_IMAGE", "corral-test/busybox:latest")
# Short paths: containerd's socket lives under the exec root and unix socket paths
# are limited to 108 bytes.
RUN_ROOT = Path("/run")


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _launch_detached(argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start ``argv`` in a session of its own, reparented away from this process; its pid.

    A watchdog (also detached) stops it if this process dies first.
    """
    launcher = 'setsid "$@" >"$LOG" 2>&1 </dev/null & echo $!'
    done = subprocess.run(
        ["sh", "-c", launcher, "sh", *argv],
        env={**(env or os.environ), "LOG": str(log)},
        cwd=log.parent,  # an engine's helpers write files where they run (conmon's "oom")
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    pid = int(done.stdout.strip())
    watchdog = (
        f"while kill -0 {os.getpid()} 2>/dev/null && kill -0 {pid} 2>/dev/null; do sleep 1; done;"
        f" kill {pid} 2>/dev/null"
    )
    subprocess.run(
        ["sh", "-c", f"setsid sh -c '{watchdog}' >/dev/null 2>&1 </dev/null &"],
        check=True,
        timeout=30,
    )
    return pid


def _stop_pid(pid: int, grace: float = 20) -> None:
    if not _pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)


def _unmount_under(folder: Path) -> None:
    """Lazily unmount whatever an engine left mounted below ``folder`` (deepest first)."""
    prefix = str(folder).rstrip("/") + "/"
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix) or point == str(folder):
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


def busybox_rootfs_tar(path: Path) -> Path:
    """The suite's busybox image as a tar to import (what scripts/engines builds)."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox is not installed; run ./scripts/engines up")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory(prefix="crl-rootfs-") as folder:
        root = Path(folder)
        for sub in ("bin", "tmp", "proc", "sys", "dev", "etc", "workspace"):
            (root / sub).mkdir()
        shutil.copy(busybox, root / "bin" / "busybox")
        for applet in applets.stdout.split():
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc" / "group").write_text("root:x:0:\n")
        with tarfile.open(path, "w") as tar:
            tar.add(root, arcname=".")
    return path


def _wait_for(ready, what: str, log: Path, timeout: float = 60, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():  # an engine that exited never answers
        if ready():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    raise RuntimeError(f"{what} did not answer within {timeout}s; its log ends:\n{tail}")


def _answers(socket_path: Path, ping: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(socket_path))
            s.sendall(f"GET {ping} HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n".encode())
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _data_folder(prefix: str, storage: Path | None) -> Path:
    """An engine's data root: a new folder under /var/lib, or in ``storage``."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=storage or "/var/lib"))


class PrivateEngine:
    """One engine instance of a test's own: start, stop, restart, by its own pid."""

    kind = ""
    ping = "/_ping"

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=f"crl-{self.kind}-", dir=RUN_ROOT))
        self.socket = self.folder / "engine.sock"
        self.log = self.folder / "engine.log"
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def running(self) -> bool:
        return self.pid is not None and _pid_alive(self.pid)

    def start(self) -> None:
        if self.running():
            return
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self.pid = _launch_detached(self.command(), self.log, self.environment())
        _wait_for(
            lambda: _answers(self.socket, self.ping),
            f"private {self.kind}",
            self.log,
            alive=self.running,
        )

    def stop(self) -> None:
        """Stop the engine (SIGTERM, then SIGKILL after a grace), by its pid only."""
        if self.pid is not None:
            _stop_pid(self.pid)
        self.pid = None

    def kill(self) -> None:
        """SIGKILL the engine at once, as a crash would."""
        if self.pid is not None and _pid_alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.pid = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove_everything(self) -> None:
        """Stop the engine and delete all it stored (after removing its containers)."""
        raise NotImplementedError

    def _wipe(self, *folders: Path) -> None:
        for folder in (*folders, self.folder):
            _unmount_under(folder)
            shutil.rmtree(folder, ignore_errors=True)


class PrivateDocker(PrivateEngine):
    """A second dockerd: own socket, data root, exec root (and managed containerd), pid
    file; no bridge and no iptables rules, so it changes nothing on the host network."""

    kind = "docker"

    def __init__(self, storage: Path | None = None) -> None:
        super().__init__()
        self.data = _data_folder("crl-docker-", storage)

    def command(self) -> list[str]:
        return [
            "dockerd",
            "--host",
            self.url,
            "--data-root",
            str(self.data),
            "--exec-root",
            str(self.folder / "x"),
            "--pidfile",
            str(self.folder / "docker.pid"),
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
        ]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "-H", self.url, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")},
        )

    def import_image(self, tar: Path, image: str = IMAGE) -> None:
        done = self.cli("import", str(tar), image)
        if done.returncode != 0:
            raise RuntimeError(f"docker import failed: {done.stderr}")

    def remove_everything(self) -> None:
        if self.running():
            ids = self.cli("ps", "-aq").stdout.split()
            if ids:
                self.cli("rm", "-fv", *ids)
        self.stop()
        self._wipe(self.data)


class PrivatePodman(PrivateEngine):
    """A second ``podman system service``: own root, runroot, tmpdir (file locks, so no
    lock is shared with the suite's service), runc, cgroupfs, ulimits under the host's."""

    kind = "podman"

    def __init__(self, storage: Path | None = None) -> None:
        super().__init__()
        self.data = _data_folder("crl-podman-", storage)
        # With a storage folder of the test's own, the run root lives there too.
        self.run = _data_folder("run-", storage) if storage is not None else self.folder / "run"
        self.conf = self.folder / "containers.conf"
        self.conf.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            "exit_command_delay = 5\n"
            'lock_type = "file"\n'
            'events_logger = "file"\n'
        )

    def flags(self) -> list[str]:
        return [
            "--root",
            str(self.data),
            "--runroot",
            str(self.run),
            "--tmpdir",
            str(self.folder / "tmp"),
            "--cgroup-manager",
            "cgroupfs",
            "--runtime",
            "runc",
            # Networks of its own: in the default folder (/etc/containers/networks), the
            # suite's service's sandbox networks would be this one's leftovers, for its
            # gc to remove. (No case makes a bridged sandbox here: netavark would name
            # its bridges podman1... as the suite's service does.)
            "--network-config-dir",
            str(self.folder / "networks"),
        ]

    def environment(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def command(self) -> list[str]:
        return ["podman", *self.flags(), "system", "service", "--time=0", self.url]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *self.flags(), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.environment(),
        )

    def import_image(self, tar: Path, image: str = IMAGE) -> None:
        done = self.cli("import", str(tar), image)
        if done.returncode != 0:
            raise RuntimeError(f"podman import failed: {done.stderr}")

    def remove_everything(self) -> None:
        self.cli("rm", "-fa", "-t", "0")
        self.stop()
        self.cli("rm", "-fa", "-t", "0")  # what the service could not remove
        self._wipe(self.data, self.run)


def start_private(kind: str, storage: Path | None = None) -> PrivateEngine:
    """A private engine of ``kind`` (docker or podman), started, with the test image;
    its stored data (images, layers, volumes) in ``storage`` when given."""
    engine: PrivateEngine = (PrivateDocker if kind == "docker" else PrivatePodman)(storage)
    try:
        engine.start()
        with tempfile.TemporaryDirectory(prefix="crl-image-") as folder:
            engine.import_image(busybox_rootfs_tar(Path(folder) / "rootfs.tar"))  # type: ignore[attr-defined]
    except BaseException:
        engine.remove_everything()
        raise
    return engine


# -- a small filesystem to fill ----------------------------------------------------------


class SmallDisk:
    """A small ext4 filesystem of a test's own (a loop-mounted image file), to put an
    engine's storage on and fill to 100 % without touching the host's disk.

    No blocks are reserved for root (the engines run as root and would use them), and
    4 KiB blocks, so that a fill leaves not even a fragment free. Mounted on a short
    path: Podman refuses a run root longer than 50 characters.
    """

    def __init__(self, size: int = 300 * 1024**2) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="crl-disk-", dir="/var/lib"))
        self.image = self.folder / "disk.img"
        self.path = Path(tempfile.mkdtemp(prefix="crl-disk-", dir=RUN_ROOT))
        self._fillers: list[Path] = []
        try:
            with open(self.image, "wb") as f:
                f.truncate(size)
            for argv in (
                ["mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", str(self.image)],
                ["mount", "-o", "loop", str(self.image), str(self.path)],
            ):
                done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
                if done.returncode != 0:
                    raise RuntimeError(f"{argv[0]} failed: {done.stderr.strip()}")
        except BaseException:
            self.remove()
            raise

    def free_bytes(self) -> int:
        found = os.statvfs(self.path)
        return found.f_bavail * found.f_frsize

    def fill(self) -> None:
        """Write until the filesystem refuses with ENOSPC: in 1 MiB, then 4 KiB pieces."""
        for chunk in (1024**2, 4096):
            filler = self.path / f"filler-{len(self._fillers)}"
            self._fillers.append(filler)
            block = b"\0" * chunk
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                while True:
                    os.write(fd, block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
            finally:
                os.close(fd)
        if self.free_bytes() != 0:
            raise RuntimeError(f"{self.path} still has {self.free_bytes()} bytes free")

    def free(self) -> None:
        """Remove what ``fill`` wrote."""
        for filler in self._fillers:
            with contextlib.suppress(FileNotFoundError):
                filler.unlink()
        self._fillers.clear()

    def remove(self) -> None:
        """Unmount the filesystem (lazily, whatever still uses it) and delete its image."""
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=60)
        with contextlib.suppress(OSError):
            self.path.rmdir()  # only once unmounted: never what was on the disk
        shutil.rmtree(self.folder, ignore_errors=True)


# -- a proxy in front of an engine socket ------------------------------------------------

_REQUEST_LINE = re.compile(rb"^(GET|POST|PUT|DELETE|HEAD) (\S+) HTTP/1\.[01]\r\n")


class EngineProxy:
    """A unix socket that forwards to an engine's, and can slow or hold its answers.

    ``delay`` seconds pass before the answer to each request whose "METHOD /path"
    matches ``slow`` (a regex; None: every request) is passed on; ``float("inf")``
    holds it until the proxy stops. Every request line seen is kept in ``requests``.
    """

    def __init__(self, upstream: str, folder: Path) -> None:
        self.upstream = upstream.removeprefix("unix://")
        self.path = folder / "proxy.sock"
        self.delay = 0.0
        self.slow: str | None = None
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(self.path))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept, name="engine-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.socket(socket.AF_UNIX)
            try:
                upstream.connect(self.upstream)
            except OSError:
                client.close()
                upstream.close()
                continue
            # The delays owed to this connection's next answers, and its ended directions.
            connection: dict[str, list] = {"pending": [], "ended": []}
            with self._lock:
                self._sockets |= {client, upstream}
            for source, target, forward in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pump, args=(source, target, forward, connection), daemon=True
                ).start()

    def _pump(
        self, source: socket.socket, target: socket.socket, forward: bool, connection: dict
    ) -> None:
        pending = connection["pending"]
        try:
            while chunk := source.recv(256 * 1024):
                if forward:
                    line = _REQUEST_LINE.match(chunk)
                    if line is not None:
                        request = f"{line[1].decode()} {line[2].decode()}"
                        self.requests.append(request)
                        if self.delay and (self.slow is None or re.search(self.slow, request)):
                            pending.append(self.delay)
                elif pending:
                    self._stop.wait(pending.pop(0))
                    if self._stop.is_set():
                        break
                target.sendall(chunk)
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (source, target):  # a broken side ends both directions
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        finally:
            self._close_when_done(source, target, connection)

    def _close_when_done(
        self, source: socket.socket, target: socket.socket, connection: dict
    ) -> None:
        # A pair is closed once both directions ended (or the proxy stops).
        with self._lock:
            connection["ended"].append(source)
            if len(connection["ended"]) < 2 and not self._stop.is_set():
                return
            for s in (source, target):
                self._sockets.discard(s)
        for s in (source, target):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=5)
        with self._lock:
            sockets, self._sockets = set(self._sockets), set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class SilentSocket:
    """A unix socket that accepts connections and never answers (a hung engine)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "silent.sock"
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(self.path))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(client)

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=5)
        for s in self._held:
            s.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# -- one private engine of each kind per test process ---------------------------------------


def require_binaries(kind: str, *more: str) -> None:
    """Skip (fail under CI) unless a private engine of ``kind`` and ``more`` can run here."""
    binary = "dockerd" if kind == "docker" else "podman"
    missing = [b for b in (binary, "busybox", *more) if shutil.which(b) is None]
    if missing:
        from cases import unavailable

        unavailable(
            f"a private {kind} engine: {', '.join(missing)} not installed; run ./scripts/engines up"
        )


_started: dict[str, PrivateEngine] = {}


def private_engine(kind: str, config: object) -> PrivateEngine:
    """The test process's private engine of ``kind``, started once and removed (with all
    it stored) when the session ends; started again if a case left it stopped.

    Without the engine's binaries a developer's run skips; CI fails instead.
    """
    require_binaries(kind)
    engine = _started.get(kind)
    if engine is None:
        engine = start_private(kind)
        _started[kind] = engine
        config.add_cleanup(engine.remove_everything)  # type: ignore[attr-defined]
    engine.start()
    return engine
