"""Parsing sizes ("512MiB", "1g", 536870912) and durations ("30s", "5m", 30)."""

from __future__ import annotations

import math
import re

__all__ = ["format_size", "parse_duration", "parse_size"]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"1g"``, ``"64k"``.

    Single letters (k, m, g, t) are binary, as Docker reads them; ``kB``/``MB`` are
    decimal. Raises ValueError (or TypeError) with a reason fit for a user.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{value!r} is not a size (use bytes or a string such as '512MiB')")
    if isinstance(value, int):
        return value
    match = _NUMBER_UNIT.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (use bytes or a string such as '512MiB')")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``"30s"``, ``"5m"``, ``"1h"``, ``"250ms"``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{value!r} is not a duration (use seconds or a string such as '30s')")
    if isinstance(value, str):
        match = _NUMBER_UNIT.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _DURATION_UNITS:
            raise ValueError(f"{value!r} is not a duration (use seconds or a string such as '30s')")
        value = float(match.group(1)) * _DURATION_UNITS[unit]
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite duration")
    return float(value)


def format_size(size: int) -> str:
    """The shortest exact binary spelling of a size: 536870912 -> '512MiB'."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)
