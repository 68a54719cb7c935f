"""The audit plugin: redaction, the JSON-lines file, and the events of a sandbox's life.

Sandboxes here are the ``subprocess-test`` backend's (tests/plugin_dist); the local
backend's are in tests/integration/test_plugins_builtin.py.
"""

from __future__ import annotations

import getpass
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import corral
from corral.core.plugins import PluginHost
from corral.core.settings import Settings, load_settings
from corral.plugins.audit import REDACTED, redact_env
from corral.plugins.jsonlines import JsonLinesFile

BACKEND = "subprocess-test"
NOT_ISOLATED = corral.Security(isolate=False, allow_unsafe=("isolate",))


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


@pytest.fixture
def make(
    global_host: PluginHost, tmp_path: Path, trail: Path
) -> Iterator[Callable[..., corral.Sandbox]]:
    """``make(audit={...}, **keywords)``: a sandbox whose settings audit to ``trail``."""
    made: list[corral.Sandbox] = []

    def create(audit: dict[str, Any] | None = None, **keywords: Any) -> corral.Sandbox:
        settings = load_settings(
            {
                "backends": {BACKEND: {"root": str(tmp_path / "boxes")}},
                "plugins": {"audit": {"path": str(trail), **(audit or {})}},
            },
            cwd=tmp_path,
            environ={},
        )
        sandbox = corral.create(
            backend=BACKEND, security=NOT_ISOLATED, settings=settings, **keywords
        )
        made.append(sandbox)
        return sandbox

    yield create
    for sandbox in made:
        sandbox.close()


# -- redaction -------------------------------------------------------------------------


def test_secret_looking_names_are_redacted_in_any_case() -> None:
    env = {
        "GITHUB_TOKEN": "t",
        "aws_secret_access_key": "s",
        "DB_PASSWORD": "p",
        "MYSQL_PASSWD": "p",
        "API_KEY": "k",
        "GOOGLE_APPLICATION_CREDENTIALS": "c",
        "Authorization": "a",
        "PLAIN": "visible",
        "PATH": "/usr/bin",
    }
    redacted = redact_env(env)
    assert {k for k, v in redacted.items() if v != REDACTED} == {"PLAIN", "PATH"}
    assert redacted["PLAIN"] == "visible"


def test_passwords_in_urls_are_redacted_whatever_the_name() -> None:
    env = {"HTTPS_PROXY": "http://alice:s3cret@proxy:3128", "DATABASE_URL": "pg://u:pw@db/x"}
    assert redact_env(env) == {
        "HTTPS_PROXY": f"http://alice:{REDACTED}@proxy:3128",
        "DATABASE_URL": f"pg://u:{REDACTED}@db/x",
    }
    assert redact_env({"NOTE": "mail me: a@b.c"}) == {"NOTE": "mail me: a@b.c"}


# -- the file --------------------------------------------------------------------------


