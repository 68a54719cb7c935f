"""THREATS.md B1, configuration validation (T01-T12): refused before any engine call.

Every bad input is tried through ``corral.create`` on each backend and must raise
corral's own error naming the field, with nothing created: no sandbox carrying the
case's label is listed afterwards (and the harness checks the engines, the host's
processes, fds and temporary folders). Each case has a harmless twin that must work,
so that "refused" never just means "broken".

The catalogue's names map onto corral's family: SandboxConfigError -> ConfigError,
UnsafeConfigError -> PolicyError, UnsupportedFeatureError -> CapabilityError; a bad
mount destination is a ConfigError naming ``sandbox.mounts[N].target``.
"""

from __future__ import annotations

import os
import re
import socket

import attrs
import pytest
from cases import ENGINES_ONLY, ONLY_LOCAL, refused

import corral
from corral.core.backend import Capability
from corral.core.plugins import get_host

NAN, INF = float("nan"), float("inf")
MiB = 1024**2


def _capabilities(backend: str, settings: corral.Settings) -> Capability:
    return get_host().backend(backend, settings).capabilities()


def _inspect(raw_client_of, backend: str, sb: corral.Sandbox) -> dict:
    client = raw_client_of(backend)
    try:
        return client.inspect_container(f"corral-{sb.id}")
    finally:
        client.close()


# -- T01: out-of-range resource values ------------------------------------------------

OUT_OF_RANGE = [
    ({"memory": -1}, "sandbox.limits.memory", r"-1 is below the minimum of 6291456 bytes"),
    ({"memory": 0}, "sandbox.limits.memory", r"0 is below the minimum of 6291456 bytes"),
    ({"memory": "5m"}, "sandbox.limits.memory", r"'5m' is below the minimum of 6291456 bytes"),
    ({"cpus": 0}, "sandbox.limits.cpus", r"0 is not a number of CPUs in 0\.01\.\.1024"),
    ({"cpus": -0.5}, "sandbox.limits.cpus", r"-0\.5 is not a number of CPUs in 0\.01\.\.1024"),
    ({"cpus": 10_000}, "sandbox.limits.cpus", r"10000 is not a number of CPUs in 0\.01\.\.1024"),
    ({"cpus": NAN}, "sandbox.limits.cpus", r"nan is not a number of CPUs"),
    ({"pids": 0}, "sandbox.limits.pids", r"0 is outside 1\.\.1000000"),
    # -1 is "unlimited" to both engines: it must never pass through.
    ({"pids": -1}, "sandbox.limits.pids", r"-1 is outside 1\.\.1000000"),
    ({"nofile": 0}, "sandbox.limits.nofile", r"0 is outside 1\.\.1048576"),
    ({"nproc": -1}, "sandbox.limits.nproc", r"-1 is outside 1\.\.1000000"),
    ({"lifetime": -1}, "sandbox.limits.lifetime", r"-1 must be more than zero"),
    ({"lifetime": NAN}, "sandbox.limits.lifetime", r"nan is not a finite duration"),
    ({"lifetime": INF}, "sandbox.limits.lifetime", r"inf is not a finite duration"),
    ({"lifetime": "31d"}, "sandbox.limits.lifetime", r"is above 2592000 s"),
    ({"cputime": 0}, "sandbox.limits.cputime", r"0 must be more than zero"),
]


@pytest.mark.parametrize(
    ("keywords", "field", "reason"), OUT_OF_RANGE, ids=[repr(c[0]) for c in OUT_OF_RANGE]
)
def test_t01_out_of_range_limits_are_refused_naming_the_field_and_range(
    backend, backend_settings, keywords, field, reason
):
    error = refused(backend, backend_settings, corral.ConfigError, reason, **keywords)
    assert error.path == field


