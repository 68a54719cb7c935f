"""The docs are a tested contract: they build strictly and their examples run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
EXAMPLE = re.compile(r"```python\n(.*?)```", re.S)


def _examples() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for n, code in enumerate(EXAMPLE.findall(page.read_text()), 1):
            found.append((f"{page.name}#{n}", code))
    return found


def test_docs_build_strictly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    hooks_page = (tmp_path / "site" / "hooks" / "index.html").read_text()
    from corral.core import hookspecs

    for name in dir(hookspecs):
        if name.startswith("corral_"):
            assert f'id="{name}"' in hooks_page, f"{name} has no section in the hook reference"
    assert "sandbox.limits" in (tmp_path / "site" / "configuration" / "index.html").read_text()


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert page.name in nav, f"{page.name} is not in mkdocs.yml's nav"


@pytest.mark.local
@pytest.mark.parametrize(("where", "code"), _examples(), ids=[w for w, _ in _examples()])
def test_examples_run(where, code):
    # Sandboxes of the example get a state folder the sandboxes' host user can reach.
    state = Path(tempfile.mkdtemp(prefix="corral-docs-"))
    os.chmod(state, 0o755)
    try:
        env = {**os.environ, "CORRAL_BACKENDS__LOCAL__STATE_DIR": str(state)}
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=state,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{where} failed:\n{done.stderr}"
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_the_tutorial_shows_the_example_backend_as_it_is():
    """Every line of code in the tutorial is the example distribution's, which CI runs."""

    def squeeze(text: str) -> str:
        return re.sub(r"\n\s*\n+", "\n\n", text).strip()

    blocks = re.findall(
        r"```py\n(.*?)```", (ROOT / "docs" / "writing-a-backend.md").read_text(), re.S
    )
    example = ROOT / "examples" / "corral-unshare"
    package = example / "src" / "corral_unshare"
    shown = {
        "__init__.py": "\n\n".join(blocks[:6]),
        "files.py": blocks[6],
        "process.py": blocks[7],
        "test_conformance.py": blocks[8],
    }
    actual = {
        "__init__.py": (package / "__init__.py").read_text(),
        "files.py": (package / "files.py").read_text(),
        "process.py": (package / "process.py").read_text(),
        "test_conformance.py": (example / "tests" / "test_conformance.py").read_text(),
    }
    for name, text in shown.items():
        assert squeeze(text) == squeeze(actual[name]), (
            f"the tutorial's {name} differs from the example's"
        )
