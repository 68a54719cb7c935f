"""Arguments and variables past the kernel's limits are refused before anything runs, on
every backend; the largest the limits allow runs.

Refused by the kernel, a container engine reports the runtime's "argument list too long"
as the command's own output and exit status 1.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import corral
from corral.core.arglimits import MAX_ARG_STRLEN, arg_max, check_command_size

LONGEST = MAX_ARG_STRLEN - 1  # bytes of one string, its NUL aside
TOO_LONG = "x" * MAX_ARG_STRLEN
TOO_BIG = "x" * (MAX_ARG_STRLEN - len("BIG="))  # "BIG=..." one byte over


def _crowd() -> dict[str, str]:
    """Variables each under MAX_ARG_STRLEN that together pass ARG_MAX."""
    return {f"V{i}": "x" * 100_000 for i in range(arg_max() // 100_000 + 1)}


def _fullest(argv: list[str]) -> dict[str, str]:
    """The most variables of 100 kB (and one smaller) that still pass with ``argv``."""
    env: dict[str, str] = {}
    for size in (100_000, 10_000, 1_000, 100):
        while True:
            trial = {**env, f"F{len(env)}": "y" * size}
            try:
                check_command_size(argv, trial, "argv", "env")
            except corral.ConfigError:
                break
            env = trial
    return env


def _proves_refusals(
    make: Callable[..., corral.Sandbox],
    run: Callable[..., corral.ExecResult],
    made: Callable[[], set[str]],
) -> None:
    before = made()
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.env\.BIG: 131072 bytes is over"):
        make(env={"BIG": TOO_BIG})
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.env: the command's arguments"):
        make(env=_crowd())
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.command\[1\]: 131072 bytes"):
        make(command=["sleep", TOO_LONG])
    with pytest.raises(corral.ConfigError, match=r"^argv\[3\]: 131072 bytes is over"):
        run(["echo", "a", "b", TOO_LONG])
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.env\.BIG: 131072 bytes is over"):
        run(["true"], env={"BIG": TOO_BIG})
    assert made() == before, "a refused sandbox was made"


def _proves_exec_limits(sb: corral.Sandbox) -> None:
    with pytest.raises(corral.ConfigError, match=r"^argv\[1\]: 131072 bytes is over"):
        sb.exec(["echo", TOO_LONG])
    with pytest.raises(corral.ConfigError, match=r"^env\.BIG: 131072 bytes is over"):
        sb.exec(["true"], env={"BIG": TOO_BIG})
    with pytest.raises(corral.ConfigError, match=r"^env: the command's arguments"):
        sb.exec(["true"], env=_crowd())
    # The largest the kernel takes does run: one string, then the whole environment.
    longest = sb.exec(["sh", "-c", 'printf %s "$BIG" | wc -c'], env={"BIG": "z" * (LONGEST - 4)})
    assert (longest.exit_code, longest.text.strip()) == (0, str(LONGEST - 4)), longest.stderr
    argv = ["sh", "-c", "env | grep -c '^F[0-9]*='"]
    fullest = _fullest(argv)
    for _ in ("first", "again"):  # the local backend's second exec goes by its agent
        result = sb.exec(argv, env=fullest)
        assert (result.exit_code, result.text.strip()) == (0, str(len(fullest))), result.stderr
    assert sb.exec(["echo", "still here"]).text == "still here\n"


@pytest.mark.local
def test_local_refuses_what_the_kernel_would_before_anything_runs(make, settings, state_dir):
    def made() -> set[str]:
        return {i.id for i in corral.list(backend="local", settings=settings)}

    def run(argv: list[str], **keywords: object) -> corral.ExecResult:
        return corral.run(argv, backend="local", settings=settings, **keywords)

    _proves_refusals(make, run, made)
    assert not (state_dir / "local").exists() or not any((state_dir / "local").iterdir())
    _proves_exec_limits(make())


@pytest.mark.local
def test_local_unisolated_takes_the_largest_command_too(make):
    sb = make(security=corral.Security(isolate=False, allow_unsafe=("isolate",)))
    _proves_exec_limits(sb)


def test_engines_refuse_what_the_kernel_would_before_anything_runs(
    box, engine, engine_settings, engine_client
):
    def made() -> set[str]:
        containers = engine_client.containers(all=True, filters={"label": "corral.managed=true"})
        return {c["Id"] for c in containers}

    def run(argv: list[str], **keywords: object) -> corral.ExecResult:
        return corral.run(argv, backend=engine, settings=engine_settings, **keywords)

    _proves_refusals(box, run, made)
    _proves_exec_limits(box())
