"""The sandbox spec: values are parsed strictly and every error names its full path."""

from __future__ import annotations

import math
from typing import Any

import pytest

import corral
from corral.core.convert import structure, unstructure
from corral.core.lifecycle import build_spec
from corral.core.settings import Settings

MiB = 1024**2
GiB = 1024**3


def from_data(data: dict[str, Any]) -> corral.SandboxSpec:
    """A spec as a config file gives it: plain data under ``sandbox``."""
    return structure(data, corral.SandboxSpec, "sandbox")


def from_keywords(settings: Settings, **keywords: Any) -> corral.SandboxSpec:
    """A spec as ``corral.create(...)`` builds it from its keywords."""
    return build_spec(settings, None, keywords)


# -- sizes and durations ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [("512MiB", 512 * MiB), ("1g", GiB), (536870912, 512 * MiB)]
)
def test_memory_accepts_sizes(value: Any, expected: int, clean_settings: Settings) -> None:
    assert from_data({"limits": {"memory": value}}).limits.memory == expected
    assert from_keywords(clean_settings, memory=value).limits.memory == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("-1g", "'-1g' is not a size"),
        ("5m", "'5m' is below the minimum of 6291456 bytes"),
        (True, "True is not a size"),
        (1.5, "1.5 is not a size"),
    ],
)
def test_memory_refuses_bad_sizes(value: Any, reason: str, clean_settings: Settings) -> None:
    expected = f"^sandbox\\.limits\\.memory: {reason}"
    with pytest.raises(corral.ConfigError, match=expected) as info:
        from_data({"limits": {"memory": value}})
    assert info.value.path == "sandbox.limits.memory"
    with pytest.raises(corral.ConfigError, match=expected):
        from_keywords(clean_settings, memory=value)


@pytest.mark.parametrize(("value", "seconds"), [("30s", 30.0), ("5m", 300.0), (30, 30.0)])
def test_durations(value: Any, seconds: float, clean_settings: Settings) -> None:
    assert from_data({"limits": {"lifetime": value}}).limits.lifetime == seconds
    assert from_keywords(clean_settings, cputime=value).limits.cputime == seconds


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (-1, "-1 must be more than zero"),
        (math.nan, "nan is not a finite duration"),
        (math.inf, "inf is not a finite duration"),
        ("x", "'x' is not a duration"),
    ],
)
def test_bad_durations(value: Any, reason: str, clean_settings: Settings) -> None:
    with pytest.raises(corral.ConfigError, match=f"^sandbox\\.limits\\.lifetime: {reason}"):
        from_data({"limits": {"lifetime": value}})
    with pytest.raises(corral.ConfigError, match=f"^sandbox\\.limits\\.cputime: {reason}"):
        from_keywords(clean_settings, cputime=value)


# -- limits that make no sense ---------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("pids", 0, "0 is outside 1..1000000"),
        ("pids", -1, "-1 is outside 1..1000000"),
        ("cpus", 0, "0 is not a number of CPUs in 0.01..1024"),
        ("cpus", -0.5, "-0.5 is not a number of CPUs"),
        ("cpus", 10_000, "10000 is not a number of CPUs"),
        ("nofile", 0, "0 is outside 1..1048576"),
    ],
)
def test_zero_negative_and_huge_limits(
    field: str, value: Any, reason: str, clean_settings: Settings
) -> None:
    with pytest.raises(corral.ConfigError, match=f"^sandbox\\.limits\\.{field}: {reason}"):
        from_keywords(clean_settings, **{field: value})
    with pytest.raises(corral.ConfigError, match=f"^sandbox\\.limits\\.{field}: {reason}"):
        from_data({"limits": {field: value}})


def test_the_smallest_sensible_limits_are_accepted(clean_settings: Settings) -> None:
    spec = from_keywords(clean_settings, memory="6MiB", cpus=0.01, pids=1, nofile=1)
    assert (spec.limits.memory, spec.limits.cpus, spec.limits.pids) == (6 * MiB, 0.01, 1)
    assert isinstance(spec.limits.cpus, float)