@pytest.mark.parametrize(
    ("timeout", "reason"),
    [
        (-1, "-1 must be more than zero"),
        (0, "0 must be more than zero"),
        (NAN, "nan is not a finite duration"),
        (INF, "inf is not a finite duration"),
    ],
)
def test_t01_out_of_range_exec_timeouts_are_refused_before_running(sandbox, timeout, reason):
    sb = sandbox()
    with pytest.raises(corral.ConfigError, match=reason) as caught:
        sb.exec(["touch", "ran"], timeout=timeout)
    assert caught.value.path == "timeout"
    assert sb.exec(["ls", "ran"]).exit_code != 0, "the refused command ran anyway"


@pytest.mark.through_ray
def test_t01_twin_limits_at_sane_values_are_applied(kind, sandbox, raw_client_of):
    sb = sandbox(memory="64MiB", cpus=0.5, pids=64, nofile=64, lifetime="5m")
    result = sb.exec(["sh", "-c", "ulimit -n"], timeout=60)
    assert (result.exit_code, result.text) == (0, "64\n")
    if kind != "local":
        host = _inspect(raw_client_of, kind, sb)["HostConfig"]
        assert (host["Memory"], host["PidsLimit"], host["NanoCpus"]) == (64 * MiB, 64, 5 * 10**8)


# -- T02: wrong types ----------------------------------------------------------------

WRONG_TYPES = [
    ({"memory": True}, "sandbox.limits.memory", r"True is not a size"),
    ({"pids": True}, "sandbox.limits.pids", r"True is not a whole number"),
    ({"pids": 2.0}, "sandbox.limits.pids", r"2\.0 is not a whole number"),
    ({"cpus": "2"}, "sandbox.limits.cpus", r"'2' is not a number of CPUs"),
    ({"cpus": True}, "sandbox.limits.cpus", r"True is not a number of CPUs"),
    ({"env": [("A", "1")]}, "sandbox.env", r"is not a mapping of names to values"),
    ({"env": {"A": 1}}, "sandbox.env.A", r"1 is not a string"),
    ({"mounts": "/repo"}, "sandbox.mounts", r"'/repo' is not a list of mounts"),
    ({"command": b"ls"}, "sandbox.command", r"not a string; there is no implicit shell"),
    ({"command": ["ls", 1]}, "sandbox.command[1]", r"1 is not a string"),
    ({"workdir": b"/x"}, "sandbox.workdir", r"b'/x' is not a string"),
    ({"security": {"cap_add": "NET_RAW"}}, "sandbox.security.cap_add", r"not a list"),
    ({"security": {"read_only_root": "false"}}, "sandbox.security.read_only_root", r"'false'"),
    ({"security": {"no_new_privileges": 0}}, "sandbox.security.no_new_privileges", r"0 is not"),
    ({"labels": [("a", "b")]}, "sandbox.labels", r"is not a mapping"),
]


@pytest.mark.parametrize(
    ("keywords", "field", "reason"), WRONG_TYPES, ids=[repr(c[0]) for c in WRONG_TYPES]
)
def test_t02_wrong_types_are_refused_not_coerced(
    backend, backend_settings, keywords, field, reason
):
    error = refused(backend, backend_settings, corral.ConfigError, reason, **keywords)
    assert error.path == field


def test_t02_twin_the_right_types_are_accepted(sandbox):
    sb = sandbox(memory=64 * MiB, cpus=1, pids=64, env={"A": "1"}, command=None)
    result = sb.exec(["sh", "-c", 'printf %s "$A"'])
    assert (result.exit_code, result.text) == (0, "1")


# -- T03: unknown or misspelt keys ---------------------------------------------------


@pytest.mark.parametrize(
    ("keywords", "field"),
    [
        ({"security": {"cap_ad": ["NET_RAW"]}}, "sandbox.security.cap_ad"),
        ({"security": {"privileged": True}}, "sandbox.security.privileged"),
        ({"network": {"mode": "none", "dsn": ["1.1.1.1"]}}, "sandbox.network.dsn"),
        ({"healthcheck": {"test": ["true"], "intervall": "1s"}}, "sandbox.healthcheck.intervall"),
    ],
)
def test_t03_unknown_nested_keys_are_refused_by_name(backend, backend_settings, keywords, field):
    refused(
        backend,
        backend_settings,
        corral.ConfigError,
        rf"^{re.escape(field)}: unknown setting",
        **keywords,
    )


