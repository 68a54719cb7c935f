"""The ``corral`` command, run as a real subprocess against the local backend."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.local

Cli = Callable[..., subprocess.CompletedProcess[str]]


def _clean_environment(extra: dict[str, str] | None) -> dict[str, str]:
    # The user's own CORRAL_* settings and third-party plugins must not leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env.update(extra or {})
    return env


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty working folder, so that no corral.toml or pyproject.toml is found above it."""
    folder = tmp_path / "project"
    folder.mkdir()
    return folder


@pytest.fixture
def cli(project: Path) -> Cli:
    """Run ``python -m corral ARGS...`` in ``project``; the finished process."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "corral", *args],
            cwd=project,
            env=_clean_environment(env),
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


@pytest.fixture
def kept(cli: Cli) -> Iterator[list[str]]:
    """Ids of sandboxes a test kept; whatever the test leaves behind is removed."""
    ids: list[str] = []
    yield ids
    if ids:
        cli("rm", *ids)


def _kept_id(stderr: str) -> str:
    match = re.search(r"kept sandbox (\S+)", stderr)
    assert match, stderr
    return match.group(1)


def _listed_ids(cli: Cli) -> list[str]:
    listing = cli("ls", "--json")
    assert listing.returncode == 0, listing.stderr
    return [info["id"] for info in json.loads(listing.stdout)]


def test_run_streams_output_and_exits_0(cli: Cli) -> None:
    done = cli("run", "--", "sh", "-c", "echo out; echo err >&2")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "out\n"
    assert "err" in done.stderr
    assert "creating" not in done.stderr  # no progress output in a pipe


def test_run_passes_the_exit_status_through(cli: Cli) -> None:
    assert cli("run", "--", "sh", "-c", "exit 3").returncode == 3


def test_run_timeout_exits_124(cli: Cli) -> None:
    started = time.monotonic()
    done = cli("run", "--timeout", "1", "--", "sleep", "30")
    assert done.returncode == 124, done.stderr
    assert time.monotonic() - started < 25


def test_run_sets_variables(cli: Cli) -> None:
    done = cli("run", "--env", "GREETING=hello", "--", "sh", "-c", 'echo "$GREETING"')
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello\n"


def test_a_bad_variable_is_named(cli: Cli) -> None:
    done = cli("run", "--env", "GREETING", "--", "true")
    assert done.returncode == 125
    assert "'GREETING' is not K=V" in done.stderr


def test_a_bad_option_value_is_one_line_naming_the_field(cli: Cli) -> None:
    done = cli("run", "--memory", "-1", "--", "true")
    assert done.returncode == 125
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("corral: error: ")
    assert "sandbox.limits.memory" in lines[0]


def test_an_unknown_backend_lists_the_known_ones(cli: Cli) -> None:
    done = cli("run", "--backend", "nope", "--", "true")
    assert done.returncode == 125
    assert "'nope'" in done.stderr
    assert "local" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_command_is_a_usage_error(cli: Cli) -> None:
    done = cli("run", "echo", "hi")
    assert done.returncode == 125
    assert "after --" in done.stderr


def test_run_json(cli: Cli) -> None:
    done = cli("run", "--json", "--", "sh", "-c", "echo out; echo err >&2; exit 2")
    assert done.returncode == 2, done.stderr
    result = json.loads(done.stdout)
    assert result["exit_code"] == 2
    assert result["stdout"] == "out\n"
    assert result["stderr"] == "err\n"
    assert result["timed_out"] is False
    assert result["oom_killed"] is False
    assert result["truncated"] is False
    assert result["duration"] >= 0
    assert result["backend"] == "local"
    assert "sandbox_id" not in result  # run removed its sandbox; exec --json gives the id


def test_keep_then_exec_stats_ls_and_rm(cli: Cli, kept: list[str]) -> None:
    done = cli("run", "--keep", "--", "sh", "-c", "echo kept > /workspace/note")
    assert done.returncode == 0, done.stderr
    sandbox_id = _kept_id(done.stderr)
    kept.append(sandbox_id)
    assert sandbox_id in _listed_ids(cli)

    again = cli("exec", sandbox_id, "--", "cat", "/workspace/note")
    assert again.returncode == 0, again.stderr
    assert again.stdout == "kept\n"

    stats = cli("stats", sandbox_id, "--json")
    assert stats.returncode == 0, stats.stderr
    assert {"sandbox_id", "cpu_seconds", "memory_bytes", "pids"} <= set(json.loads(stats.stdout))

    removed = cli("rm", sandbox_id)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.split() == [sandbox_id]
    assert sandbox_id not in _listed_ids(cli)
    assert cli("rm", sandbox_id).returncode == 1  # gone: said once, not a traceback


def test_backends_lists_local_from_corral(cli: Cli) -> None:
    done = cli("backends", "--json")
    assert done.returncode == 0, done.stderr
    local = next(b for b in json.loads(done.stdout) if b["name"] == "local")
    assert local["distribution"] == "corral"
    assert local["available"] is True
    table = cli("backends")
    assert re.search(r"^local\s+corral\s", table.stdout, re.MULTILINE), table.stdout


def test_config_reads_the_project_file_and_the_environment(cli: Cli, project: Path) -> None:
    (project / "corral.toml").write_text('max_output = "1MiB"\n')
    from_file = json.loads(cli("config", "--json").stdout)
    assert from_file["settings"]["max_output"] == 1024**2
    assert any(source.endswith("corral.toml") for source in from_file["sources"])

    from_env = json.loads(cli("config", "--json", env={"CORRAL_MAX_OUTPUT": "2MiB"}).stdout)
    assert from_env["settings"]["max_output"] == 2 * 1024**2
    assert "CORRAL_* variables" in from_env["sources"]

    as_toml = cli("config")
    assert as_toml.returncode == 0, as_toml.stderr
    assert "max_output = 1048576" in as_toml.stdout


def test_doctor_exits_0(cli: Cli) -> None:
    done = cli("doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "default backend: local (available)" in done.stdout


@pytest.fixture
def host_folder() -> Iterator[Path]:
    """A host folder to mount, outside the project and reachable by any user.

    Not under tmp_path: pytest makes its base folder 0700, and the local backend
    refuses a source its unprivileged host user cannot reach, with a clear error.
    """
    folder = Path(tempfile.mkdtemp(prefix="corral-cli-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_read_only_mount_can_be_read_not_written(
    cli: Cli, project: Path, host_folder: Path
) -> None:
    data = host_folder
    (data / "in.txt").write_text("from the host\n")
    (data / "in.txt").chmod(0o644)
    (project / "corral.toml").write_text(f"mount_roots = [{json.dumps(str(data))}]\n")
    mount = f"{data}:/data:ro"

    read = cli("run", "--mount", mount, "--", "cat", "/data/in.txt")
    assert read.returncode == 0, read.stderr
    assert read.stdout == "from the host\n"

    write = cli("run", "--mount", mount, "--", "sh", "-c", "echo x > /data/out.txt")
    assert write.returncode != 0
    assert not (data / "out.txt").exists()


def test_a_read_write_mount_needs_its_opt_in(cli: Cli, project: Path, host_folder: Path) -> None:
    data = host_folder
    data.chmod(0o777)  # the sandbox's unprivileged user writes here
    (project / "corral.toml").write_text(f"mount_roots = [{json.dumps(str(data))}]\n")
    write = ["--", "sh", "-c", "echo x > /data/out.txt"]

    refused = cli("run", "--mount", f"{data}:/data:rw", *write)
    assert refused.returncode == 125
    assert "add 'unbounded_rw_mounts' to sandbox.security.allow_unsafe" in refused.stderr
    assert not (data / "out.txt").exists()

    allowed = cli(
        "run", "--mount", f"{data}:/data:rw", "--allow-unsafe", "unbounded_rw_mounts", *write
    )
    assert allowed.returncode == 0, allowed.stderr
    assert (data / "out.txt").read_text() == "x\n"
