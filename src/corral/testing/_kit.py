"""The conformance kit's base: its fixtures and small helpers, shared by every class
of checks (``conformance.py``, ``long_lived.py``)."""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

import corral
from corral.core import processes
from corral.core.backend import Backend, Capability
from corral.core.plugins import get_host
from corral.core.settings import Settings, load_settings

__all__ = ["ConformanceBase", "Make", "unavailable"]

Make = Callable[..., corral.Sandbox]
MiB = 1024 * 1024


def unavailable(reason: str) -> None:
    """A backend or engine that is missing: a skip on a developer's machine, a failure
    under CI (``CI`` set to true), where a silent skip would hide a broken setup."""
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"CI needs this backend: {reason}")
    pytest.skip(reason)


def _need(backend: Backend, capability: Capability) -> None:
    if not backend.capabilities() & capability:
        pytest.skip(
            f"the {backend.name} backend does not declare {capability.name}, so this check "
            "does not apply to it"
        )


def _within(seconds: float, call: Callable[[], corral.ExecResult]) -> corral.ExecResult:
    """``call()``, failing the test if it has not returned after ``seconds``: a backend
    that ignores a timeout fails the check instead of hanging the suite."""
    outcome: list[corral.ExecResult | BaseException] = []
    worker = threading.Thread(target=lambda: outcome.append(_outcome(call)), daemon=True)
    worker.start()
    worker.join(seconds)
    if not outcome:
        pytest.fail(f"the call had not returned after {seconds} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _outcome(call: Callable[[], corral.ExecResult]) -> corral.ExecResult | BaseException:
    try:
        return call()
    except BaseException as e:
        return e


def _output(result: corral.ExecResult) -> str:
    """The text of a command that must succeed; the whole result shows when it did not."""
    assert result.exit_code == 0 and not result.timed_out, result
    return result.text


def _in_workdir(sandbox: corral.Sandbox, name: str) -> str:
    return posixpath.join(sandbox.spec.workdir, name)


def _listed(backend: str, settings: Settings) -> set[str]:
    return {info.id for info in corral.list(backend=backend, settings=settings)}


class ConformanceBase:
    """What every class of the kit has: the backend under test and its fixtures.

    Attributes:
        backend: the name the backend is selected by (required).
        settings: settings laid over clean defaults (nothing is read from the user's
            files or variables); ``mount_roots`` defaults to a scratch folder that the
            suite also mounts from. Override the ``conformance_settings`` fixture
            instead when the settings need paths made at run time.
        image: the image of every sandbox, for backends that run images.
    """

    backend: ClassVar[str]
    settings: ClassVar[Mapping[str, Any]] = {}
    image: ClassVar[str | None] = None

    # -- fixtures ------------------------------------------------------------------------

    @pytest.fixture
    def conformance_scratch(self) -> Iterator[Path]:
        """A folder for the test's host-side files; others may pass it (a backend run as
        root may run sandboxes as an unprivileged host user, who must reach mounts)."""
        folder = Path(tempfile.mkdtemp(prefix="corral-conformance-"))
        os.chmod(folder, 0o755)
        yield folder
        shutil.rmtree(folder, ignore_errors=True)

    @pytest.fixture
    def conformance_settings(self, conformance_scratch: Path) -> Settings:
        """The settings every sandbox of the suite is made with."""
        overrides = {"mount_roots": [str(conformance_scratch)], **self.settings}
        return load_settings(overrides, cwd=conformance_scratch, environ={})

    @pytest.fixture
    def conformance_backend(self, conformance_settings: Settings) -> Backend:
        """The backend instance under test, checked available."""
        try:
            return get_host().backend(self.backend, conformance_settings)
        except corral.BackendUnavailableError as e:
            unavailable(str(e))
            raise  # unreachable: unavailable() always raises

    @pytest.fixture
    def conformance_sandbox(
        self, conformance_backend: Backend, conformance_settings: Settings
    ) -> Iterator[Make]:
        """``make(**keywords)`` creates a sandbox (keywords of ``corral.create``); at the
        end every one is closed and must be gone from ``corral.list``."""
        made: list[corral.Sandbox] = []

        def make(**keywords: Any) -> corral.Sandbox:
            keywords.setdefault("settings", conformance_settings)
            if self.image is not None:
                keywords.setdefault("image", self.image)
            sandbox = corral.create(backend=self.backend, **keywords)
            made.append(sandbox)
            return sandbox

        yield make
        failures = []
        for sandbox in made:
            try:
                sandbox.close()
            except Exception as e:  # close the others all the same
                failures.append(e)
        assert not failures, f"closing sandboxes failed: {failures}"
        left = _listed(self.backend, conformance_settings) & {s.id for s in made}
        assert not left, f"sandboxes still listed after close: {sorted(left)}"
        # Nothing of their background processes either: no keeper, no folder.
        kept = [s.id for s in made if processes.folder(s.backend, s.id).exists()]
        assert not kept, f"process folders left after close: {kept}"