def test_lines_from_many_threads_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "trail.jsonl"
    files = [JsonLinesFile(path), JsonLinesFile(path)]  # two handles on one file
    payload = "x" * 10_000

    def write(n: int) -> None:
        for i in range(50):
            files[n % 2].write({"thread": n, "i": i, "payload": payload})

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = read_lines(path)
    assert len(lines) == 400
    assert sorted((line["thread"], line["i"]) for line in lines) == [
        (n, i) for n in range(8) for i in range(50)
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_file_is_appended_to_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "trail.jsonl"
    path.write_text('{"kept":true}\n')
    JsonLinesFile(path).write({"added": 1, "when": Path("/x")})
    assert read_lines(path) == [{"kept": True}, {"added": 1, "when": "/x"}]


# -- events ----------------------------------------------------------------------------


def test_a_sandbox_life_is_recorded_with_who_what_and_how_it_ended(
    make: Callable[..., corral.Sandbox], trail: Path
) -> None:
    sandbox = make(audit={"usage": True}, env={"API_TOKEN": "tok-123", "MODE": "test"})
    sandbox.exec(["sh", "-c", "echo out; exit 3"], env={"DB_PASSWORD": "pw-456", "X": "1"})
    sandbox.exec(["sleep", "5"], timeout=0.2)
    usage = sandbox.usage()
    sandbox.close()

    events = read_lines(trail)
    assert [e["event"] for e in events] == ["created", "exec", "exec", "usage", "destroyed"]
    assert {(e["sandbox"], e["backend"]) for e in events} == {(sandbox.id, BACKEND)}
    created, failed, slow, sampled, destroyed = events
    assert created["user"] == getpass.getuser()
    assert created["pid"] == os.getpid()
    assert created["loosened"] == ["isolate"]
    assert created["env"] == {"API_TOKEN": REDACTED, "MODE": "test"}
    assert created["sandbox_user"] == "1000:1000"
    assert failed["argv"] == ["sh", "-c", "echo out; exit 3"]
    assert failed["exit_code"] == 3
    assert failed["stdout_bytes"] == 4
    assert failed["env"] == {"DB_PASSWORD": REDACTED, "X": "1"}
    assert failed["timed_out"] is False
    assert slow["timed_out"] is True
    assert 0.1 < slow["duration"] < 4
    assert {k: sampled[k] for k in attrs.asdict(usage)} == attrs.asdict(usage)
    assert destroyed["error"] is None
    text = trail.read_text()
    assert "tok-123" not in text and "pw-456" not in text


class Refusing:
    """A policy plugin that refuses ``rm`` in corral_exec."""

    @corral.hookimpl(tryfirst=True)
    def corral_exec(self, sandbox: Any, request: Any, sink: Any) -> None:
        if request.argv[0] == "rm":
            raise corral.PolicyError("rm is not allowed here")


def test_a_refused_exec_is_recorded_with_its_error(
    global_host: PluginHost, make: Callable[..., corral.Sandbox], trail: Path
) -> None:
    global_host.register(Refusing(), "refusing")
    sandbox = make()
    with pytest.raises(corral.PolicyError):
        sandbox.exec(["rm", "-rf", "/"])
    (refused,) = [e for e in read_lines(trail) if e["event"] == "exec"]
    assert refused["argv"] == ["rm", "-rf", "/"]
    assert refused["error"] == "PolicyError: rm is not allowed here"
    assert "exit_code" not in refused


def test_file_transfers_are_recorded_with_path_direction_and_bytes(
    make: Callable[..., corral.Sandbox], trail: Path, tmp_path: Path
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.py").write_text("print('hi')\n")
    sandbox = make()
    sandbox.write_file("/notes.txt", "twelve bytes")
    sandbox.read_file("/notes.txt")
    sandbox.upload(tmp_path / "src", "/")
    sandbox.download("/src", tmp_path / "back")
    with pytest.raises(corral.NotFoundError):
        sandbox.read_file("/missing.txt")
    sandbox.close()

    transfers = [e for e in read_lines(trail) if e["event"] == "transfer"]
    assert [(e["operation"], e["direction"], e["path"]) for e in transfers] == [
        ("write_file", "in", "/notes.txt"),
        ("read_file", "out", "/notes.txt"),
        ("upload", "in", "/"),
        ("download", "out", "/src"),
        ("read_file", "out", "/missing.txt"),
    ]
    assert [e["bytes"] for e in transfers[:2]] == [12, 12]
    assert transfers[2]["host_path"] == str(tmp_path / "src")
    assert transfers[3]["host_path"] == str(tmp_path / "back")
    assert all(e["bytes"] > 12 for e in transfers[2:4])  # the tar streams
    assert transfers[4]["error"].startswith("NotFoundError")
    assert {e["sandbox"] for e in transfers} == {sandbox.id}


def test_usage_samples_are_left_out_unless_asked_for(
    make: Callable[..., corral.Sandbox], trail: Path
) -> None:
    sandbox = make()
    sandbox.usage()
    sandbox.close()
    assert [e["event"] for e in read_lines(trail)] == ["created", "destroyed"]


def test_a_sandbox_keeps_the_trail_it_was_created_under(
    make: Callable[..., corral.Sandbox], trail: Path, tmp_path: Path
) -> None:
    sandbox = make()
    # Another create, with the audit off, does not stop the first sandbox's trail.
    quiet = load_settings(
        {"backends": {BACKEND: {"root": str(tmp_path / "boxes")}}}, cwd=tmp_path, environ={}
    )
    corral.create(backend=BACKEND, security=NOT_ISOLATED, settings=quiet).close()
    sandbox.exec(["true"])
    sandbox.close()
    assert [e["event"] for e in read_lines(trail)] == ["created", "exec", "destroyed"]


def test_a_trail_that_cannot_be_written_fails_the_create_and_removes_the_sandbox(
    global_host: PluginHost, tmp_path: Path
) -> None:
    settings = load_settings(
        {
            "backends": {BACKEND: {"root": str(tmp_path / "boxes")}},
            "plugins": {"audit": {"path": str(tmp_path / "missing" / "audit.jsonl")}},
        },
        cwd=tmp_path,
        environ={},
    )
    with pytest.raises(corral.ConfigError, match=r"^plugins\.audit\.path: cannot write"):
        corral.create(backend=BACKEND, security=NOT_ISOLATED, settings=settings)
    assert corral.list(backend=BACKEND, settings=settings) == []


def test_a_typo_in_the_audit_table_names_its_path(
    global_host: PluginHost, clean_settings: Settings
) -> None:
    settings = attrs.evolve(clean_settings, plugins={"audit": {"paht": "a.jsonl"}})
    with pytest.raises(corral.ConfigError, match=r"^plugins\.audit\.paht: unknown setting"):
        corral.create(backend=BACKEND, security=NOT_ISOLATED, settings=settings)


def test_secret_names_are_matched_word_by_word():
    from corral.plugins.audit import looks_secret

    for secret in (
        "GITHUB_TOKEN",
        "db_password",
        "APIKEY",
        "AWS_SECRET_ACCESS_KEY",
        "AUTH",
        "X_AUTH_HEADER",
    ):
        assert looks_secret(secret), secret
    for plain in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "PATH", "KEYBOARD_LAYOUT"):
        assert not looks_secret(plain), plain
