"""An agent's session on a real project, as a user writes it, on the local backend: the
project copied into a sandbox, explored in a Python REPL kept alive in the background,
the prepared sandbox snapshotted and forked into three attempts that each change the
code and run the project's own test suite, their changes listed, the source paused
meanwhile and resumed intact. Real processes throughout."""

from __future__ import annotations

import posixpath
import shutil
from pathlib import Path

import pytest

import corral

pytestmark = pytest.mark.local

PROJECT = Path(__file__).resolve().parents[2] / "examples" / "cluster_tests" / "sample_project"
WORK = "/workspace/project"


def _pytest_folder() -> str:
    """The folder this interpreter imports pytest from, mounted for the sandbox's python."""
    return str(Path(pytest.__file__).resolve().parents[1])


def _read_until(process: corral.Process, text: bytes) -> bytes:
    seen = b""
    for chunk in process.output(timeout=60):
        seen += chunk.data
        if text in seen:
            return seen
    raise AssertionError(f"{text!r} never came; the process printed {seen!r}")


def _run_tests(sandbox: corral.Sandbox) -> corral.ExecResult:
    suite = sandbox.spawn(
        ["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        workdir=WORK,
        idle_timeout=60,
    )
    return suite.wait(timeout=300)


def test_an_agent_session_explores_snapshots_and_forks_a_project(
    state_dir: Path, mount_root: Path
) -> None:
    shutil.copytree(PROJECT, mount_root / "project", ignore=shutil.ignore_patterns("__pycache__"))
    settings = corral.load_settings(
        {
            "mount_roots": [str(mount_root), _pytest_folder()],
            "backends": {"local": {"state_dir": str(state_dir)}},
        },
        cwd=state_dir,
        environ={},
    )
    mounts = [
        corral.Mount(str(mount_root / "project"), "/project"),
        corral.Mount(_pytest_folder(), "/deps"),
    ]
    with corral.create(
        backend="local",
        settings=settings,
        mounts=mounts,
        env={"PYTHONPATH": "/deps", "PYTHONDONTWRITEBYTECODE": "1"},
        memory="1GiB",
    ) as source:
        if not source.backend.capabilities() & corral.Capability.SNAPSHOTS:
            pytest.fail("the local backend must declare SNAPSHOTS here")
        assert source.exec(["cp", "-r", "/project", WORK]).exit_code == 0

        # A REPL that stays up while commands run beside it.
        repl = source.spawn(["python3", "-q", "-u", "-i"], workdir=WORK)
        repl.write("import textstats\n")
        repl.write("print(textstats.top('b a b c b a', 2))\n")
        assert b"[('b', 3), ('a', 2)]" in _read_until(repl, b"('a', 2)]")
        assert source.exec(["ls", WORK]).text.split() == ["pyproject.toml", "tests", "textstats.py"]
        repl.write("exit()\n")
        assert repl.wait(timeout=60).exit_code == 0

        baseline = _run_tests(source)
        assert baseline.exit_code == 0, baseline.stdout.decode()
        assert "17 passed" in baseline.text, baseline.text

        attempts = source.fork(3)
        try:
            source.pause()  # the source waits, frozen, while the attempts run
            module = posixpath.join(WORK, "textstats.py")
            original = attempts[0].read_file(module).decode()
            # 0: untouched. 1: a bug. 2: a new test of its own.
            attempts[1].write_file(module, original.replace("text.lower()", "text"))
            attempts[2].write_file(
                posixpath.join(WORK, "tests", "test_extra.py"),
                "from textstats import words\n\n"
                "def test_digits_are_words():\n    assert words('a 42') == ['a', '42']\n",
            )
            results = [_run_tests(attempt) for attempt in attempts]
            assert results[0].exit_code == 0 and "17 passed" in results[0].text
            assert results[1].exit_code == 1 and " failed" in results[1].text, results[1].text
            assert results[2].exit_code == 0 and "18 passed" in results[2].text

            changed = {c.path: c.kind for c in attempts[1].changes()}
            assert changed.get(module) == "changed", changed
            added = {c.path: c.kind for c in attempts[2].changes()}
            assert added.get(posixpath.join(WORK, "tests", "test_extra.py")) == "added", added
            assert posixpath.join(WORK, "tests", "test_extra.py") not in {
                c.path for c in attempts[0].changes()
            }

            source.resume()
            assert source.read_file(module).decode() == original
            assert source.status == "running"
        finally:
            for attempt in attempts:
                attempt.close()
        for snapshot in corral.snapshots(backend="local", settings=settings):
            if snapshot.info.sandbox_id == source.id:
                snapshot.remove()
