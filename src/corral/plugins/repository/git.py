"""git's settings inside a sandbox: identity, ``safe.directory`` and a credential helper.

Everything but the token travels as environment variables (``GIT_CONFIG_COUNT`` and
``GIT_CONFIG_KEY_n``/``GIT_CONFIG_VALUE_n`` are git's command-line scope, which is
where ``safe.directory`` is honoured). The token is written at create into a file of
the sandbox's ``/tmp`` that only the sandbox user can read, and a small helper script
beside it answers git's credential requests from that file.
"""

from __future__ import annotations

from collections.abc import Sequence

from corral.core.errors import ConfigError

from .model import Credentials, Repository

__all__ = ["CREDENTIAL_PREFIX", "HELPER", "credential_file", "git_env", "helper_script"]

HELPER = "/tmp/.corral-git-helper"
CREDENTIAL_PREFIX = "/tmp/.corral-git-credential-"

# git runs "!..." helpers with sh and appends the action (get, store, erase); reading the
# script with sh works on a tmpfs mounted noexec, as /tmp is by default.
_HELPER_SCRIPT = f"""#!/bin/sh
# Written by corral's repository plugin: answers git's "get" from the private files
# {CREDENTIAL_PREFIX}N, each for the host it names (or for any host).
[ "$1" = get ] || exit 0
host=
while IFS= read -r line && [ -n "$line" ]; do
    case $line in host=*) host=${{line#host=}} ;; esac
done
for file in {CREDENTIAL_PREFIX}*; do
    [ -f "$file" ] || continue
    want=$(sed -n 's/^host=//p' "$file")
    if [ -z "$want" ] || [ "$want" = "$host" ]; then
        grep -e '^username=' -e '^password=' "$file"
        exit 0
    fi
done
"""


def helper_script() -> bytes:
    return _HELPER_SCRIPT.encode()


def credential_file(credentials: Credentials) -> bytes:
    """The private file the helper reads: git's own ``key=value`` lines."""
    lines = [f"host={credentials.host}"] if credentials.host else []
    lines += [f"username={credentials.username}", f"password={credentials.token}"]
    return ("\n".join(lines) + "\n").encode()


def _one(repositories: Sequence[Repository], field: str) -> str | None:
    values = {getattr(r, field) for r in repositories} - {None}
    if len(values) > 1:
        raise ConfigError(
            f"plugins.repository.{field}",
            f"the repositories of one sandbox disagree: {', '.join(sorted(values))}",
        )
    return values.pop() if values else None


def git_env(repositories: Sequence[Repository]) -> dict[str, str]:
    """The variables that give git its settings for ``repositories`` (none without any)."""
    if not repositories:
        return {}
    env: dict[str, str] = {}
    config = [("safe.directory", r.target) for r in repositories]
    name, email = _one(repositories, "git_user_name"), _one(repositories, "git_user_email")
    if name is not None:
        env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = name
        config.append(("user.name", name))
    if email is not None:
        env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = email
        config.append(("user.email", email))
    if any(r.credentials is not None for r in repositories):
        # The empty value drops helpers configured elsewhere (a store on disk, say).
        config += [("credential.helper", ""), ("credential.helper", f"!sh {HELPER}")]
    env["GIT_CONFIG_COUNT"] = str(len(config))
    for index, (key, value) in enumerate(config):
        env[f"GIT_CONFIG_KEY_{index}"] = key
        env[f"GIT_CONFIG_VALUE_{index}"] = value
    return env