# -- wrong types -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keywords", "path", "reason"),
    [
        ({"memory": True}, "limits.memory", "True is not a size"),
        ({"cpus": "2"}, "limits.cpus", "'2' is not a number of CPUs"),
        ({"env": [("A", "1")]}, "env", r"\[\('A', '1'\)\] is not a mapping"),
        ({"mounts": "/repo"}, "mounts", "'/repo' is not a list of mounts"),
        ({"command": "ls"}, "command", "a command must be a list of arguments, not a string"),
        ({"command": b"ls"}, "command", "a command must be a list of arguments, not a string"),
        ({"command": []}, "command", "the command is empty"),
        ({"command": ["ls", 1]}, r"command\[1\]", "1 is not a string"),
    ],
)
def test_wrong_types_are_refused_not_coerced(
    keywords: dict[str, Any], path: str, reason: str, clean_settings: Settings
) -> None:
    with pytest.raises(corral.ConfigError, match=f"^sandbox\\.{path}: {reason}"):
        from_keywords(clean_settings, **keywords)


def test_spec_objects_refuse_wrong_types_too() -> None:
    with pytest.raises(corral.ConfigError, match=r"^memory: True is not a size"):
        corral.Limits(memory=True)
    with pytest.raises(corral.ConfigError, match=r"^command: a command must be a list"):
        corral.SandboxSpec(command="ls")


# -- unknown keys ----------------------------------------------------------------------


def test_an_unknown_limit_is_refused_with_its_path() -> None:
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.limits\.memroy: unknown setting"):
        from_data({"limits": {"memroy": "1g"}})


def test_an_unknown_security_key_is_refused_with_its_path() -> None:
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.security\.privileged: unknown"):
        from_data({"security": {"privileged": True}})


def test_an_unknown_top_level_key_is_refused() -> None:
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.imgae: unknown setting"):
        from_data({"imgae": "python:3.12"})


def test_an_unknown_key_in_a_mount_table_is_refused() -> None:
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.mounts\[0\]\.sizee: unknown"):
        from_data({"mounts": [{"type": "tmpfs", "target": "/cache", "sizee": "1m"}]})


# -- environment -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["A=B", "", "1ABC", "A\0B", "A B"])
def test_bad_variable_names(name: str, clean_settings: Settings) -> None:
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.env: .* is not a valid variable name"):
        from_keywords(clean_settings, env={name: "1"})


def test_a_variable_value_with_nul_is_refused(clean_settings: Settings) -> None:
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.env\.A: contains a NUL byte"):
        from_keywords(clean_settings, env={"A": "x\0y"})


def test_a_non_string_variable_value_is_refused() -> None:
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.env\.A: 1 is not a string"):
        from_data({"env": {"A": 1}})


def test_good_variables_are_kept(clean_settings: Settings) -> None:
    spec = from_keywords(clean_settings, env={"_A1": "", "PATH": "/bin:/usr/bin"})
    assert spec.env == {"_A1": "", "PATH": "/bin:/usr/bin"}


# -- paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workdir", "reason"),
    [
        ("work", "'work' is not an absolute path"),
        ("/proc", "'/proc' is inside a kernel filesystem"),
        ("/proc/self", "'/proc/self' is inside a kernel filesystem"),
        ("/a/../b", r"'/a/\.\./b' contains '\.\.'"),
    ],
)
def test_bad_workdirs(workdir: str, reason: str, clean_settings: Settings) -> None:
    with pytest.raises(corral.ConfigError, match=f"^sandbox\\.workdir: {reason}"):
        from_keywords(clean_settings, workdir=workdir)


def test_workdir_is_normalised(clean_settings: Settings) -> None:
    assert from_keywords(clean_settings, workdir="/work//sub/").workdir == "/work/sub"
    assert from_keywords(clean_settings, workdir="/process").workdir == "/process"


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("relative", "'relative' is not an absolute path"),
        ("/", "a mount cannot cover '/'"),
        ("/proc/x", "'/proc/x' is inside a kernel filesystem"),
        ("/a:b", "'/a:b' contains ':' or ','"),
    ],
)
def test_bad_mount_targets(target: str, reason: str, clean_settings: Settings) -> None:
    expected = f"^sandbox\\.mounts\\[0\\]\\.target: {reason}"
    with pytest.raises(corral.ConfigError, match=expected):
        from_data({"mounts": [{"source": "./repo", "target": target}]})
    with pytest.raises(corral.ConfigError, match=expected):
        from_keywords(clean_settings, mounts=[{"type": "tmpfs", "target": target}])
    with pytest.raises(corral.ConfigError, match=f"^target: {reason}"):
        corral.Mount("./repo", target)


