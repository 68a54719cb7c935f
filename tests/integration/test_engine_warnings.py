"""Engine version warnings (engine_versions): shown by `corral doctor` and `corral
backends`, never printed by the commands and programs that merely use an engine.

The test engines are Debian 12's (runc 1.1.5, Podman 4.3.1), older than releases with
later fixes, so both warn.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import corral


def _environment(engine: str, settings: corral.Settings) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CORRAL_") or key.startswith("CORRALTEST_")
    }
    for key, value in settings.backends[engine].items():
        env[f"CORRAL_BACKENDS__{engine.upper()}__{key.upper()}"] = str(value)
    return env


def _run(env: dict[str, str], cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=120, check=False
    )


def test_commands_that_use_an_engine_print_no_version_warning(
    engine: str, engine_settings: corral.Settings, tmp_path: Path
) -> None:
    env = _environment(engine, engine_settings)
    cli = (sys.executable, "-m", "corral")
    listed = _run(env, tmp_path, *cli, "ls", "--backend", engine)
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr == ""
    program = textwrap.dedent(f"""
        import corral
        print(corral.run(["echo", "hi"], backend={engine!r}).text, end="")
    """)
    ran = _run(env, tmp_path, sys.executable, "-c", program)
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "hi\n", "")


def test_doctor_and_backends_show_the_engines_version_warnings(
    engine: str, engine_settings: corral.Settings, tmp_path: Path
) -> None:
    env = {**_environment(engine, engine_settings), "CORRAL_BACKEND": engine}
    cli = (sys.executable, "-m", "corral")
    listed = _run(env, tmp_path, *cli, "backends", "--json")
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr == ""
    (record,) = [b for b in json.loads(listed.stdout) if b["name"] == engine]
    assert record["available"] is True
    assert any("runc 1.1.5 is older than" in w for w in record["warnings"])
    doctor = _run(env, tmp_path, *cli, "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert doctor.stderr == ""
    report = doctor.stdout
    assert f"  {engine}: available" in report
    assert "    warning: runc 1.1.5 is older than 1.1.12 (CVE-2024-21626" in report
