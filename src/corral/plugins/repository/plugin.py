"""The repository plugin's hooks: mounts, git's variables, checks, and the copy at create."""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

from corral.core.convert import structure
from corral.core.errors import ConfigError, PolicyError
from corral.core.hookspecs import hookimpl
from corral.core.policy import sensitive_reason
from corral.core.settings import Settings
from corral.core.spec import Mount

from .git import CREDENTIAL_PREFIX, HELPER, credential_file, git_env, helper_script
from .model import Repository, RepositorySettings
from .staging import PathFilter, stage

if TYPE_CHECKING:
    from corral.core.sandbox import Sandbox
    from corral.core.spec import MountLike, SandboxSpec

__all__ = ["RepositoryPlugin", "using"]

log = logging.getLogger("corral")

NAME = "repository"
_active: ContextVar[tuple[Repository, ...]] = ContextVar("corral_repositories", default=())


@contextlib.contextmanager
def using(*repositories: Repository) -> Iterator[tuple[Repository, ...]]:
    """Put ``repositories`` into every sandbox created inside the block.

    Scoped to the calling thread (or asyncio task), so concurrent creates elsewhere
    are untouched; blocks nest, adding to the outer block's repositories. They come
    after the one ``[plugins.repository]`` configures, if any.

    Example::

        with using(Repository("./app", mode="copy", exclude=[".venv", "*.pyc"])):
            sandbox = corral.create(image="python:3.12-slim")
    """
    for index, repository in enumerate(repositories):
        if not isinstance(repository, Repository):
            raise ConfigError(f"repositories[{index}]", f"{repository!r} is not a Repository")
    token = _active.set((*_active.get(), *repositories))
    try:
        yield _active.get()
    finally:
        _active.reset(token)


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class RepositoryPlugin:
    """Puts repositories into sandboxes: mounted (``ro``, ``rw``) or copied (``copy``).

    Args:
        environ: where ``credentials.token_env`` is looked up (default: os.environ).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        self._own = RepositorySettings()
        self._settings = Settings()
        self._lock = threading.Lock()

    def repositories(self) -> list[tuple[str, Repository]]:
        """Each repository for a sandbox made now, with the name of where it was given."""
        with self._lock:
            own = self._own
        found: list[tuple[str, Repository]] = []
        configured = own.repository(self._environ, f"plugins.{NAME}")
        if configured is not None:
            found.append((f"plugins.{NAME}", configured))
        found += [(f"repositories[{i}]", r) for i, r in enumerate(_active.get())]
        targets = [r.target for _, r in found]
        for where, repository in found:
            if targets.count(repository.target) > 1:
                raise ConfigError(
                    f"{where}.target", f"two repositories share the target {repository.target!r}"
                )
        return found

    def _check_source(self, where: str, repository: Repository, spec: SandboxSpec) -> Path:
        """The copy's source, resolved, held to the rules of a bind mount's."""
        field = f"{where}.path"
        try:
            source = Path(repository.path).expanduser().resolve(strict=True)
        except OSError:
            raise ConfigError(field, f"{repository.path!r} does not exist") from None
        if not source.is_dir():
            raise ConfigError(field, f"{str(source)!r} is not a folder")
        reason = sensitive_reason(source)
        if reason and "sensitive_mounts" not in spec.security.allow_unsafe:
            raise PolicyError(
                f"{field}: {str(source)!r} {reason}; it can only be copied with "
                "'sensitive_mounts' in sandbox.security.allow_unsafe"
            )
        with self._lock:
            roots = self._settings.allowed_mount_roots()
        if not any(_under(source, root) for root in roots):
            allowed = ", ".join(str(r) for r in roots) or "none"
            raise PolicyError(
                f"{field}: {str(source)!r} is not under an allowed mount root ({allowed}); "
                "add its folder to the mount_roots setting"
            )
        return source

    def _copy(self, sandbox: Sandbox, where: str, repository: Repository) -> None:
        source = self._check_source(where, repository, sandbox.spec)
        target = repository.target
        with tempfile.TemporaryDirectory(prefix="corral-repository-") as folder:
            staged = Path(folder) / posixpath.basename(target)
            skipped = stage(source, staged, PathFilter.of(repository.include, repository.exclude))
            if skipped:
                log.warning(
                    "the copy of %s into sandbox %s leaves out %d symlinks or special files: %s",
                    source,
                    sandbox.id,
                    len(skipped),
                    ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""),
                )
            if target == sandbox.spec.workdir:
                # The workdir exists in every backend; its parent may not be writable.
                for child in sorted(staged.iterdir()):
                    sandbox.upload(child, target)
            else:
                sandbox.upload(staged, posixpath.dirname(target))

    # -- hooks -------------------------------------------------------------------------

    @hookimpl
    def corral_configure(self, settings: Settings) -> None:
        own = structure(settings.plugins.get(NAME, {}), RepositorySettings, f"plugins.{NAME}")
        with self._lock:
            self._own, self._settings = own, settings

    @hookimpl
    def corral_extra_mounts(self, spec: SandboxSpec, backend: str) -> list[MountLike]:
        return [
            Mount(r.path, r.target, read_only=r.mode == "ro")
            for _, r in self.repositories()
            if r.mode != "copy"
        ]

    @hookimpl
    def corral_extra_env(self, spec: SandboxSpec, backend: str) -> dict[str, str]:
        return git_env([r for _, r in self.repositories()])

    @hookimpl
    def corral_check_spec(self, spec: SandboxSpec, backend: str) -> None:
        found = self.repositories()
        for where, repository in found:
            if repository.mode == "copy":
                self._check_source(where, repository, spec)
        if any(r.credentials for _, r in found) and spec.uid_gid() is None:
            raise ConfigError(
                "sandbox.user",
                f"{spec.user!r}: git credentials need the sandbox user as uid:gid numbers, "
                "so that their file can be made readable by that user alone",
            )

    @hookimpl
    def corral_sandbox_created(self, sandbox: Sandbox) -> None:
        found = self.repositories()
        for where, repository in found:
            if repository.mode == "copy":
                self._copy(sandbox, where, repository)
        credentials = list(dict.fromkeys(r.credentials for _, r in found if r.credentials))
        if credentials:
            sandbox.write_file(HELPER, helper_script(), mode=0o700)
            for index, entry in enumerate(credentials):
                sandbox.write_file(
                    f"{CREDENTIAL_PREFIX}{index}", credential_file(entry), mode=0o600
                )
