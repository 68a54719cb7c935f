"""`import corral` stays cheap: no engine client and nothing heavy until it is used."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys

import pytest

import corral

# Engine clients and their HTTP stack: never loaded by `import corral`.
ENGINE_CLIENTS = {"docker", "podman", "requests", "urllib3"}
# Loaded when first needed (a file copy, a plugin host, settings read, a stream...), each
# of them milliseconds that a program which only imports corral need not pay.
DEFERRED = {
    "asyncio",
    "attr",
    "attrs",
    "cattrs",
    "corral.core.lifecycle",
    "corral.core.spec",
    "concurrent",
    "importlib.metadata",
    "json",
    "logging",
    "pathlib",
    "pluggy",
    "psutil",
    "queue",
    "shutil",
    "subprocess",
    "tarfile",
    "tempfile",
    "tomllib",
    "typing",
    "uuid",
}


def _loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter has after ``statement`` and did not have before
    (so that whatever the interpreter's own start-up loads is not counted)."""
    code = "\n".join(
        [
            "import sys",
            "before = set(sys.modules)",
            statement,
            "print(sorted(set(sys.modules) - before))",
        ]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(ast.literal_eval(done.stdout.strip()))


def _matches(loaded: set[str], names: set[str]) -> list[str]:
    return sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in names))


def test_import_corral_loads_no_engine_client():
    assert _matches(_loaded_by("import corral"), ENGINE_CLIENTS) == []


def test_import_corral_defers_heavy_modules():
    assert _matches(_loaded_by("import corral"), DEFERRED) == []


def test_lazy_names_load_on_first_use():
    loaded = _loaded_by("import corral\ncorral.hookimpl")
    assert "pluggy" in loaded  # the check above would pass vacuously if it never did
    loaded = _loaded_by("import corral\ncorral.create")
    assert {"attrs", "corral.core.lifecycle", "corral.core.spec"} <= loaded


def test_a_lazy_name_is_the_defining_modules_own():
    from corral.core import lifecycle, sandbox

    assert corral.create is lifecycle.create
    assert corral.list is lifecycle.list_sandboxes
    assert corral.Sandbox is sandbox.Sandbox


@pytest.mark.parametrize("name", corral.__all__)
def test_every_public_name_is_there(name: str):
    assert name in dir(corral)
    assert getattr(corral, name) is not None


def test_star_import_gives_every_public_name():
    namespace: dict[str, object] = {}
    exec("from corral import *", namespace)
    assert set(corral.__all__) <= set(namespace)


def test_hook_markers_are_the_hookspecs_own():
    from corral.core import hookspecs

    assert corral.hookimpl is hookspecs.hookimpl
    assert corral.hookspec is hookspecs.hookspec
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        corral.nothing_here  # noqa: B018


def test_deferred_logger_is_corrals(caplog: pytest.LogCaptureFixture):
    from corral.core._log import log

    with caplog.at_level(logging.INFO, logger="corral"):
        log.info("hello %s", "there")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("corral", "hello there")]
