"""The raw side on a container engine: docker-py or podman-py doing corral's work by hand.

Both clients share docker-py's object model (containers.run, exec_run, put_archive,
get_archive, stats), so one class serves both; the Podman subclass differs in removal
and stats. Every container carries the run's raw label, so leftovers can be found.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from typing import Any

from common import RAW_LABEL, RUN_LABEL
from sides import Side


def tar_of(name: str, data: bytes) -> bytes:
    """A one-file tar in memory, as a docker-py user builds for put_archive."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def untar_one(chunks: Any) -> bytes:
    """The one file in a tar stream returned by get_archive."""
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r") as tar:
        member = tar.next()
        extracted = tar.extractfile(member) if member else None
        if extracted is None:
            raise RuntimeError("the archive holds no regular file")
        return extracted.read()


class EngineRawSide(Side):
    """docker-py's high-level client doing the work corral does."""

    def __init__(self, name: str, client: Any, image: str, run_id: str) -> None:
        self.name = name
        self.client = client
        self.image = image
        self.labels = {RAW_LABEL: run_id}
        self.run_id = run_id

    def run_keywords(self) -> dict[str, Any]:
        return {
            "command": ["sleep", "3600"],
            "detach": True,
            "network_mode": "none",
            "labels": self.labels,
        }

    def create(self) -> Any:
        return self.client.containers.run(self.image, **self.run_keywords())

    def destroy(self, handle: Any) -> None:
        handle.remove(force=True)

    def exec_true(self, handle: Any) -> None:
        # docker-py returns an ExecResult, podman-py a plain (exit code, output) pair.
        exit_code, output = handle.exec_run(["true"])
        if exit_code != 0:
            raise RuntimeError(f"true exited {exit_code}: {output!r}")

    def usage(self, handle: Any) -> None:
        handle.stats(stream=False)

    def write(self, handle: Any, name: str, data: bytes) -> None:
        if not handle.put_archive("/tmp", tar_of(name, data)):
            raise RuntimeError("put_archive refused")

    def read(self, handle: Any, name: str) -> bytes:
        chunks, _ = handle.get_archive(f"/tmp/{name}")
        return untar_one(chunks)

    def alive(self, handle: Any) -> bool:
        handle.reload()
        return handle.status == "running"

    def one_shot(self) -> None:
        """The client's default run-to-completion cycle: ``containers.run(remove=True)``."""
        self.client.containers.run(
            self.image, ["true"], remove=True, network_mode="none", labels=self.labels
        )

    def _listed(self, label: str) -> list[Any]:
        return self.client.containers.list(all=True, filters={"label": label})

    def leftovers(self) -> list[str]:
        return [c.id for c in self._listed(f"{RAW_LABEL}={self.run_id}")]

    def corral_leftovers(self) -> list[str]:
        """corral's sandboxes of this run still on the engine."""
        return [c.id for c in self._listed(f"{RUN_LABEL}={self.run_id}")]

    def remove_labelled(self, label: str) -> None:
        for container in self._listed(label):
            with contextlib.suppress(Exception):
                self.destroy(container)

    def cleanup(self) -> None:
        self.remove_labelled(f"{RAW_LABEL}={self.run_id}")

    def cleanup_corral(self) -> None:
        self.remove_labelled(f"{RUN_LABEL}={self.run_id}")

    def close(self) -> None:
        self.client.close()


class PodmanRawSide(EngineRawSide):
    """podman-py: removal through the REST call with no stop grace (what a tuned user
    writes: podman-py's own remove() waits out the 10 s grace whatever it is given)."""

    def destroy(self, handle: Any) -> None:
        response = self.client.api.delete(
            f"/containers/{handle.id}", params={"force": True, "timeout": 0}
        )
        if response.status_code not in (200, 204, 404):
            raise RuntimeError(f"removing {handle.id} failed: {response.status_code}")

    def usage(self, handle: Any) -> None:
        handle.stats(stream=False, decode=True)