def test_t03_an_unknown_key_in_a_mount_table_is_refused(backend, backend_settings, mount_root):
    mount = {"type": "bind", "source": str(mount_root), "target": "/data", "readonly": True}
    refused(
        backend,
        backend_settings,
        corral.ConfigError,
        r"^sandbox\.mounts\[0\]\.readonly: unknown setting",
        mounts=[mount],
    )


def test_t03_an_unknown_option_name_in_allow_unsafe_is_refused(backend, backend_settings):
    refused(
        backend,
        backend_settings,
        corral.ConfigError,
        r"^sandbox\.security\.allow_unsafe: 'privileged' is not an unsafe option",
        security={"allow_unsafe": ["privileged"]},
    )


@pytest.mark.parametrize(
    "sandbox_table",
    [{"memroy": "1g"}, {"limits": {"memroy": "1g"}}, {"security": {"seccmop": "unconfined"}}],
)
def test_t03_typos_in_settings_files_fail_loading(shared_tmp, sandbox_table):
    folder = shared_tmp / "project"
    folder.mkdir()
    key = next(iter(sandbox_table))
    inner = sandbox_table[key]
    text = (
        f'[sandbox.{key}]\n{next(iter(inner))} = "x"\n'
        if isinstance(inner, dict)
        else f'[sandbox]\n{key} = "{inner}"\n'
    )
    (folder / "corral.toml").write_text(text)
    with pytest.raises(corral.ConfigError, match=r"corral\.toml: sandbox\..*: unknown setting"):
        corral.load_settings(cwd=folder, environ={})


def test_t03_a_typo_in_the_backend_table_is_refused_at_create(backend, backend_settings):
    table = {**backend_settings.backends[backend], "pul": "never"}
    settings = attrs.evolve(backend_settings, backends={backend: table})
    with pytest.raises(corral.ConfigError, match=rf"^backends\.{backend}\.pul: unknown setting"):
        corral.create(backend=backend, settings=settings).close()


def test_t03_corral_create_has_no_catch_all_keywords(backend, backend_settings):
    with pytest.raises(TypeError, match="memroy"):
        corral.create(backend=backend, settings=backend_settings, memroy="1g")  # type: ignore[call-arg]


def test_t03_twin_correct_spellings_take_effect(backend, backend_settings):
    settings = attrs.evolve(backend_settings, sandbox={"limits": {"nofile": 100}})
    with corral.create(backend=backend, settings=settings, lifetime="5m") as sb:
        assert sb.exec(["sh", "-c", "ulimit -n"]).text == "100\n"


# -- T05: sensitive host bind sources ------------------------------------------------

SENSITIVE_SOURCES = [
    "/", "/etc", "/proc", "/sys", "/dev", "/boot", "/usr", "/lib", "/run", "/var/run",
    "/var/run/docker.sock", "/run/docker.sock", "/run/podman/podman.sock",
    "/run/containerd/containerd.sock", "/var/lib/docker", "/root",
]  # fmt: skip


@pytest.mark.parametrize("source", SENSITIVE_SOURCES)
def test_t05_sensitive_host_paths_are_refused_as_mount_sources(backend, backend_settings, source):
    # Even an allowlist that covers everything does not make them mountable.
    settings = attrs.evolve(backend_settings, mount_roots=("/",))
    field = r"^sandbox\.mounts\[0\]\.source: "
    if os.path.lexists(source):
        refused(
            backend,
            settings,
            corral.PolicyError,
            field + r".*'sensitive_mounts'",
            mounts=[corral.Mount(source, "/host")],
        )
    else:  # not on this host: refused all the same, for not existing
        refused(
            backend,
            settings,
            corral.ConfigError,
            field + r".*does not exist",
            mounts=[corral.Mount(source, "/host")],
        )


