"""The error boundary: what escapes a backend or a plugin as anything but a SandboxError
becomes one that says who raised it, chained to the original (``raise ... from``)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs

from .backend import Backend
from .errors import BackendUnavailableError, InternalError, SandboxError

__all__ = ["Provenance", "guard_backend", "install_fix", "translate"]

T = TypeVar("T")

# The methods of the Backend contract, each of which the core may call; private helpers
# of a backend are its own business.
CONTRACT = tuple(
    sorted(name for name, value in vars(Backend).items() if callable(value) and name[0] != "_")
)
# Those that return an iterator whose reading runs the backend's code (a tar stream).
_STREAMING = frozenset({"get_archive"})


@attrs.frozen
class Provenance:
    """Who answers for some code: the plugin that registered it and its distribution."""

    plugin: str
    distribution: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        where = " ".join(part for part in (self.distribution, self.version) if part)
        return f"plugin {self.plugin!r}" + (f" from {where}" if where else "")

    @property
    def report_fix(self) -> str:
        return f"report it to the authors of {self.distribution or f'plugin {self.plugin!r}'}"


def _key(name: str) -> str:
    """A distribution's or module's name as pip compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def install_fix(module: str | None, distribution: str | None, *, upgrade: bool = False) -> str:
    """The ``pip install`` line that brings ``module`` (a missing import's name).

    When the distribution that needs it declares an extra requiring a package of that
    name (``docker>=7.1; extra == 'docker'``), the extra is named, which brings the
    version it wants: ``pip install 'corral[docker]'``. Else the module's own name.
    """
    top = (module or "").split(".")[0]
    flag = "--upgrade " if upgrade else ""
    if distribution and top:
        from importlib import metadata

        try:
            requirements = metadata.requires(distribution) or []
        except metadata.PackageNotFoundError:
            requirements = []
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
            if name and extra and _key(name.group()) == _key(top):
                return f"pip install {flag}'{distribution}[{extra.group(1)}]'"
    if top:
        return f"pip install {flag}{top}"
    return f"reinstall {distribution or 'the plugin'} with its dependencies"


def translate(
    error: Exception, subject: str, doing: str, origin: Provenance, backend: str | None
) -> SandboxError:
    """``error`` (not a SandboxError) as the SandboxError a user sees.

    A missing or broken import means ``subject`` cannot run here: a
    BackendUnavailableError whose fix is the ``pip install`` line. Anything else is a
    bug of ``origin``'s: an InternalError naming ``subject``, what it was ``doing`` and
    the failure. The caller chains it (``raise ... from error``).
    """
    if isinstance(error, ImportError):
        missing = isinstance(error, ModuleNotFoundError)
        what = f"the Python module {error.name!r}" if error.name else "a Python module"
        return BackendUnavailableError(
            f"{subject} needs {what}, which "
            + ("is not installed" if missing else f"cannot be imported: {error}"),
            backend=backend,
            fix=install_fix(error.name, origin.distribution, upgrade=not missing),
        )
    return InternalError(
        f"{subject} failed {doing}: {type(error).__name__}: {error}",
        backend=backend,
        fix=origin.report_fix,
    )


def _guarded(method: Callable[..., Any], name: str, backend: str, origin: Provenance) -> Any:
    subject, doing = f"the {backend} backend ({origin})", f"in {name}"

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            result = method(*args, **kwargs)
        except SandboxError:
            raise
        except Exception as e:
            raise translate(e, subject, doing, origin, backend) from e
        if name in _STREAMING:
            return _guarded_stream(result, subject, doing, origin, backend)
        return result

    return call


def _guarded_stream(
    chunks: Iterator[T], subject: str, doing: str, origin: Provenance, backend: str | None
) -> Iterator[T]:
    try:
        yield from chunks
    except SandboxError:
        raise
    except Exception as e:
        raise translate(e, subject, doing, origin, backend) from e


def guard_backend(instance: Backend, name: str, origin: Provenance) -> Backend:
    """Put the boundary around every method of the Backend contract of ``instance``.

    The instance stays itself (its type, attributes and ``isinstance``), so code that
    holds it, the pool's and a plugin's alike, calls through the boundary without
    knowing it: each method is shadowed on the instance by one that translates what
    escapes it. Calls inside the backend go through it too; a SandboxError passes
    unchanged, so nothing is wrapped twice.
    """
    for method_name in CONTRACT:
        method = getattr(instance, method_name)
        setattr(instance, method_name, _guarded(method, method_name, name, origin))
    return instance
