"""A repository to put into a sandbox: where it is, where it goes, how, and git's settings."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from corral.core.errors import ConfigError
from corral.core.spec import absolute_path, choice_field, str_field, strings_field

__all__ = ["MODES", "Credentials", "CredentialsSettings", "Repository", "RepositorySettings"]

MODES = ("ro", "rw", "copy")
DEFAULT_TARGET = "/workspace/repo"
DEFAULT_USERNAME = "x-access-token"  # what GitHub and GitLab accept with a token


def _field_converter(parse: Callable[[Any, str], Any]) -> attrs.Converter[Any, Any]:
    # mypy's attrs plugin reads only named functions, types and lambdas as converters, so
    # each field using this one carries `type: ignore[misc]` (its __init__ type is Any).
    return attrs.Converter(lambda value, field: parse(value, field.name), takes_field=True)


def _line(value: Any, name: str, *, optional: bool = False) -> str | None:
    """One line of text: git's config and credential files are line-based."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(name, f"{value!r} is not a non-empty string")
    if any(c in value for c in "\n\r\0"):
        raise ConfigError(name, "must be one line without NUL bytes")
    return value


def _optional_line(value: Any, name: str) -> str | None:
    return _line(value, name, optional=True)


def _token(value: Any, name: str) -> str:
    # Never echoes the value: it is a secret even when it is malformed.
    if not isinstance(value, str) or not value:
        raise ConfigError(name, "the token must be a non-empty string")
    if any(c in value for c in "\n\r\0"):
        raise ConfigError(name, "the token must be one line without NUL bytes")
    return value


def _host_path(value: Any, name: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(name, f"{value!r} is not a folder path")
    return value


def _target(value: Any, name: str) -> str:
    path = absolute_path(value, name)
    if path == "/" or any(c in path for c in ":,"):
        raise ConfigError(name, f"{path!r} cannot receive a repository")
    return path


def _line_field(default: str | None) -> Any:
    parse = _optional_line if default is None else _line
    return attrs.field(default=default, converter=_field_converter(parse))


def _check_patterns(mode: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> None:
    if (include or exclude) and mode != "copy":
        raise ConfigError(
            "include" if include else "exclude",
            f"patterns filter a copy; they need mode = 'copy', not {mode!r} "
            "(a mount always shows the whole folder)",
        )


@attrs.frozen
class Credentials:
    """A token git may use over HTTPS, given to git by a credential helper and nothing else.

    The token is written at create into a file of the sandbox's ``/tmp`` that only the
    sandbox user can read; it is never in the spec, the environment, labels or logs
    (and never in this object's repr).

    Args:
        token: the secret.
        username: the user name sent with it (``x-access-token`` suits GitHub and GitLab).
        host: answer only for this host (``github.com``); None answers for any host.
    """

    token: str = attrs.field(repr=False, converter=_field_converter(_token))  # type: ignore[misc]
    username: str = _line_field(DEFAULT_USERNAME)
    host: str | None = _line_field(None)


def _credentials(value: Any, name: str) -> Credentials | None:
    if value is None or isinstance(value, Credentials):
        return value
    if isinstance(value, str):
        return Credentials(value)
    raise ConfigError(name, f"a {type(value).__name__} is not a token or Credentials")


@attrs.frozen
class Repository:
    """A host folder to put into a sandbox.

    Args:
        path: the folder on the host (relative to the current folder).
        target: where it appears in the sandbox.
        mode: ``ro`` mounts it read-only, ``rw`` read-write, ``copy`` copies it in at
            create (so the sandbox can change it without touching the host), owned by
            the sandbox user.
        include: for ``copy``, glob patterns of what to copy (default: everything). A
            pattern without a ``/`` matches a name at any depth (``*.py``); with one, a
            path from the repository's root (``src/**/*.py``); a matched folder brings
            everything in it. ``*`` never crosses a ``/``, ``**`` does.
        exclude: for ``copy``, patterns of what to leave out, written the same way; a
            matched folder is left out whole. Exclusion wins over inclusion.
        git_user_name: git's ``user.name`` (and author and committer names).
        git_user_email: git's ``user.email`` (and author and committer emails).
        credentials: a token (or Credentials) for git over HTTPS.

    Raises:
        ConfigError: a bad value, or include/exclude without mode ``copy``.
    """

    path: str = attrs.field(converter=_field_converter(_host_path))  # type: ignore[misc]
    target: str = attrs.field(default=DEFAULT_TARGET, converter=_field_converter(_target))  # type: ignore[misc]
    mode: str = choice_field("ro", MODES)
    include: tuple[str, ...] = strings_field()
    exclude: tuple[str, ...] = strings_field()
    git_user_name: str | None = _line_field(None)
    git_user_email: str | None = _line_field(None)
    credentials: Credentials | None = attrs.field(
        default=None,
        converter=_field_converter(_credentials),  # type: ignore[misc]
    )

    def __attrs_post_init__(self) -> None:
        _check_patterns(self.mode, self.include, self.exclude)


@attrs.frozen
class CredentialsSettings:
    """``[plugins.repository.credentials]``: the token is read from a variable of corral's
    own environment when a sandbox is made, never from a file."""

    token_env: str = attrs.field(converter=_field_converter(_line))  # type: ignore[misc]
    username: str = _line_field(DEFAULT_USERNAME)
    host: str | None = _line_field(None)

    def credentials(self, environ: Mapping[str, str], path: str) -> Credentials:
        token = environ.get(self.token_env)
        if not token:
            raise ConfigError(
                f"{path}.token_env", f"the variable {self.token_env} is not set or is empty"
            )
        return Credentials(token, username=self.username, host=self.host)


@attrs.frozen
class RepositorySettings:
    """``[plugins.repository]``: a repository put into every sandbox; without ``path``,
    none (the other keys are those of :class:`Repository`)."""

    path: str | None = str_field()
    target: str = attrs.field(default=DEFAULT_TARGET, converter=_field_converter(_target))  # type: ignore[misc]
    mode: str = choice_field("ro", MODES)
    include: tuple[str, ...] = strings_field()
    exclude: tuple[str, ...] = strings_field()
    git_user_name: str | None = _line_field(None)
    git_user_email: str | None = _line_field(None)
    credentials: CredentialsSettings | None = None

    def __attrs_post_init__(self) -> None:
        describes_one = (
            self.target != DEFAULT_TARGET
            or self.mode != "ro"
            or self.include
            or self.exclude
            or self.git_user_name is not None
            or self.git_user_email is not None
            or self.credentials is not None
        )
        if self.path is None and describes_one:
            raise ConfigError("path", "a required setting is missing (the table sets others)")
        _check_patterns(self.mode, self.include, self.exclude)

    def repository(self, environ: Mapping[str, str], path: str) -> Repository | None:
        """The Repository these settings describe, or None; ``path`` names the table."""
        if self.path is None:
            return None
        credentials = None
        if self.credentials is not None:
            credentials = self.credentials.credentials(environ, f"{path}.credentials")
        try:
            return Repository(
                self.path,
                target=self.target,
                mode=self.mode,
                include=self.include,
                exclude=self.exclude,
                git_user_name=self.git_user_name,
                git_user_email=self.git_user_email,
                credentials=credentials,
            )
        except ConfigError as e:
            raise e.prefixed(path) from None