def test_two_mounts_on_one_target_are_refused() -> None:
    with pytest.raises(corral.ConfigError, match="two mounts share the target '/b'"):
        from_data({"mounts": ["a:/b", "c:/b"]})


def test_mount_parse() -> None:
    assert corral.Mount.parse("a:/b:rw") == corral.Mount("a", "/b", read_only=False)
    assert corral.Mount.parse("a:/b:ro") == corral.Mount("a", "/b", read_only=True)
    assert corral.Mount.parse("a:/b").read_only is True
    for bad in ("a:/b:xx", "a", "a:/b:rw:x"):
        with pytest.raises(corral.ConfigError, match="is not SRC:DST"):
            corral.Mount.parse(bad)


def test_mount_tables_choose_their_kind() -> None:
    spec = from_data(
        {
            "mounts": [
                "./repo:/workspace",
                {"type": "tmpfs", "target": "/cache", "size": "1m"},
                {"type": "volume", "name": "data", "target": "/data"},
            ]
        }
    )
    kinds = [type(m) for m in spec.mounts]
    assert kinds == [corral.Mount, corral.Tmpfs, corral.Volume]
    assert spec.mounts[1].size == MiB
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.mounts\[0\]\.type: 'nfs'"):
        from_data({"mounts": [{"type": "nfs", "target": "/x"}]})


# -- defaults, round trip, security ----------------------------------------------------


def test_defaults_are_secure() -> None:
    spec = corral.SandboxSpec()
    assert spec.network.mode == "none"
    assert spec.security.isolate
    assert spec.security.no_new_privileges
    assert spec.security.read_only_root
    assert spec.security.loosened() == []
    assert spec.limits.memory == 512 * MiB
    assert spec.limits.pids == 256


def test_a_spec_survives_unstructure_and_structure() -> None:
    spec = corral.SandboxSpec(
        image="python:3.12-slim",
        command=["sleep", "infinity"],
        env={"A": "1"},
        mounts=[corral.Mount("./repo", "/workspace"), corral.Tmpfs("/cache")],
        limits=corral.Limits(memory="1g", cputime="5m"),
        labels={"team": "ml"},
    )
    assert structure(unstructure(spec), corral.SandboxSpec) == spec


def test_keywords_override_settings_defaults() -> None:
    settings = Settings(sandbox={"limits": {"memory": "1g", "pids": 64}, "env": {"A": "1"}})
    spec = from_keywords(settings, memory="2g", env={"B": "2"})
    assert spec.limits.memory == 2 * GiB
    assert spec.limits.pids == 64  # untouched defaults stay
    assert spec.env == {"A": "1", "B": "2"}


def test_allow_unsafe_names_only_known_options() -> None:
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.security\.allow_unsafe: 'root'"):
        from_data({"security": {"allow_unsafe": ["root"]}})
    security = corral.Security(isolate=False, cap_add=["NET_ADMIN"])
    assert security.loosened() == ["cap_add", "isolate"]


def test_exec_request_is_validated() -> None:
    with pytest.raises(corral.ConfigError, match=r"^argv: a command must be a list"):
        corral.ExecRequest(argv="ls -l")
    with pytest.raises(corral.ConfigError, match=r"^timeout: 0 must be more than zero"):
        corral.ExecRequest(argv=["ls"], timeout=0)
    request = corral.ExecRequest(argv=["cat"], stdin="hé", timeout="2s")
    assert (request.argv, request.stdin, request.timeout) == (("cat",), "hé".encode(), 2.0)


# -- users -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "ids"),
    [("1000", (1000, 1000)), ("7:8", (7, 8)), ("0:0", (0, 0)), ("app", None), ("1000:staff", None)],
)
def test_one_parser_reads_every_user(user: str, ids: tuple[int, int] | None) -> None:
    from corral.core.spec import parse_user

    assert parse_user(user) == ids
    assert corral.SandboxSpec(user=user).uid_gid() == ids
    assert corral.ExecRequest(argv=["id"], user=user).user == user


