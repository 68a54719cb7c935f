"""The kernel's limits on a command's arguments and environment, checked before it runs.

execve(2) refuses (E2BIG) a single argument or ``NAME=VALUE`` string longer than
MAX_ARG_STRLEN, and arguments and environment that together pass what the stack
limit allows (ARG_MAX). Refused by the kernel, the engines report the runtime's
"argument list too long" as the command's own output and status; refused here, the
error names the field before anything is made or started.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from .errors import ConfigError

__all__ = ["MAX_ARG_STRLEN", "arg_max", "check_command_size", "check_string", "string_size"]

# linux/binfmts.h: 32 pages of 4 KiB, the terminating NUL included.
MAX_ARG_STRLEN = 131072
# fs/exec.c caps what the strings and their pointers take at 3/4 of _STK_LIM (8 MiB),
# whatever the stack limit.
_KERNEL_CEILING = 6 * 1024**2
_POINTER = 8
# What a launcher adds to a command's own arguments and environment: bubblewrap's
# options and mounts, the setpriv/prlimit prefix, the engine's variables (PATH,
# HOSTNAME, HOME) and corral's exec marker.
_HEADROOM = 64 * 1024
# Per variable: bubblewrap takes each as three arguments (--setenv NAME VALUE).
_PER_VARIABLE = 2 * _POINTER + len("--setenv") + 1


def string_size(text: str) -> int:
    """The bytes ``text`` takes in execve's arrays, its NUL included."""
    return len(text.encode("utf-8", "surrogateescape")) + 1


def arg_max() -> int:
    """The bytes this host's kernel allows a command's arguments and environment."""
    try:
        found = os.sysconf("SC_ARG_MAX")
    except (OSError, ValueError):
        found = -1
    if found <= 0:  # unlimited stack, or unknown: the kernel's own ceiling then
        return _KERNEL_CEILING
    return min(found, _KERNEL_CEILING)


def check_string(text: str, field: str) -> None:
    """Refuse one argument or ``NAME=VALUE`` string longer than the kernel takes."""
    size = string_size(text)
    if size > MAX_ARG_STRLEN:
        raise ConfigError(
            field,
            f"{size - 1} bytes is over the {MAX_ARG_STRLEN - 1} the kernel takes in one "
            "argument or variable (MAX_ARG_STRLEN); pass large data as a file or on stdin",
        )


def check_command_size(
    argv: Iterable[str], env: Mapping[str, str], argv_field: str, env_field: str
) -> None:
    """Refuse arguments and environment that together pass ARG_MAX, less what a
    launcher adds, naming the larger of the two fields."""
    args = sum(string_size(a) + _POINTER for a in argv)
    variables = sum(
        string_size(f"{name}={value}") + _POINTER + _PER_VARIABLE for name, value in env.items()
    )
    allowed = arg_max() - _HEADROOM
    if args + variables > allowed:
        raise ConfigError(
            env_field if variables >= args else argv_field,
            f"the command's arguments ({args} bytes) and environment ({variables} bytes) "
            f"together are over the {allowed} bytes a command may take here (ARG_MAX, "
            "less room for what the launcher adds); pass large data as a file or on stdin",
        )
