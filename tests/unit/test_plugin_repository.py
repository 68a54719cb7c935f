"""The repository plugin's parts: its model and settings, the copy filter, git's variables."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import corral
from corral.core.convert import structure
from corral.plugins.repository import (
    Credentials,
    Repository,
    RepositoryPlugin,
    RepositorySettings,
    using,
)
from corral.plugins.repository.git import credential_file, git_env
from corral.plugins.repository.staging import PathFilter, stage

TOKEN = "ghp_unit-test-token-4f9a"


def settings_of(table: dict) -> RepositorySettings:
    return structure(table, RepositorySettings, "plugins.repository")


# -- the model -------------------------------------------------------------------------


def test_a_repository_has_safe_defaults() -> None:
    repository = Repository(Path("repo"))
    assert repository.path == "repo"
    assert (repository.target, repository.mode) == ("/workspace/repo", "ro")
    assert repository.credentials is None


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"mode": "mirror"}, "mode: 'mirror' is not one of: ro, rw, copy"),
        ({"target": "relative"}, "target: 'relative' is not an absolute path"),
        ({"target": "/"}, "target: '/' cannot receive a repository"),
        ({"include": ["src"]}, "include: patterns filter a copy; they need mode = 'copy'"),
        ({"exclude": "*.pyc"}, "exclude: '*.pyc' is not a list of strings"),
        ({"git_user_name": "a\nb"}, "git_user_name: must be one line"),
    ],
)
def test_bad_repositories_are_refused_naming_the_field(keywords: dict, message: str) -> None:
    with pytest.raises(corral.ConfigError, match=re.escape(message)):
        Repository("repo", **keywords)


def test_a_token_is_never_shown() -> None:
    repository = Repository("repo", credentials=TOKEN)
    assert repository.credentials == Credentials(TOKEN)
    assert TOKEN not in repr(repository)
    with pytest.raises(corral.ConfigError) as info:
        Credentials(TOKEN + "\n")
    assert TOKEN not in str(info.value)
    assert "token must be one line" in str(info.value)


def test_settings_describe_one_repository_and_typos_name_their_path() -> None:
    assert settings_of({}).repository({}, "plugins.repository") is None
    table = {"path": "app", "mode": "copy", "exclude": [".git"], "git_user_name": "bot"}
    repository = settings_of(table).repository({}, "plugins.repository")
    assert repository == Repository("app", mode="copy", exclude=[".git"], git_user_name="bot")
    with pytest.raises(corral.ConfigError, match=r"^plugins\.repository\.mdoe: unknown setting"):
        settings_of({"path": "app", "mdoe": "copy"})
    with pytest.raises(corral.ConfigError, match=r"^plugins\.repository\.path: a required"):
        settings_of({"mode": "copy"})
    with pytest.raises(
        corral.ConfigError, match=r"plugins\.repository\.credentials\.tokn_env: unknown setting"
    ):
        settings_of({"path": "app", "credentials": {"tokn_env": "X"}})
    with pytest.raises(corral.ConfigError, match=r"^plugins\.repository\.include: patterns"):
        settings_of({"path": "app", "include": ["src"]})


def test_settings_take_the_token_from_a_variable_only() -> None:
    table = {"path": "app", "credentials": {"token_env": "CI_TOKEN", "host": "github.com"}}
    own = settings_of(table)
    repository = own.repository({"CI_TOKEN": TOKEN}, "plugins.repository")
    assert repository is not None
    assert repository.credentials == Credentials(TOKEN, host="github.com")
    with pytest.raises(
        corral.ConfigError,
        match=r"^plugins\.repository\.credentials\.token_env: the variable CI_TOKEN is not set",
    ):
        own.repository({}, "plugins.repository")
    with pytest.raises(corral.ConfigError, match=r"credentials\.token: unknown setting"):
        settings_of({"path": "app", "credentials": {"token_env": "X", "token": TOKEN}})


def test_using_scopes_repositories_to_the_block() -> None:
    plugin = RepositoryPlugin(environ={})
    first, second = Repository("a", target="/a"), Repository("b", target="/b")
    assert plugin.repositories() == []
    with using(first):
        with using(second):
            assert [r for _, r in plugin.repositories()] == [first, second]
        assert plugin.repositories() == [("repositories[0]", first)]
    assert plugin.repositories() == []
    with (
        using(first, Repository("c", target="/a")),
        pytest.raises(
            corral.ConfigError,
            match=r"repositories\[0\]\.target: two repositories share the target '/a'",
        ),
    ):
        plugin.repositories()
    with pytest.raises(corral.ConfigError, match="is not a Repository"), using("a"):  # type: ignore[arg-type]
        pass


# -- the copy's filter -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        ("*.pyc", ["a.pyc", "src/deep/b.pyc"], ["a.py", "pyc"]),
        ("build", ["build", "src/build"], ["builds", "build.txt"]),
        ("/build", ["build"], ["src/build"]),
        ("src/*.py", ["src/a.py"], ["src/deep/a.py", "a.py", "lib/src/a.py"]),
        ("src/**/*.py", ["src/a.py", "src/deep/er/a.py"], ["a.py", "lib/a.py"]),
        ("docs/**", ["docs/a", "docs/a/b"], ["docs", "src/docs/a"]),
        ("file?.txt", ["file1.txt"], ["file10.txt", "file/.txt"]),
        ("[ab].md", ["a.md", "b.md"], ["c.md"]),
        ("[!ab].md", ["c.md"], ["a.md"]),
    ],
)
def test_patterns_match_like_gitignore(
    pattern: str, matching: list[str], not_matching: list[str]
) -> None:
    rules = PathFilter.of(exclude=[pattern])
    assert [p for p in matching if not rules.excluded(p)] == []
    assert [p for p in not_matching if rules.excluded(p)] == []


def tree(root: Path, files: list[str]) -> Path:
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    return root


def staged_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_stage_copies_what_include_and_exclude_let_through(tmp_path: Path) -> None:
    source = tree(
        tmp_path / "repo",
        ["README.md", "setup.py", "src/a.py", "src/a.pyc", "src/gen/b.py", "docs/x.md"],
    )
    (source / "empty").mkdir()
    rules = PathFilter.of(include=["src", "*.md"], exclude=["*.pyc", "src/gen"])
    assert stage(source, tmp_path / "out", rules) == []
    assert staged_files(tmp_path / "out") == ["README.md", "docs/x.md", "src/a.py"]
    assert not (tmp_path / "out" / "empty").exists()
    # Without include everything comes, empty folders too; exclusion still wins.
    assert stage(source, tmp_path / "all", PathFilter.of(exclude=["docs"])) == []
    assert "docs/x.md" not in staged_files(tmp_path / "all")
    assert len(staged_files(tmp_path / "all")) == 5
    assert (tmp_path / "all" / "empty").is_dir()
    assert (tmp_path / "all" / "src" / "a.py").read_text() == "src/a.py"


def test_stage_skips_links_and_special_files_without_following_them(tmp_path: Path) -> None:
    secret = tree(tmp_path / "outside", ["secret.txt"])
    source = tree(tmp_path / "repo", ["a.txt"])
    (source / "to-outside").symlink_to(secret)
    (source / "to-file").symlink_to(secret / "secret.txt")
    os.mkfifo(source / "pipe")
    skipped = stage(source, tmp_path / "out", PathFilter.of())
    assert sorted(skipped) == ["pipe", "to-file", "to-outside"]
    assert staged_files(tmp_path / "out") == ["a.txt"]


def test_stage_keeps_the_execute_bit(tmp_path: Path) -> None:
    source = tree(tmp_path / "repo", ["run.sh"])
    (source / "run.sh").chmod(0o755)
    stage(source, tmp_path / "out", PathFilter.of())
    assert os.access(tmp_path / "out" / "run.sh", os.X_OK)


# -- git's variables -------------------------------------------------------------------


def git_config(env: dict[str, str]) -> list[tuple[str, str]]:
    count = int(env["GIT_CONFIG_COUNT"])
    return [(env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"]) for i in range(count)]


def test_git_env_sets_identity_safe_directories_and_the_helper_but_never_the_token() -> None:
    repositories = [
        Repository("a", target="/workspace/a", git_user_name="Bot", git_user_email="b@x"),
        Repository("b", target="/workspace/b", credentials=TOKEN),
    ]
    env = git_env(repositories)
    assert env["GIT_AUTHOR_NAME"] == env["GIT_COMMITTER_NAME"] == "Bot"
    assert env["GIT_AUTHOR_EMAIL"] == env["GIT_COMMITTER_EMAIL"] == "b@x"
    assert git_config(env) == [
        ("safe.directory", "/workspace/a"),
        ("safe.directory", "/workspace/b"),
        ("user.name", "Bot"),
        ("user.email", "b@x"),
        ("credential.helper", ""),
        ("credential.helper", "!sh /tmp/.corral-git-helper"),
    ]
    assert TOKEN not in repr(env)
    assert git_env([]) == {}


def test_git_env_refuses_two_identities_for_one_sandbox() -> None:
    repositories = [
        Repository("a", target="/a", git_user_name="Ann"),
        Repository("b", target="/b", git_user_name="Bob"),
    ]
    with pytest.raises(corral.ConfigError, match="disagree: Ann, Bob"):
        git_env(repositories)


def test_the_credential_file_speaks_gits_protocol() -> None:
    text = credential_file(Credentials(TOKEN, host="github.com")).decode()
    assert text == f"host=github.com\nusername=x-access-token\npassword={TOKEN}\n"
