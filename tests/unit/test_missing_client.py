"""The built-in engines on a machine with ``pip install corral`` alone: no client library.

The suite's own virtual environment has both clients, so each case runs in a fresh
interpreter where importing the engine's client fails, as it does without the extra.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent(
    """
    import sys
    sys.modules[ENGINE] = None  # `import ENGINE` fails, as without corral[ENGINE]
    import corral
    from corral import cli

    try:
        corral.create(backend=ENGINE)
    except corral.BackendUnavailableError as e:
        print("create:", e.fix)
    sys.stdout.flush()
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def _corral(engine: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROGRAM.replace("ENGINE", repr(engine)), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "CORRAL_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )


@pytest.mark.parametrize("engine", ["docker", "podman", "ray"])
def test_an_engine_without_its_client_names_the_extra_to_install(engine):
    fix = f"pip install 'corral[{engine}]'"
    ran = _corral(engine, "run", "--backend", engine, "--", "true")
    assert ran.stdout.splitlines()[0] == f"create: {fix}"
    assert ran.returncode == 125, ran.stderr
    assert "internal error" not in ran.stderr
    assert ran.stderr.rstrip().endswith(f"fix: {fix}"), ran.stderr
    assert "Traceback" not in ran.stderr


@pytest.mark.parametrize("engine", ["docker", "podman", "ray"])
def test_doctor_and_backends_show_the_extra_to_install(engine):
    fix = f"pip install 'corral[{engine}]'"
    doctor = _corral(engine, "doctor").stdout
    entry = re.search(rf"^  {engine}: .*(?:\n    .*)*", doctor, re.MULTILINE)
    assert entry is not None, doctor
    entry = entry[0]
    assert "not available" in entry and f"fix: {fix}" in entry, doctor
    assert "report it" not in entry
    listed = _corral(engine, "backends").stdout
    (line,) = [row for row in listed.splitlines() if row.startswith(engine)]
    assert fix in line, listed