def test_t05_the_test_engines_own_sockets_are_refused(backend, backend_settings):
    sockets = [
        os.environ[v].removeprefix("unix://")
        for v in ("CORRALTEST_DOCKER_URL", "CORRALTEST_PODMAN_URL")
        if os.environ.get(v, "").startswith("unix://")
    ]
    assert sockets or os.environ.get("CI") != "true", "CI must have the engines' sockets"
    settings = attrs.evolve(backend_settings, mount_roots=("/",))
    for path in sockets:
        refused(
            backend,
            settings,
            corral.PolicyError,
            r"'sensitive_mounts'",
            mounts=[corral.Mount(path, "/engine.sock")],
        )


def test_t05_a_socket_under_an_allowed_root_is_refused(backend, backend_settings, mount_root):
    path = mount_root / "engine.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        refused(
            backend,
            backend_settings,
            corral.PolicyError,
            r"is a socket",
            mounts=[corral.Mount(str(path), "/engine.sock")],
        )
    finally:
        listener.close()
        path.unlink()


def test_t05_a_symlink_to_a_system_folder_is_refused(backend, backend_settings, mount_root):
    link = mount_root / "innocent"
    link.symlink_to("/etc")
    refused(
        backend,
        backend_settings,
        corral.PolicyError,
        r"'/etc' is a system folder",
        mounts=[corral.Mount(str(link), "/data")],
    )


def test_t05_home_and_credentials_are_refused(backend, backend_settings, mount_root, monkeypatch):
    home = mount_root / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / "project").mkdir()
    (home / "project" / "README").write_text("hello\n")
    monkeypatch.setenv("HOME", str(home))
    refused(
        backend,
        backend_settings,
        corral.PolicyError,
        r"is a system or home folder",
        mounts=[corral.Mount("~", "/data")],
    )
    refused(
        backend,
        backend_settings,
        corral.PolicyError,
        r"holds credentials",
        mounts=[corral.Mount("~/.ssh", "/data")],
    )
    # The twin: a project folder in the same home is fine.
    with corral.create(
        backend=backend,
        settings=backend_settings,
        lifetime="5m",
        mounts=[corral.Mount("~/project", "/data")],
    ) as sb:
        assert sb.exec(["cat", "/data/README"]).text == "hello\n"


def test_t05_an_empty_allowlist_denies_every_source(backend, backend_settings, mount_root):
    (mount_root / "project").mkdir()
    settings = attrs.evolve(backend_settings, mount_roots=())
    refused(
        backend,
        settings,
        corral.PolicyError,
        r"is not under an allowed mount root \(none\)",
        mounts=[corral.Mount(str(mount_root / "project"), "/data")],
    )


@pytest.mark.through_ray
def test_t05_twin_a_project_folder_mounts_read_only(sandbox, mount_root):
    project = mount_root / "project"
    project.mkdir()
    (project / "file.txt").write_text("data\n")
    sb = sandbox(mounts=[corral.Mount(str(project), "/data")])
    assert sb.exec(["cat", "/data/file.txt"]).text == "data\n"
    assert sb.exec(["sh", "-c", "echo x > /data/new"]).exit_code != 0
    assert sorted(p.name for p in project.iterdir()) == ["file.txt"]


# -- T07: invalid mount destinations -------------------------------------------------

