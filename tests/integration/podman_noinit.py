"""A Podman service that has no catatonit, as on machines where docker.io came first.

Debian's podman only recommends "catatonit | tini | dumb-init", and docker.io depends on
tini, so where docker.io was installed first catatonit never is, and every container
asked to run with ``init`` fails to be created: "container-init binary not found on the
host: stat /usr/libexec/podman/catatonit". ``./scripts/engines up`` installs catatonit,
so the suite's own service never shows this; these do, without uninstalling anything:
each runs in a mount namespace of its own in which catatonit (or every init binary:
podman installed without its recommendations) is hidden. (Podman 4.3's REST service
ignores a containers.conf ``init_path``, so configuration cannot reproduce it.)

Each service is a private engine (own root, run root, tmpdir, file locks and network
folder, so nothing of it is shared with the suite's service), started once per session
and stopped at the end by its own pid. The client (corral, the tests) still sees the
host's inits: only the service cannot, so what corral decides must come from the
service's answers, not from the host's files alone.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from campaign.private_engines import IMAGE, PrivatePodman, busybox_rootfs_tar

from corral.testing.conformance import unavailable

# Where an init can be for Podman 4.3: its init_path default, its helper folders, and
# the folders a package puts programs in.
_PLACES = (
    "/usr/libexec/podman",
    "/usr/local/libexec/podman",
    "/usr/lib/podman",
    "/usr/local/lib/podman",
    "/usr/bin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/local/sbin",
)
# The services, by what they cannot see: catatonit only (docker.io's tini came first),
# or every init binary (podman installed without its recommendations).
HIDDEN = {
    "no-catatonit": ("catatonit",),
    "no-init": ("catatonit", "tini", "tini-static", "docker-init", "dumb-init"),
}

# Mounts, in the service's own namespace, an overlay on each folder given whose top
# layer ($1) holds only whiteouts (one per hidden program): the folder's other programs
# (conmon, runc, netavark, podman itself) stay. Then becomes the service.
_HIDE_AND_RUN = """set -e
whiteouts=$1; shift
while [ "$1" != -- ]; do
    mount -t overlay corral-hide-init -o "lowerdir=$whiteouts:$1" "$1"
    shift
done
shift
exec "$@"
"""

MISSING_INIT = "container-init binary not found"


def host_copies(names: tuple[str, ...]) -> list[str]:
    """Where this host has programs of these names (symlinks too), in folders of
    ``_PLACES``, each folder once."""
    found: dict[str, None] = {}
    for place in dict.fromkeys(os.path.realpath(p) for p in _PLACES):
        for name in names:
            if os.path.lexists(os.path.join(place, name)):
                found.setdefault(os.path.join(place, name))
    return list(found)


class NoInitPodman(PrivatePodman):
    """A private ``podman system service`` that cannot see the programs ``hidden``."""

    def __init__(self, hidden: tuple[str, ...]) -> None:
        super().__init__()
        self.hidden = hidden
        self.whiteouts = self.folder / "whiteouts"
        self.whiteouts.mkdir()
        for name in hidden:
            os.mknod(self.whiteouts / name, stat.S_IFCHR | 0o600, os.makedev(0, 0))

    def command(self) -> list[str]:
        folders = dict.fromkeys(os.path.dirname(p) for p in host_copies(self.hidden))
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _HIDE_AND_RUN,
            "sh",
            str(self.whiteouts),
            *folders,
            "--",
            *super().command(),
        ]


@dataclass(frozen=True)
class NoInitService:
    """A running service without some inits: its URL, and which kind (``HIDDEN``)."""

    url: str
    kind: str


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("podman", timeout=60)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def libpod(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One call to a service's libpod API (``path`` after ``/v4.0.0/libpod``): the
    status and the decoded JSON answer (None when empty)."""
    connection = _UnixConnection(url.removeprefix("unix://"))
    try:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        connection.request(method, f"/v4.0.0/libpod{path}", body=data, headers=headers)
        answer = connection.getresponse()
        raw = answer.read()
        return answer.status, json.loads(raw) if raw.strip() else None
    finally:
        connection.close()


def container_ids(url: str) -> set[str]:
    """The ids of every container the service has, running or not."""
    status, listed = libpod(url, "GET", "/containers/json?all=true")
    assert status == 200, listed
    return {c["Id"] for c in listed or []}


def check_inits_are_missing(url: str, hidden: tuple[str, ...]) -> None:
    """Prove the service stands for the users' machine: a container asked to run with
    the engine's own init, or with any hidden program of this host as its init, is
    refused at create, and nothing is made."""
    before = container_ids(url)
    for init_path in [None, *host_copies(hidden)]:
        spec = {
            "image": IMAGE,
            "command": ["true"],
            "init": True,
            **({"init_path": init_path} if init_path else {}),
            "netns": {"nsmode": "none"},
            "r_limits": [{"type": "nofile", "soft": 1024, "hard": 1024}],
        }
        status, answer = libpod(url, "POST", "/containers/create", spec)
        if status == 201:
            libpod(url, "DELETE", f"/containers/{answer['Id']}?force=true&timeout=0")
        message = (answer or {}).get("message", "")
        if status != 500 or MISSING_INIT not in message:
            raise RuntimeError(
                f"the Podman service that should not see {', '.join(hidden)} still found "
                f"{init_path or 'its own init'}: create answered {status} {answer}"
            )
    if container_ids(url) != before:
        raise RuntimeError("a create refused for its init still made a container")


def _requirements_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root: it mounts over /usr in a mount namespace of its own"
    missing = [b for b in ("podman", "unshare", "busybox", "runc") if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed; run ./scripts/engines up"
    return None


# Named apart from its function, so a test module can import it without shadowing it.
@pytest.fixture(scope="session", name="podman_noinit", params=sorted(HIDDEN))
def podman_noinit_service(request: pytest.FixtureRequest) -> Iterator[NoInitService]:
    """A Podman service without catatonit ("no-catatonit"), then one without any init
    binary ("no-init"), with the test image. Each is started once per session, then
    stopped (by its pid) and all it stored removed."""
    reason = _requirements_missing()
    if reason is not None:
        unavailable(f"a Podman service without catatonit {reason}")
    kind: str = request.param
    engine = NoInitPodman(HIDDEN[kind])
    try:
        engine.start()
        with tempfile.TemporaryDirectory(prefix="crl-image-") as folder:
            engine.import_image(busybox_rootfs_tar(Path(folder) / "rootfs.tar"))
        check_inits_are_missing(engine.url, engine.hidden)
    except BaseException:
        engine.remove_everything()
        raise
    try:
        yield NoInitService(engine.url, kind)
    finally:
        with contextlib.suppress(Exception):
            for container in container_ids(engine.url):  # a failed test's leftovers
                libpod(engine.url, "DELETE", f"/containers/{container}?force=true&timeout=0")
        engine.remove_everything()
