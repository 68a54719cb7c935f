"""Loading settings: defaults < [tool.corral] < corral.toml < CORRAL_* < explicit arguments."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from .convert import structure, unstructure
from .errors import ConfigError
from .spec import SandboxSpec, count_field, size_field
from .units import parse_duration

# deferred: pathlib costs ~5 ms at `import corral`; it loads when settings are read.
if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["Settings", "load_settings"]

# Variables that steer corral itself rather than hold a setting.
CONTROL_VARIABLES = {
    "CORRAL_CONFIG",
    "CORRAL_DISABLE_PLUGINS",
    "CORRAL_DISABLE_PLUGIN_AUTOLOAD",
    "CORRAL_TRACE_PLUGINS",
    "CORRAL_DEBUG",
}


def _table(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(name, f"{value!r} is not a table")
    return dict(value)


def _tables(value: Any, name: str) -> dict[str, dict[str, Any]]:
    tables = _table(value, name)
    return {key: _table(table, f"{name}.{key}") for key, table in tables.items()}


def _sandbox(value: Any, name: str) -> dict[str, Any]:
    table = _table(value, name)
    structure(table, SandboxSpec, name)  # refuse bad defaults when they are read
    return table


def _roots(value: Any, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(name, f"{value!r} is not a list of folders")
    return tuple(value)


def _backend_name(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(name, f"{value!r} is not a backend name")
    return value


def _wait(value: Any, name: str) -> float:
    """A duration of zero or more (zero: never wait)."""
    try:
        seconds = parse_duration(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(name, str(e)) from None
    if not 0 <= seconds <= _MAX_WAIT:
        raise ConfigError(name, f"{value!r} is outside 0..{_MAX_WAIT:g} s")
    return seconds


# Generous bounds that still catch a unit mistake (a size where a count was meant).
_MAX_WAIT = 86400.0
_MAX_SANDBOXES = 100_000


def _field(fn: Any, **kwargs: Any) -> Any:
    return attrs.field(
        converter=attrs.Converter(lambda v, f: fn(v, f.name), takes_field=True), **kwargs
    )


@attrs.frozen
class Settings:
    """The effective settings of this process.

    ``sandbox`` holds defaults for every sandbox's spec; ``backends`` holds one raw
    table per backend, structured into that backend's own Settings class when the
    backend is first used; ``plugins`` holds one raw table per plugin, which each
    plugin structures into its own class when it is given the settings
    (``corral_configure``). ``max_sandboxes`` caps the sandboxes this process holds
    open at once on each backend (warm pools' included); a create past it raises
    CapacityError, after waiting up to ``capacity_wait`` for a close.
    """

    backend: str | None = _field(_backend_name, default=None)
    max_output: int = size_field("4MiB", minimum=0)
    # THREATS T42: how many sandboxes this process may hold open at once per backend
    # (none: no cap), and how long a create past it waits for a close before it fails.
    max_sandboxes: int | None = count_field(None, maximum=_MAX_SANDBOXES)
    capacity_wait: float = _field(_wait, default=0.0)
    mount_roots: tuple[str, ...] | None = _field(_roots, default=None)
    # Free space a read-write bind mount's host filesystem must have for a sandbox to be
    # made with it (the mount has no cap of its own); 0 turns the check off.
    rw_mount_reserve: int = size_field("1GiB", minimum=0)
    sandbox: dict[str, Any] = _field(_sandbox, factory=dict)
    backends: dict[str, dict[str, Any]] = _field(_tables, factory=dict)
    plugins: dict[str, dict[str, Any]] = _field(_tables, factory=dict)

    def allowed_mount_roots(self) -> tuple[Path, ...]:
        """Host folders bind-mount sources must live under; by default the current folder."""
        from pathlib import Path

        roots = self.mount_roots if self.mount_roots is not None else (os.getcwd(),)
        return tuple(Path(r).expanduser().resolve() for r in roots)


def _find_upwards(name: str, start: Path) -> Path | None:
    for folder in (start, *start.parents):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def _toml() -> Any:
    """The TOML parser, imported when a setting is first read (it costs ``import corral``
    several milliseconds that a program with no configuration need not pay)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    return tomllib


def _read_toml(path: Path) -> dict[str, Any]:
    tomllib = _toml()
    try:
        with path.open("rb") as f:
            table: dict[str, Any] = tomllib.load(f)
            return table
    except OSError as e:
        raise ConfigError(str(path), f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None


def _env_value(text: str) -> Any:
    """A variable's value read as a TOML value when it is one (1, true, [..]), else text."""
    tomllib = _toml()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# Tables whose keys are the user's own names, kept as written, with string values.
_VERBATIM_TABLES = ("env", "labels")


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """CORRAL_BACKEND=docker, CORRAL_SANDBOX__LIMITS__MEMORY=1g (``__`` nests).

    Setting names are read in lower case; below ``env`` and ``labels`` the names keep
    their case and the values stay text (CORRAL_SANDBOX__ENV__MY_VAR=1).
    """
    layer: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith("CORRAL_") or name in CONTROL_VARIABLES:
            continue
        raw = name[len("CORRAL_") :].split("__")
        keys = []
        verbatim = False
        for key in raw:
            keys.append(key if verbatim else key.lower())
            verbatim = verbatim or key.lower() in _VERBATIM_TABLES
        table = layer
        for key in keys[:-1]:
            table = table.setdefault(key, {})
        table[keys[-1]] = text if verbatim else _env_value(text)
    return layer


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def sources(
    cwd: Path | None = None, environ: Mapping[str, str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Each source of settings with its name, weakest first."""
    from pathlib import Path

    cwd = Path.cwd() if cwd is None else cwd
    environ = os.environ if environ is None else environ
    found: list[tuple[str, dict[str, Any]]] = []
    pyproject = _find_upwards("pyproject.toml", cwd)
    if pyproject is not None:
        table = _read_toml(pyproject).get("tool", {}).get("corral")
        if table is not None:
            found.append((f"{pyproject} [tool.corral]", table))
    config: Path | None
    if environ.get("CORRAL_CONFIG"):
        config = Path(environ["CORRAL_CONFIG"]).expanduser()
        if not config.is_file():
            raise ConfigError("CORRAL_CONFIG", f"{str(config)!r} is not a file")
    else:
        config = _find_upwards("corral.toml", cwd)
    if config is not None:
        found.append((str(config), _read_toml(config)))
    env_layer = _from_environment(environ)
    if env_layer:
        found.append(("CORRAL_* variables", env_layer))
    return found


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    cwd: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """The effective settings, each source checked on its own so errors name their source."""
    layers = sources(cwd, environ)
    if overrides:
        layers.append(("arguments", dict(overrides)))
    merged: dict[str, Any] = {}
    for name, layer in layers:
        try:
            structure(layer, Settings)
        except ConfigError as e:
            problems = [(f"{name}: {path}", reason) for path, reason in e.problems]
            raise ConfigError.many(problems) from None
        merged = _merge(merged, layer)
    return structure(merged, Settings)


def describe(settings: Settings) -> dict[str, Any]:
    """Plain data for ``corral config``."""
    data: dict[str, Any] = unstructure(settings)
    return data