BAD_TARGETS = [
    ("relative/path", r"'relative/path' is not an absolute path"),
    ("/", r"a mount cannot cover '/'"),
    ("/proc", r"'/proc' is inside a kernel filesystem"),
    ("/proc/sys", r"'/proc/sys' is inside a kernel filesystem"),
    ("/sys", r"'/sys' is inside a kernel filesystem"),
    ("/dev", r"'/dev' is inside a kernel filesystem"),
    ("/dev/shm", r"'/dev/shm' is inside a kernel filesystem"),
    ("/etc/../proc", r"'/etc/\.\./proc' contains '\.\.'"),
    ("/data:rw", r"contains ':' or ','"),
    ("/data,readonly=false", r"contains ':' or ','"),
    ("/da\0ta", r"contains a NUL byte"),
]


@pytest.mark.parametrize(("target", "reason"), BAD_TARGETS, ids=[t for t, _ in BAD_TARGETS])
def test_t07_bad_mount_destinations_are_refused(
    backend, backend_settings, mount_root, target, reason
):
    for kind, extra in (("bind", {"source": str(mount_root)}), ("tmpfs", {})):
        mount = {"type": kind, "target": target, **extra}
        error = refused(backend, backend_settings, corral.ConfigError, reason, mounts=[mount])
        assert error.path == "sandbox.mounts[0].target"


@ENGINES_ONLY
@pytest.mark.through_ray
def test_t07_a_destination_that_is_a_symlink_in_the_image_is_refused(
    api_backend, backend_settings, mount_root
):
    # The test image's /etc/mtab links into /proc: the runtime must not follow it there.
    (mount_root / "mtab").write_text("fake\n")
    error = refused(
        api_backend,
        backend_settings,
        corral.SandboxError,
        r"/etc/mtab",
        mounts=[corral.Mount(str(mount_root / "mtab"), "/etc/mtab")],
    )
    assert "inside /proc" in str(error)


@pytest.mark.through_ray
def test_t07_twin_ordinary_destinations_work(sandbox, mount_root):
    (mount_root / "f").write_text("bound\n")
    sb = sandbox(mounts=[corral.Mount(str(mount_root), "/srv/data/"), corral.Tmpfs("/scratch")])
    assert sb.exec(["cat", "/srv/data/f"]).text == "bound\n"
    assert sb.exec(["sh", "-c", "echo x > /scratch/y && cat /scratch/y"]).text == "x\n"


# -- T09: malformed environment variables -----------------------------------------------

BAD_ENV = [
    ({"A=B": "1"}, "sandbox.env", r"'A=B' is not a valid variable name"),
    ({"": "1"}, "sandbox.env", r"'' is not a valid variable name"),
    ({"1ABC": "1"}, "sandbox.env", r"'1ABC' is not a valid variable name"),
    ({"A\0B": "1"}, "sandbox.env", r"'A\\x00B' is not a valid variable name"),
    ({"A B": "1"}, "sandbox.env", r"'A B' is not a valid variable name"),
    ({"A": "x\0y"}, "sandbox.env.A", r"contains a NUL byte"),
]


@pytest.mark.parametrize(("env", "field", "reason"), BAD_ENV, ids=[repr(e) for e, _, _ in BAD_ENV])
def test_t09_malformed_env_is_refused_at_create_and_exec(
    backend, backend_settings, sandbox, env, field, reason
):
    error = refused(backend, backend_settings, corral.ConfigError, reason, env=env)
    assert error.path == field
    sb = sandbox()
    with pytest.raises(corral.ConfigError, match=reason) as caught:
        sb.exec(["touch", "ran"], env=env)
    assert caught.value.path == field.removeprefix("sandbox.")
    assert sb.exec(["ls", "ran"]).exit_code != 0, "the refused command ran anyway"


def test_t09_twin_values_with_shell_and_equals_signs_arrive_intact(sandbox):
    value = "x=y; $(id) `id` 'q' \"dq\" \\ é"
    sb = sandbox(env={"GOOD_1": value})
    show = ["sh", "-c", 'printf %s "$GOOD_1"']
    assert sb.exec(show).text == value
    assert sb.exec(show, env={"GOOD_1": value + "!"}).text == value + "!"


# -- T11: controls that cannot be enforced fail closed ---------------------------------

