"""The one cattrs converter: dicts from TOML, the environment or keywords into the model.

cattrs does the shape (nested tables, unknown keys refused, mount tables by their
``type``); the attrs classes' own converters do the values, so a spec built in Python
and one read from a file are checked by the same code. Errors come out as ConfigError
with the full path of every bad field.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from .errors import ConfigError
from .spec import Mount, Tmpfs, Volume

if TYPE_CHECKING:
    import cattrs

__all__ = ["structure", "unstructure"]

T = TypeVar("T")


def _is_model(cls: Any) -> bool:
    return isinstance(cls, type) and attrs.has(cls)


def _optional_model(t: Any) -> type | None:
    args = [a for a in getattr(t, "__args__", ()) if a is not type(None)]
    is_optional = len(args) == 1 and type(None) in getattr(t, "__args__", ())
    return args[0] if is_optional and _is_model(args[0]) else None


def _unstructure_mount(mount: Any) -> dict[str, Any]:
    return {"type": mount.kind, **attrs.asdict(mount)}


@functools.cache
def _converter() -> cattrs.Converter:
    """The converter, built on first use so that ``import corral`` stays cheap."""
    import cattrs
    from cattrs.gen import make_dict_structure_fn

    converter = cattrs.Converter(forbid_extra_keys=True, prefer_attrib_converters=True)

    def model_hook(cls: type[Any]) -> Any:
        generated = make_dict_structure_fn(
            cls, converter, _cattrs_forbid_extra_keys=True, _cattrs_prefer_attrib_converters=True
        )

        def structure_model(value: Any, _: Any) -> Any:
            if isinstance(value, cls):
                return value
            if not isinstance(value, dict):
                raise ConfigError("", f"{value!r} is not a table of settings")
            return generated(value, cls)

        return structure_model

    # Plain values pass through untouched: the model's converters check them strictly,
    # and cattrs must not coerce (it would turn 5 into "5" or "abc" into ('a', 'b', 'c')).
    # Hooks registered later win, so this catch-all comes first.
    converter.register_structure_hook_func(lambda t: not _is_model(t), lambda value, _: value)
    converter.register_structure_hook_factory(_is_model, model_hook)

    def structure_optional(value: Any, t: Any) -> Any:
        model = _optional_model(t)
        return None if value is None or model is None else converter.structure(value, model)

    converter.register_structure_hook_func(
        lambda t: _optional_model(t) is not None, structure_optional
    )
    for cls in (Mount, Tmpfs, Volume):
        converter.register_unstructure_hook(cls, _unstructure_mount)
    return converter


def structure(data: Any, cls: type[T], path: str = "") -> T:
    """Build ``cls`` from plain data; any problem is a ConfigError naming its path."""
    try:
        return _converter().structure(data, cls)
    except Exception as e:
        raise _as_config_error(e).prefixed(path) from None


def unstructure(obj: Any) -> Any:
    """Plain data (dicts, lists, strings, numbers) from a model object, for JSON or TOML."""
    return _converter().unstructure(obj)


def _as_config_error(exc: BaseException) -> ConfigError:
    problems = list(_problems(exc, ""))
    return ConfigError.many(problems or [("", str(exc))])


def _problems(exc: BaseException, path: str) -> Any:
    from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

    from .errors import _join

    if isinstance(exc, ConfigError):
        for p, reason in exc.problems:
            yield _join(path, p), reason
    elif isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(exc.extra_fields):
            yield _join(path, key), "unknown setting (check the spelling)"
    elif isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            yield from _problems(sub, _join(path, note.name))
        for sub in without:
            yield from _problems(sub, path)
    elif isinstance(exc, IterableValidationError):
        indexed, unindexed = exc.group_exceptions()
        for sub, item in indexed:
            yield from _problems(sub, f"{path}[{item.index}]")
        for sub in unindexed:
            yield from _problems(sub, path)
    elif isinstance(exc, KeyError):
        yield path, "a required setting is missing"
    elif isinstance(exc, TypeError) and "argument" in str(exc):
        yield path, f"missing a required setting ({exc})"
    else:
        yield path, str(exc)
