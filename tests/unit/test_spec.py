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
