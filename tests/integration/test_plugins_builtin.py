"""The built-in plugins on the local backend, configured from settings as a user would.

git runs inside the sandboxes (the local backend binds the host's /usr), so the git
settings are checked by git itself.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
from prometheus_client import REGISTRY

import corral
from corral.core.convert import unstructure
from corral.plugins.metrics import prometheus_text
from corral.plugins.repository import Credentials, Repository, using

pytestmark = pytest.mark.local
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

TOKEN = "ghp_integration-0d6c-never-leaks"
SANDBOX_HOST_USER = (65534, 65534)  # the local backend's host user when corral runs as root


def with_plugins(settings: corral.Settings, **tables: dict[str, Any]) -> corral.Settings:
    return attrs.evolve(settings, plugins=tables)


def host_git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "safe.directory=*", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def make_repo(folder: Path) -> Path:
    """A git repository with a commit, readable by everyone."""
    folder.mkdir()
    for name, text in {
        "README.md": "# demo\n",
        "src/app.py": "print('app')\n",
        "src/app.pyc": "bytecode",
        "src/generated/big.py": "x = 1\n",
        "docs/guide.md": "guide\n",
        "build/out.bin": "binary",
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    host_git(folder, "init", "-q")
    host_git(folder, "add", "-A")
    host_git(folder, "-c", "user.name=Host", "-c", "user.email=h@x", "commit", "-qm", "first")
    subprocess.run(["chmod", "-R", "a+rX", str(folder)], check=True)
    return folder


def give_to_sandbox_user(folder: Path) -> None:
    if os.geteuid() == 0:
        for path in [folder, *folder.rglob("*")]:
            os.chown(path, *SANDBOX_HOST_USER, follow_symlinks=False)


def run(sandbox: corral.Sandbox, *argv: str, **keywords: Any) -> corral.ExecResult:
    return sandbox.exec(list(argv), timeout=30, **keywords)


# -- repository --------------------------------------------------------------------------


@needs_git
def test_a_read_only_repository_is_readable_by_git_and_refuses_writes(make, settings, mount_root):
    repo = make_repo(mount_root / "repo")
    table = {"path": str(repo), "git_user_name": "Sandbox Bot", "git_user_email": "bot@example"}
    sb = make(settings=with_plugins(settings, repository=table))
    assert sb.spec.mounts[-1] == corral.Mount(str(repo), "/workspace/repo", read_only=True)
    assert run(sb, "git", "-C", "/workspace/repo", "log", "--format=%s").text == "first\n"
    assert run(sb, "git", "config", "--get", "user.name").text == "Sandbox Bot\n"
    assert run(sb, "git", "config", "--get", "user.email").text == "bot@example\n"
    assert run(sb, "sh", "-c", 'echo "$GIT_AUTHOR_NAME"').text == "Sandbox Bot\n"
    written = run(sb, "touch", "/workspace/repo/new")
    assert written.exit_code != 0 and "Read-only" in written.stderr_text
    assert not (repo / "new").exists()
    # The files belong to a user the sandbox does not know: safe.directory is what lets
    # git read them.
    bare = run(sb, "git", "-C", "/workspace/repo", "log", env={"GIT_CONFIG_COUNT": "0"})
    assert bare.exit_code != 0 and "dubious ownership" in bare.stderr_text


@needs_git
def test_a_read_write_repository_takes_the_sandboxs_commits(make, settings, mount_root):
    repo = make_repo(mount_root / "repo")
    give_to_sandbox_user(repo)
    table = {
        "path": str(repo),
        "mode": "rw",
        "target": "/src",
        "git_user_name": "Sandbox Bot",
        "git_user_email": "bot@example",
    }
    # Without the opt-in a read-write repository is refused like any read-write mount.
    with pytest.raises(corral.PolicyError, match="unbounded_rw_mounts"):
        make(settings=with_plugins(settings, repository=table))
    sb = make(
        settings=with_plugins(settings, repository=table),
        security={"allow_unsafe": ["unbounded_rw_mounts"]},
    )
    done = run(sb, "git", "-C", "/src", "commit", "--allow-empty", "-qm", "from the sandbox")
    assert done.exit_code == 0, done.stderr_text
    assert host_git(repo, "log", "-1", "--format=%s|%an <%ae>|%cn <%ce>") == (
        "from the sandbox|Sandbox Bot <bot@example>|Sandbox Bot <bot@example>\n"
    )


@needs_git
def test_a_copy_honours_include_and_exclude_and_belongs_to_the_sandbox_user(make, mount_root):
    repo = make_repo(mount_root / "repo")
    (repo / "link").symlink_to("README.md")
    copy = Repository(
        repo, mode="copy", include=["src", "*.md", ".git"], exclude=["*.pyc", "src/generated"]
    )
    with using(copy):
        sb = make()
    found = run(sb, "sh", "-c", "cd /workspace/repo && find . -type f ! -path './.git/*' | sort")
    assert found.text.split() == ["./README.md", "./docs/guide.md", "./src/app.py"]
    ids = run(sb, "sh", "-c", "echo $(id -u):$(id -g)").text
    owners = run(sb, "sh", "-c", "find /workspace/repo -exec stat -c %u:%g {} + | sort -u")
    assert owners.text == ids
    # The sandbox owns its copy: it changes it freely and the host's stays as it was.
    commit = run(
        sb,
        "sh",
        "-c",
        "cd /workspace/repo && echo changed > README.md && "
        "git -c user.name=b -c user.email=b@x commit -qam 'in the copy' && git log --format=%s",
    )
    assert commit.text == "in the copy\nfirst\n", commit.stderr_text
    assert (repo / "README.md").read_text() == "# demo\n"
    assert host_git(repo, "log", "--format=%s") == "first\n"


def test_a_copy_into_the_workdir_itself(make, mount_root):
    repo = mount_root / "project"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "mod.py").write_text("x = 1\n")
    (repo / "setup.cfg").write_text("[metadata]\n")
    subprocess.run(["chmod", "-R", "a+rX", str(repo)], check=True)
    with using(Repository(repo, target="/workspace", mode="copy")):
        sb = make()
    assert run(sb, "cat", "pkg/mod.py", "setup.cfg").text == "x = 1\n[metadata]\n"


def test_a_copy_is_held_to_the_rules_of_a_mount(make, settings, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with (
        using(Repository(outside, mode="copy")),
        pytest.raises(
            corral.PolicyError,
            match=r"repositories\[0\]\.path: .* is not under an allowed mount root",
        ),
    ):
        make()
    with (
        using(Repository("/etc", mode="copy")),
        pytest.raises(corral.PolicyError, match="is a system folder"),
    ):
        make()
    with (
        using(Repository(tmp_path / "absent", mode="copy")),
        pytest.raises(corral.ConfigError, match="does not exist"),
    ):
        make()


@needs_git
def test_a_token_reaches_git_and_nowhere_else(
    make, settings, mount_root, shared_tmp, state_dir, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CORRALTEST_GIT_TOKEN", TOKEN)
    repo = make_repo(mount_root / "repo")
    audit = shared_tmp / "audit.jsonl"
    tables = {
        "repository": {"path": str(repo), "credentials": {"token_env": "CORRALTEST_GIT_TOKEN"}},
        "audit": {"path": str(audit)},
    }
    sb = make(settings=with_plugins(settings, **tables))
    ask = "protocol=https\nhost=example.com\n\n"
    answer = run(sb, "git", "credential", "fill", stdin=ask, env={"GIT_TERMINAL_PROMPT": "0"})
    assert answer.exit_code == 0, answer.stderr_text
    assert f"username=x-access-token\npassword={TOKEN}\n" in answer.text
    modes = run(sb, "sh", "-c", "stat -c '%a %u' /tmp/.corral-git-*").text.splitlines()
    uid = run(sb, "id", "-u").text.strip()
    assert sorted(modes) == [f"600 {uid}", f"700 {uid}"]  # credential file, helper
    environment = run(sb, "env").text
    meta = (state_dir / "local" / sb.id / "meta.json").read_text()
    sb.close()
    places = {
        "the spec": repr(sb.spec) + json.dumps(unstructure(sb.spec)),
        "the labels": json.dumps(sb.labels),
        "the environment": environment,
        "the backend's state": meta,
        "the logs": caplog.text,
        "the audit trail": audit.read_text(),
    }
    assert [where for where, text in places.items() if TOKEN in text] == []
    assert "exec" in places["the audit trail"]  # it did record the commands


@needs_git
def test_a_token_for_one_host_is_not_given_to_another(make, mount_root):
    repo = make_repo(mount_root / "repo")
    with using(Repository(repo, credentials=Credentials(TOKEN, host="github.com"))):
        sb = make()
    for host, gets_it in (("github.com", True), ("example.com", False)):
        answer = run(
            sb,
            "git",
            "credential",
            "fill",
            stdin=f"protocol=https\nhost={host}\n\n",
            env={"GIT_TERMINAL_PROMPT": "0"},
        )
        assert (TOKEN in answer.text) is gets_it, host


# -- audit ---------------------------------------------------------------------------------


def test_the_audit_trail_follows_a_local_sandbox(make, settings, shared_tmp):
    trail = shared_tmp / "audit.jsonl"
    sb = make(
        settings=with_plugins(settings, audit={"path": str(trail), "usage": True}),
        env={"SERVICE_PASSWORD": "hunter2"},
    )
    assert run(sb, "sh", "-c", "exit 7").exit_code == 7
    usage = sb.usage()
    sb.close()
    events = [json.loads(line) for line in trail.read_text().splitlines()]
    assert [e["event"] for e in events] == ["created", "exec", "usage", "destroyed"]
    created, ran, sampled, destroyed = events
    assert (created["backend"], created["pid"], created["user"]) == (
        "local",
        os.getpid(),
        getpass.getuser(),
    )
    assert created["env"]["SERVICE_PASSWORD"] == "<redacted>"
    assert (ran["argv"], ran["exit_code"], ran["timed_out"]) == (["sh", "-c", "exit 7"], 7, False)
    assert sampled["memory_bytes"] == usage.memory_bytes
    assert destroyed == {**destroyed, "sandbox": sb.id, "error": None}
    assert "hunter2" not in trail.read_text()


# -- metrics -------------------------------------------------------------------------------


def test_usage_is_streamed_and_exposed_to_prometheus(make, settings, shared_tmp):
    path = shared_tmp / "usage.jsonl"
    sb = make(settings=with_plugins(settings, metrics={"path": str(path), "prometheus": True}))
    usage = sb.usage()
    assert usage.memory_bytes is not None and usage.cpu_seconds is not None
    labels = {"sandbox": sb.id, "backend": "local"}
    line = json.loads(path.read_text())
    assert (line["sandbox"], line["memory_bytes"], line["pids"]) == (
        sb.id,
        usage.memory_bytes,
        usage.pids,
    )
    assert REGISTRY.get_sample_value("corral_sandbox_memory_bytes", labels) == usage.memory_bytes
    assert REGISTRY.get_sample_value("corral_sandbox_cpu_seconds", labels) == usage.cpu_seconds
    assert f'sandbox="{sb.id}"' in prometheus_text().decode()
    sb.close()
    assert REGISTRY.get_sample_value("corral_sandbox_memory_bytes", labels) is None
    assert f'sandbox="{sb.id}"' not in prometheus_text().decode()


# -- the command line ----------------------------------------------------------------------


def test_the_command_line_lists_them_and_reads_their_tables(shared_tmp, state_dir):
    (shared_tmp / "corral.toml").write_text(
        f'[backends.local]\nstate_dir = "{state_dir}"\n\n[plugins.audit]\npath = "audit.jsonl"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_DISABLE_PLUGIN_AUTOLOAD"] = "1"

    def corral_command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "corral", *args],
            cwd=shared_tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = corral_command("plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout)}
    for name, hook in (
        ("repository", "corral_extra_mounts"),
        ("audit", "corral_exec"),
        ("metrics", "corral_usage_sampled"),
    ):
        assert (plugins[name]["distribution"], plugins[name]["version"]) == (
            "corral",
            corral.__version__,
        )
        assert {"corral_configure", hook} <= set(plugins[name]["hooks"])
    ran = corral_command("run", "--", "echo", "from the cli")
    assert (ran.returncode, ran.stdout) == (0, "from the cli\n"), ran.stderr
    events = [json.loads(line) for line in (shared_tmp / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["created", "exec", "destroyed"]
    assert events[1]["argv"] == ["echo", "from the cli"]