@pytest.mark.parametrize(
    ("user", "reason"),
    [
        ("", "'' is not 'user' or 'user:group'"),
        ("1000:", "'1000:' is not 'user' or 'user:group'"),
        ("a:b:c", "'a:b:c' is not 'user' or 'user:group'"),
        ("\uff14\uff12", "'\uff14\uff12' is not 'user' or 'user:group'"),  # not ASCII digits
        ("4294967295", "'4294967295': 4294967295 is above 4294967294"),
        ("1:99999999999", "'1:99999999999': 99999999999 is above 4294967294"),
    ],
)
def test_a_bad_user_is_refused_naming_its_field(
    user: str, reason: str, clean_settings: Settings
) -> None:
    with pytest.raises(corral.ConfigError, match=f"^sandbox\\.user: {reason}$"):
        from_keywords(clean_settings, user=user)
    with pytest.raises(corral.ConfigError, match=f"^user: {reason}$"):
        corral.ExecRequest(argv=["id"], user=user)


def test_names_are_refused_where_numbers_are_needed() -> None:
    from corral.core.spec import parse_user

    assert parse_user("7", "backends.local.host_user", numbers_for="the local backend") == (7, 7)
    with pytest.raises(
        corral.ConfigError,
        match=r"^backends\.local\.host_user: 'nobody': the local backend needs 'uid:gid'",
    ):
        parse_user("nobody", "backends.local.host_user", numbers_for="the local backend")


def test_the_local_backend_refuses_a_host_user_it_cannot_use() -> None:
    import os

    from corral.backends.local import LocalBackend, LocalSettings

    if os.geteuid() != 0:
        pytest.skip("the host user is used (and read) as root only")
    for bad in ("nobody", "1:99999999999"):
        with pytest.raises(corral.ConfigError, match=r"^backends\.local\.host_user: "):
            LocalBackend(LocalSettings(host_user=bad))


# -- the kernel's limits on a command ----------------------------------------------------

MAX_STRING = 131072 - 1  # MAX_ARG_STRLEN less its NUL


def test_a_variable_the_kernel_would_refuse_is_refused_by_name(clean_settings: Settings) -> None:
    at_most = "x" * (MAX_STRING - len("BIG="))
    assert from_keywords(clean_settings, env={"BIG": at_most}).env["BIG"] == at_most
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.env\.BIG: 131072 bytes is over"):
        from_keywords(clean_settings, env={"BIG": at_most + "x"})
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.env\.BIG: .*MAX_ARG_STRLEN"):
        from_data({"env": {"BIG": "é" * 70000}})  # bytes count, not characters
    with pytest.raises(corral.ConfigError, match=r"^env\.BIG: 131072 bytes is over"):
        corral.ExecRequest(argv=["true"], env={"BIG": at_most + "x"})


def test_an_argument_the_kernel_would_refuse_is_refused_by_index(clean_settings: Settings) -> None:
    fits = "x" * MAX_STRING
    assert corral.ExecRequest(argv=["echo", fits]).argv[1] == fits
    with pytest.raises(corral.ConfigError, match=r"^argv\[3\]: 131072 bytes is over"):
        corral.ExecRequest(argv=["echo", "a", "b", fits + "x"])
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.command\[1\]: 131072 bytes is over"):
        from_keywords(clean_settings, command=["sleep", fits + "x"])
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.healthcheck\.test\[0\]: 131072"):
        from_data({"healthcheck": {"test": [fits + "x"]}})


def test_arguments_and_environment_over_arg_max_are_refused(clean_settings: Settings) -> None:
    from corral.core.arglimits import arg_max

    piece = "x" * 100_000
    count = arg_max() // 100_000 + 1  # each fits; together they pass ARG_MAX
    many = {f"V{i}": piece for i in range(count)}
    with pytest.raises(corral.ConfigError, match=r"^env: the command's arguments .*ARG_MAX"):
        corral.ExecRequest(argv=["true"], env=many)
    with pytest.raises(corral.ConfigError, match=r"^argv: the command's arguments .*ARG_MAX"):
        corral.ExecRequest(argv=["echo", *[piece] * count])
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.env: the command's arguments"):
        from_keywords(clean_settings, env=many)
    with pytest.raises(corral.ConfigError, match=r"^sandbox\.command: the command's arguments"):
        from_keywords(clean_settings, command=["echo", *[piece] * count])
    half = {f"V{i}": piece for i in range(count // 2)}
    assert len(corral.ExecRequest(argv=["true"], env=half).env) == count // 2


def test_arg_max_follows_the_stack_limit_within_the_kernels_ceiling() -> None:
    import os

    from corral.core.arglimits import arg_max

    assert 131072 <= arg_max() <= 6 * 1024**2
    assert arg_max() == min(os.sysconf("SC_ARG_MAX"), 6 * 1024**2)
