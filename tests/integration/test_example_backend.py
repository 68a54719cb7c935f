"""The example third-party backend (examples/corral-unshare), end to end as a user has it.

It must be installed into the test environment (``pip install -e examples/corral-unshare``,
as scripts/test does). Every check runs ``python -m corral`` in a subprocess with
third-party autoload ON, the way a user's shell runs it, from a folder of the test's own.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.testing.conformance import unavailable

pytestmark = pytest.mark.local

DIST = "corral-unshare"
NOT_ISOLATING = """
[sandbox.security]
isolate = false
allow_unsafe = ["isolate"]
"""


@pytest.fixture(scope="module", autouse=True)
def _example_installed() -> None:
    try:
        importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{DIST} is not installed; run: pip install -e examples/corral-unshare")


@pytest.fixture
def project() -> Iterator[Path]:
    """The current folder of the commands: a corral.toml and sandbox folders of its own."""
    folder = Path(tempfile.mkdtemp(prefix="corral-example-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def corral_cli(
    project: Path, *args: str, disable: str | None = None
) -> subprocess.CompletedProcess[str]:
    # The suite's conftest turns autoload off in this process; the command must not
    # inherit that (nor any other CORRAL_ variable of the developer's).
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    if disable is not None:
        env["CORRAL_DISABLE_PLUGINS"] = disable
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def write_config(project: Path, backend: str) -> None:
    sandboxes = project / "sandboxes"
    (project / "corral.toml").write_text(
        f'backend = "{backend}"\n\n[backends.unshare]\nroot = "{sandboxes}"\n' + NOT_ISOLATING
    )


def listed(project: Path, disable: str | None = None) -> dict[str, dict]:
    result = corral_cli(project, "backends", "--json", disable=disable)
    assert result.returncode == 0, result.stderr
    return {entry["name"]: entry for entry in json.loads(result.stdout)}


def test_the_example_is_discovered_through_its_entry_point(project: Path) -> None:
    entry = listed(project)["unshare"]
    assert entry["distribution"] == DIST
    assert entry["version"] == importlib.metadata.version(DIST)
    assert entry["plugin"] == "unshare"
    assert "unshare" in entry["description"]


def test_the_configuration_selects_it(project: Path) -> None:
    write_config(project, "unshare")
    entry = listed(project)["unshare"]
    if not entry["available"]:
        unavailable(f"unshare cannot run here: {entry['reason']}")  # a failure under CI
    result = corral_cli(project, "run", "--", "echo", "hi")
    assert (result.returncode, result.stdout) == (0, "hi\n"), result.stderr
    # It really ran there: in the sandbox folder, in a pid namespace of its own.
    script = 'echo "$(pwd) $$"'
    result = corral_cli(project, "run", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    workdir, pid = result.stdout.split()
    assert workdir == "/workspace"
    assert int(pid) < 10, f"pid {pid}: not in a new pid namespace"
    left = list((project / "sandboxes").iterdir()) if (project / "sandboxes").exists() else []
    assert left == [], f"corral run left sandbox folders: {left}"


def test_an_isolating_spec_is_refused_with_the_way_out(project: Path) -> None:
    (project / "corral.toml").write_text('backend = "unshare"\n')
    result = corral_cli(project, "run", "--", "echo", "hi")
    assert result.returncode == 125
    assert "needs ISOLATION" in result.stderr
    assert "allow_unsafe" in result.stderr


def test_the_block_list_removes_it(project: Path) -> None:
    backends = listed(project, disable="unshare")
    assert "unshare" not in backends
    write_config(project, "unshare")
    result = corral_cli(project, "run", "--", "echo", "hi", disable="unshare")
    assert result.returncode == 125
    assert result.stdout == ""
    assert "'unshare' is not a known backend" in result.stderr
    choices = result.stderr.split("Choose one of: ", 1)[1].strip().split(", ")
    assert choices == sorted(backends)