UNENFORCEABLE = [
    ({"disk": "1g"}, Capability.DISK_LIMIT, "sandbox.limits.disk"),
    ({"security": {"apparmor": "docker-default"}}, Capability.APPARMOR,
     "sandbox.security.apparmor"),
    ({"security": {"selinux_label": "level:s0:c1"}}, Capability.SELINUX,
     "sandbox.security.selinux_label"),
]  # fmt: skip


@pytest.mark.through_ray
@pytest.mark.parametrize(
    ("keywords", "capability", "field"), UNENFORCEABLE, ids=[f for _, _, f in UNENFORCEABLE]
)
def test_t11_a_control_the_backend_cannot_enforce_is_refused(
    api_backend, backend_settings, keywords, capability, field
):
    if capability in _capabilities(api_backend, backend_settings):
        with corral.create(backend=api_backend, settings=backend_settings, **keywords) as sb:
            assert sb.exec(["true"]).ok  # enforced here: the case is the twin
        return
    error = refused(
        api_backend,
        backend_settings,
        corral.CapabilityError,
        rf"{re.escape(field)} needs {capability.name}",
        **keywords,
    )
    assert error.backend == api_backend


@ONLY_LOCAL
def test_t11_local_without_bubblewrap_refuses_rather_than_run_unsandboxed(
    backend, backend_settings, shared_tmp
):
    table = {**backend_settings.backends["local"], "bwrap": str(shared_tmp / "no-bwrap")}
    settings = attrs.evolve(backend_settings, backends={"local": table})
    refused(
        backend,
        settings,
        corral.CapabilityError,
        r"sandbox\.security\.isolate = true needs "
        r"ISOLATION.*bubblewrap",
    )


@ONLY_LOCAL
def test_t11_local_without_cgroups_refuses_the_pids_limit(backend, backend_settings):
    table = {**backend_settings.backends["local"], "cgroups": False}
    settings = attrs.evolve(backend_settings, backends={"local": table})
    refused(backend, settings, corral.CapabilityError, r"sandbox\.limits\.pids needs PIDS_LIMIT")


@pytest.mark.through_ray
def test_t11_twin_what_the_backend_enforces_runs(sandbox):
    assert sandbox(pids=32, memory="64MiB").exec(["true"]).ok


# -- T12: a string where argv is expected ---------------------------------------------


def test_t12_a_string_command_is_refused_with_no_implicit_shell(backend, backend_settings, sandbox):
    refused(
        backend,
        backend_settings,
        corral.ConfigError,
        r"^sandbox\.command: a command must be a list",
        command="sleep 60 ; echo hi",
    )
    sb = sandbox()
    for command in ("touch ran ; echo hi", b"touch ran"):
        with pytest.raises(corral.ConfigError, match=r"^argv: a command must be a list") as caught:
            sb.exec(command)  # type: ignore[arg-type]
        assert "no implicit shell" in str(caught.value)
    assert sb.exec(["ls", "ran"]).exit_code != 0, "the string ran through a shell"


def test_t12_twin_an_explicit_shell_inside_the_sandbox_works(sandbox):
    sb = sandbox()
    assert sb.exec(("sh", "-c", "echo hi; echo there")).text == "hi\nthere\n"


@ENGINES_ONLY
@pytest.mark.through_ray
def test_a_pids_limit_too_small_for_the_engine_is_refused(api_backend, backend_settings, sandbox):
    # The engine's exec helpers count against the limit: under 16, commands fail to
    # start at random, so the limit is refused up front, naming the field.
    refused(
        api_backend,
        backend_settings,
        corral.ConfigError,
        r"sandbox\.limits\.pids.*below 16",
        pids=8,
    )
    # The twin: the least allowed works, exec after exec.
    sb = sandbox(pids=16, memory="64MiB")
    assert all(sb.exec(["sh", "-c", "echo ok"]).text == "ok\n" for _ in range(10))
