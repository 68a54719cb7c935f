"""The error boundary: what a backend or a plugin raises reaches users as a SandboxError
naming who raised it; a backend class that cannot be made is refused when loaded.

Each backend here is a small subclass, defined in the test, of the test distribution's
``subprocess-test`` backend (or of Backend itself): the class is the subject.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import corral
from corral import cli
from corral.core.backend import Availability
from corral.core.boundary import install_fix
from corral.core.plugins import PluginHost
from corral.core.settings import Settings, load_settings

NOT_ISOLATED = corral.Security(isolate=False, allow_unsafe=("isolate",))


class Provides:
    """A plugin providing one backend class under ``name``."""

    def __init__(self, name: str, cls: type[corral.Backend]) -> None:
        self.info = corral.BackendInfo(name, cls, "a backend of the boundary tests")

    @corral.hookimpl
    def corral_backends(self) -> list[corral.BackendInfo]:
        return [self.info]


@pytest.fixture
def base(host: PluginHost) -> type[corral.Backend]:
    """The working test backend class, to derive broken ones from."""
    return host.backends()["subprocess-test"].info.backend


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.chdir(tmp_path)
    return load_settings(cwd=tmp_path, environ={})


@pytest.fixture
def provide(global_host: PluginHost) -> Callable[[str, type[corral.Backend], str | None], None]:
    def register(name: str, cls: type[corral.Backend], dist: str | None = None) -> None:
        global_host.register(Provides(name, cls), name, dist)

    return register


@pytest.fixture
def needs_docker(base: type[corral.Backend], provide: Any) -> None:
    """Backend ``needs-docker``, whose check finds the ``docker`` module missing."""

    class NeedsDocker(base):  # type: ignore[valid-type, misc]
        name = "needs-docker"

        def check(self) -> Availability:
            raise ModuleNotFoundError("No module named 'docker'", name="docker")

    # Provided by corral's own distribution, whose "docker" extra brings the module.
    provide("needs-docker", NeedsDocker, "corral")


# -- what escapes a backend --------------------------------------------------------------


def test_an_oserror_from_a_backend_names_the_backend_and_its_plugin(
    base: type[corral.Backend], provide: Any, settings: Settings
) -> None:
    class Leaky(base):  # type: ignore[valid-type, misc]
        name = "leaky"

        def exec(self, sandbox_id: str, request: Any, sink: Any) -> Any:
            raise FileNotFoundError(2, "No such file or directory", "/opt/leaky/helper")

    provide("leaky", Leaky, "leaky-dist")
    sandbox = corral.create(backend="leaky", security=NOT_ISOLATED, settings=settings)
    with sandbox, pytest.raises(corral.InternalError) as raised:
        sandbox.exec(["true"])
    error = raised.value
    assert error.backend == "leaky"
    assert str(error).startswith(
        "the leaky backend (plugin 'leaky' from leaky-dist) failed in exec: FileNotFoundError"
    )
    assert "/opt/leaky/helper" in error.message
    assert error.fix == "report it to the authors of leaky-dist"
    assert isinstance(error.__cause__, FileNotFoundError)


def test_an_error_while_reading_a_backends_tar_stream_is_translated_too(
    base: type[corral.Backend], provide: Any, settings: Settings
) -> None:
    class Torn(base):  # type: ignore[valid-type, misc]
        name = "torn"

        def get_archive(self, sandbox_id: str, path: str) -> Iterator[bytes]:
            yield b"\0" * 512
            raise ConnectionResetError("the stream broke")

    provide("torn", Torn, "torn-dist")
    with corral.create(backend="torn", security=NOT_ISOLATED, settings=settings) as sandbox:
        sandbox.write_file("/f", "x")
        with pytest.raises(corral.InternalError, match="failed in get_archive: ConnectionReset"):
            sandbox.read_file("/f")


def test_a_missing_client_library_is_unavailable_with_the_pip_line_as_its_fix(
    needs_docker: None, settings: Settings, global_host: PluginHost
) -> None:
    with pytest.raises(corral.BackendUnavailableError) as raised:
        corral.create(backend="needs-docker", security=NOT_ISOLATED, settings=settings)
    error = raised.value
    assert "needs the Python module 'docker', which is not installed" in error.message
    assert error.fix == "pip install 'corral[docker]'"
    assert str(error).endswith("; fix: pip install 'corral[docker]'")
    assert isinstance(error.__cause__, ModuleNotFoundError)
    available = global_host.availability("needs-docker", settings)
    assert not available.ok
    assert available.fix == "pip install 'corral[docker]'"


def test_a_client_library_imported_in_the_constructor_is_caught_too(
    base: type[corral.Backend], provide: Any, settings: Settings, global_host: PluginHost
) -> None:
    class ImportsAtInit(base):  # type: ignore[valid-type, misc]
        name = "imports-at-init"

        def __init__(self, settings: Any) -> None:
            super().__init__(settings)
            import corral_no_such_client  # type: ignore[import-not-found]  # noqa: F401

    provide("imports-at-init", ImportsAtInit, "imports-dist")
    with pytest.raises(corral.BackendUnavailableError) as raised:
        global_host.make_backend("imports-at-init", settings)
    assert raised.value.fix == "pip install corral_no_such_client"
    assert "'corral_no_such_client', which is not installed" in raised.value.message


def test_install_fix_names_the_extra_that_brings_a_module() -> None:
    assert install_fix("docker", "corral") == "pip install 'corral[docker]'"
    assert install_fix("podman.errors", "corral") == "pip install 'corral[podman]'"
    assert install_fix("docker", "corral", upgrade=True) == "pip install --upgrade 'corral[docker]'"
    assert install_fix("yaml", "corral") == "pip install yaml"
    assert install_fix("yaml", None) == "pip install yaml"


def test_a_backend_that_keeps_to_the_contract_is_still_itself(
    host: PluginHost, settings: Settings
) -> None:
    """The boundary goes around the instance: its type and attributes are its own."""
    backend = host.make_backend("subprocess-test", settings)
    assert type(backend) is host.backends()["subprocess-test"].info.backend
    assert backend.check().ok
    with pytest.raises(corral.NotFoundError):  # a SandboxError passes as it is
        backend.inspect("nope")


# -- a backend class that cannot be made ---------------------------------------------------


class Half(corral.Backend):
    """Forgets most of the contract."""

    name = "half"

    def check(self) -> Availability:
        return Availability(True)


def test_an_abstract_backend_class_is_refused_at_load_naming_its_plugin(
    provide: Any, global_host: PluginHost, settings: Settings
) -> None:
    provide("half", Half, "half-dist")
    record = global_host.backends()["half"]
    assert record.refused is not None
    assert "Half leaves abstract methods unimplemented: capabilities, create" in record.refused
    with pytest.raises(corral.PluginError) as raised:
        corral.create(backend="half", settings=settings)
    assert "the half backend of plugin 'half' from half-dist is refused" in str(raised.value)
    assert raised.value.fix == "report it to the authors of half-dist"
    available = global_host.availability("half", settings)
    assert not available.ok and "plugin 'half'" in available.reason


def test_corral_backends_and_doctor_show_a_refused_backend_and_go_on(
    provide: Any, global_host: PluginHost, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    provide("half", Half, "half-dist")
    assert cli.main(["backends"]) == 0
    table = capsys.readouterr().out
    (line,) = [row for row in table.splitlines() if row.startswith("half ")]
    assert "refused" in line and "plugin 'half' from half-dist" in line
    assert any(row.startswith("local ") for row in table.splitlines())
    assert cli.main(["backends", "--json"]) == 0
    (half,) = [b for b in json.loads(capsys.readouterr().out) if b["name"] == "half"]
    assert half["available"] is False and "abstract methods" in half["refused"]
    cli.main(["doctor"])
    report = capsys.readouterr().out
    assert "  half: not available" in report
    assert "fix: report it to the authors of half-dist" in report


def test_doctor_and_backends_show_a_missing_library_with_its_pip_line(
    base: type[corral.Backend], provide: Any, capsys: pytest.CaptureFixture[str], settings: Any
) -> None:
    class NeedsPodman(base):  # type: ignore[valid-type, misc]
        name = "needs-podman"

        def check(self) -> Availability:
            import podman_missing_for_this_test  # type: ignore[import-not-found]  # noqa: F401

            return Availability(True)

    provide("needs-podman", NeedsPodman, "corral")
    cli.main(["doctor"])
    report = capsys.readouterr().out
    assert "  needs-podman: not available" in report
    assert "fix: pip install podman_missing_for_this_test" in report
    assert "report it to the plugin's authors" not in report


def test_the_cli_prints_a_missing_library_as_an_error_with_its_fix(
    needs_docker: None, capsys: pytest.CaptureFixture[str], settings: Any
) -> None:
    status = cli.main(["run", "--backend", "needs-docker", "--", "true"])
    err = capsys.readouterr().err
    assert status == cli.EXIT_CORRAL_FAILED
    assert "internal error" not in err
    assert "error: the needs-docker backend" in err
    assert err.rstrip().endswith("; fix: pip install 'corral[docker]'")


# -- warnings of an available backend --------------------------------------------------------


def test_doctor_and_backends_show_an_available_backends_warnings(
    base: type[corral.Backend], provide: Any, capsys: pytest.CaptureFixture[str], settings: Any
) -> None:
    class Dated(base):  # type: ignore[valid-type, misc]
        name = "dated"

        def check(self) -> Availability:
            return Availability(True, "an old engine", warnings=["runc 1.1.5 is older than 1.1.12"])

    provide("dated", Dated)
    cli.main(["doctor"])
    report = capsys.readouterr().out
    assert "  dated: available (an old engine)\n    warning: runc 1.1.5 is older" in report
    cli.main(["backends"])
    (line,) = [row for row in capsys.readouterr().out.splitlines() if row.startswith("dated ")]
    assert "yes" in line and "warning: runc 1.1.5 is older than 1.1.12" in line
    cli.main(["backends", "--json"])
    (dated,) = [b for b in json.loads(capsys.readouterr().out) if b["name"] == "dated"]
    assert dated["warnings"] == ["runc 1.1.5 is older than 1.1.12"]
