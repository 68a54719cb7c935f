"""create's and exec's options are declared once (core/options.py): every signature that
takes them, the pool, the spec layer and the command line are proved to match it."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

import attrs
import pytest

import corral
import corral.aio
from corral import cli
from corral.core import options
from corral.core.lifecycle import build_spec
from corral.core.options import CREATE, EXEC, WATCH, names
from corral.core.sandbox import Sandbox
from corral.core.settings import Settings
from corral.core.spec import ExecRequest, Limits, SandboxSpec

Params = dict[str, tuple[str, Any, Any]]  # name -> (annotation, default, kind)

KW = inspect.Parameter.KEYWORD_ONLY
POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
VAR = inspect.Parameter.VAR_KEYWORD
EMPTY = inspect.Parameter.empty

# What says where and how a sandbox is made, beside the options themselves.
WHERE: Params = {
    "backend": ("str | None", None, KW),
    "spec": ("SandboxSpec | None", None, KW),
    "settings": ("Settings | None", None, KW),
}
SANDBOX_ONLY = tuple(o for o in CREATE if o.name != "image")
IMAGE: Params = {"image": ("str | None", None, POS)}
ARGV: Params = {"argv": ("Sequence[str]", EMPTY, POS)}
# exec's options that run takes (create's env, workdir and user are the sandbox's).
RUN_EXEC = tuple(o for o in EXEC if o.name not in names(CREATE))


def params(fn: Callable[..., Any], *, drop_self: bool = False) -> Params:
    found = {
        name: (p.annotation, p.default, p.kind)
        for name, p in inspect.signature(fn).parameters.items()
    }
    if drop_self:
        found.pop("self", None)
    return found


def expected(*tables: tuple[options.Option, ...]) -> Params:
    return {o.name: (o.annotation, None, KW) for table in tables for o in table}


def unpacked(found: Params) -> Params:
    """``found`` without its ``**options: Unpack[SandboxOptions]``, which must be there."""
    rest = {name: p for name, p in found.items() if p[2] is not VAR}
    variadic = [p for p in found.values() if p[2] is VAR]
    assert len(variadic) == 1 and variadic[0][0].endswith("SandboxOptions]"), found
    return rest


def test_create_takes_the_tables_options_with_their_types():
    assert params(corral.create) == {**IMAGE, **expected(SANDBOX_ONLY), **WHERE}
    in_order = [name for name in params(corral.create) if name in names(CREATE)]
    assert in_order == list(names(CREATE))


def test_the_typed_dict_of_passed_on_options_is_the_table():
    hints = typing.get_type_hints(options.SandboxOptions, globalns=vars(options))
    assert list(options.SandboxOptions.__annotations__) == list(names(SANDBOX_ONLY))
    assert set(hints) == set(names(SANDBOX_ONLY))
    annotations = {
        name: getattr(a, "__forward_arg__", a)
        for name, a in options.SandboxOptions.__annotations__.items()
    }
    assert annotations == {o.name: o.annotation for o in SANDBOX_ONLY}


def test_run_takes_creates_options_and_execs_others():
    assert unpacked(params(corral.run)) == {
        **ARGV,
        **IMAGE,
        **expected(RUN_EXEC, WATCH),
        **WHERE,
    }


def test_aio_create_and_run_take_what_the_sync_ones_take():
    assert unpacked(params(corral.aio.create)) == {**IMAGE, **WHERE}
    sync_run = unpacked(params(corral.run))
    del sync_run["cancel"]  # an asyncio task is stopped by cancelling it
    assert unpacked(params(corral.aio.run)) == sync_run


def test_the_pools_take_creates_options():
    own = {
        "size": ("int", 1, POS),
        "backend": ("str | None", None, KW),
        "settings": ("Settings | None", None, KW),
        "on_empty": ("Literal['wait', 'fail']", "wait", KW),
        "acquire_timeout": ("float", 30.0, KW),
        "image": ("str | None", None, KW),
        "spec": ("SandboxSpec | None", None, KW),
    }
    assert unpacked(params(corral.Pool, drop_self=True)) == own
    assert unpacked(params(corral.aio.Pool, drop_self=True)) == own
    from corral.core.pool import _CREATE_KEYWORDS

    assert set(names(CREATE)) == _CREATE_KEYWORDS


def test_a_pool_refuses_a_keyword_create_does_not_take(clean_settings: Settings):
    with pytest.raises(TypeError, match="nonsense"):
        corral.Pool(1, backend="fake", settings=clean_settings, nonsense=1)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("method", "tables"),
    [
        (Sandbox.exec, (EXEC, WATCH)),
        (Sandbox.stream, (EXEC,)),
        (Sandbox._request, (EXEC,)),
        (corral.aio.AsyncSandbox.exec, (EXEC,)),
        (corral.aio.AsyncSandbox.stream, (EXEC,)),
    ],
)
def test_every_exec_signature_takes_the_tables_options(method, tables):
    assert params(method, drop_self=True) == {**ARGV, **expected(*tables)}


def test_run_once_takes_what_run_passes_on():
    found = params(Sandbox._run_once, drop_self=True)
    assert {name: p[0] for name, p in found.items()} == {
        "argv": "Sequence[str]",
        **{o.name: o.annotation for o in (*RUN_EXEC, *WATCH)},
    }


def test_every_option_lands_on_a_field_of_the_model():
    spec_fields = attrs.fields_dict(SandboxSpec)
    for option in CREATE:
        where = Limits if option.path[0] == "limits" else SandboxSpec
        assert option.path[-1] in attrs.fields_dict(where), option
        assert option.path[0] in spec_fields, option
    # tty, name and input are a spawned process's, set by Sandbox.spawn.
    request_fields = set(attrs.fields_dict(ExecRequest)) - {"argv", "tty", "name", "input"}
    assert {o.path[0] for o in EXEC} == request_fields
    assert all(o.path == () for o in WATCH)


def test_each_keyword_sets_its_field(clean_settings: Settings):
    given = {
        "image": "img",
        "command": ["sleep", "1"],
        "env": {"A": "1"},
        "workdir": "/w",
        "user": "7:8",
        "mounts": [corral.Tmpfs("/cache")],
        "memory": "1g",
        "cpus": 2,
        "pids": 9,
        "nofile": 99,
        "nproc": 98,
        "cputime": "5s",
        "file_size": "1m",
        "disk": "2m",
        "lifetime": "3m",
        "network": "bridge",
        "security": corral.Security(cap_add=("NET_ADMIN",), allow_unsafe=("cap_add",)),
        "labels": {"team": "a"},
        "healthcheck": {"test": ["true"]},
        "ports": [8000, "8001"],
        "auto_resume": True,
    }
    assert set(given) == set(names(CREATE))
    spec = build_spec(clean_settings, None, given)
    assert (spec.image, spec.command, spec.env, spec.workdir) == (
        "img",
        ("sleep", "1"),
        {"A": "1"},
        "/w",
    )
    assert (spec.user, spec.mounts, spec.labels) == (
        "7:8",
        (corral.Tmpfs("/cache"),),
        {"team": "a"},
    )
    assert attrs.astuple(spec.limits) == (1024**3, 2.0, 9, 99, 98, 5.0, 1024**2, 2 * 1024**2, 180.0)
    assert spec.network.mode == "bridge" and spec.security.cap_add == ("NET_ADMIN",)
    assert spec.healthcheck is not None and spec.healthcheck.test == ("true",)
    assert (spec.ports, spec.auto_resume) == ((8000, 8001), True)


def test_an_unknown_keyword_is_refused_by_name(clean_settings: Settings):
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.nonsense: unknown setting"):
        build_spec(clean_settings, None, {"nonsense": 1})
    with pytest.raises(corral.ConfigError, match="nonsense"):
        corral.run(["true"], backend="fake", settings=clean_settings, nonsense=1)  # type: ignore[call-arg]


# -- the command line ---------------------------------------------------------------------


def _dests(verb: str) -> set[str]:
    parser = cli.parse_args([verb, *(["ID"] if verb == "exec" else []), "--", "true"]).parser
    return {a.dest for a in parser._actions if a.option_strings}


def _flags(*tables: tuple[options.Option, ...], skip: tuple[str, ...] = ()) -> set[str]:
    return {o.flag.dest for t in tables for o in t if o.flag is not None and o.name not in skip}


def test_the_command_lines_flags_are_the_tables():
    own = {"help", "debug", "backend", "json", "tty"}  # tty: -t, a terminal session's
    assert _dests("run") == own | {"keep"} | _flags(CREATE) | _flags(EXEC, skip=names(CREATE))
    assert _dests("exec") == own | _flags(EXEC)


def test_run_flags_become_create_and_exec_keywords(clean_settings: Settings):
    args = cli.parse_args(
        [
            "run",
            *("--image", "img", "-e", "A=1", "-w", "/w", "-u", "7:8", "--mount", "/a:/b"),
            *("-m", "1g", "--cpus", "0.5", "--pids", "9", "--nofile", "99", "--nproc", "98"),
            *("--cputime", "5s", "--file-size", "1m", "--disk", "2m", "--lifetime", "3m"),
            *("--network", "bridge", "--allow-unsafe", "cap_add", "--label", "team=a"),
            *("--timeout", "7", "--max-output", "1k"),
            *("--", "true"),
        ]
    )
    sandbox = cli._sandbox_options(args, clean_settings)
    assert sandbox == {
        "image": "img",
        "env": {"A": "1"},
        "workdir": "/w",
        "user": "7:8",
        "mounts": ["/a:/b"],
        "memory": "1g",
        "cpus": 0.5,
        "pids": 9,
        "nofile": 99,
        "nproc": 98,
        "cputime": "5s",
        "file_size": "1m",
        "disk": "2m",
        "lifetime": "3m",
        "network": "bridge",
        "security": {"allow_unsafe": ["cap_add"]},
        "labels": {"team": "a"},
        "ports": None,
        "auto_resume": None,
    }
    assert cli._exec_options(args, for_exec=False) == {
        "timeout": "7",
        "stdin": None,
        "max_output": "1k",
        "idle_timeout": None,
    }
    assert build_spec(clean_settings, None, sandbox).limits.nofile == 99


def test_exec_flags_become_exec_keywords():
    args = cli.parse_args(["exec", "ID", "-e", "A=1", "-w", "/w", "-u", "7", "--", "true"])
    assert cli._exec_options(args, for_exec=True) == {
        "timeout": None,
        "env": {"A": "1"},
        "workdir": "/w",
        "user": "7",
        "stdin": None,
        "max_output": None,
        "idle_timeout": None,
    }


@pytest.mark.parametrize("flag", ["--env", "--label"])
def test_a_pair_that_is_not_k_v_is_refused_naming_the_flag(flag: str, clean_settings: Settings):
    args = cli.parse_args(["run", flag, "novalue", "--", "true"])
    with pytest.raises(corral.ConfigError, match=f"^{flag}: 'novalue' is not K=V"):
        cli._sandbox_options(args, clean_settings)
