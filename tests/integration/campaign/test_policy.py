"""Issue 6 "Policy" and THREATS.md T04: every loosening is refused unless opted into by
name, an opt-in is recorded on the sandbox, and there is no raw pass-through.

Per backend: without ``security.allow_unsafe`` each unsafe option is a PolicyError
naming its field and nothing is created; with it, the option is applied where the
backend can enforce it (proven from inside the sandbox), refused as a CapabilityError
where it cannot (fail closed), and recorded in the ``corral.loosened`` label that
``corral.attach`` and ``corral.list`` show. Options corral has no typed field for
(privileged, host namespaces, devices, security_opt, runtime configs) cannot be
expressed at all: an unknown setting, never passed on.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import attrs
import pytest
from cases import refused

import corral
from corral.core.backend import Capability
from corral.core.plugins import get_host
from corral.core.spec import UNSAFE_OPTIONS

CAP_SYS_ADMIN = 1 << 21
ENGINES = ("docker", "podman")


def _status(sb: corral.Sandbox, user: str | None = None) -> dict[str, str]:
    """The sandbox process's own view of its privileges, from /proc/self/status."""
    result = sb.exec(["cat", "/proc/self/status"], user=user)
    assert result.exit_code == 0, result.stderr_text
    return dict(line.split(":\t", 1) for line in result.text.splitlines() if ":\t" in line)


def _engine_labels(raw_client_of, backend: str, sandbox_id: str) -> dict[str, str]:
    client = raw_client_of(backend)
    try:
        return client.inspect_container(f"corral-{sandbox_id}")["Config"]["Labels"]
    finally:
        client.close()


@pytest.fixture
def allow_all_profile(shared_tmp: Path) -> str:
    """A seccomp profile that filters nothing: the default profile turned off in disguise."""
    path = shared_tmp / "allow-all.json"
    path.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW"}))
    return str(path)


# Each unsafe option: its allow_unsafe name, the security settings that use it, the
# field the refusal must name, and the capability a backend needs to apply it.
LOOSENINGS = [
    ("cap_add", {"cap_add": ["SYS_ADMIN"]}, "cap_add", Capability.CAP_ADD),
    ("no_new_privileges", {"no_new_privileges": False}, "no_new_privileges", None),
    ("seccomp", {"seccomp": "unconfined"}, "seccomp", Capability.SECCOMP),
    ("seccomp", {"seccomp": "ALLOW_ALL_PROFILE"}, "seccomp", Capability.SECCOMP),
    ("apparmor", {"apparmor": "unconfined"}, "apparmor", Capability.APPARMOR),
    ("selinux", {"selinux_label": "disable"}, "selinux_label", Capability.SELINUX),
    ("isolate", {"isolate": False}, "isolate", None),
    ("read_only_root", {"read_only_root": False}, "read_only_root", None),
    ("selinux", {"selinux_label": "type:spc_t"}, "selinux_label", Capability.SELINUX),
]
IDS = [f"{name}-{next(iter(loosening.values()))}" for name, loosening, _, _ in LOOSENINGS]
IDS[3] = "seccomp-allow-all-profile"


def _security(loosening: dict, profile: str, **extra: object) -> dict:
    out = {k: profile if v == "ALLOW_ALL_PROFILE" else v for k, v in loosening.items()}
    return {**out, **extra}


@pytest.mark.through_ray
@pytest.mark.parametrize(("name", "loosening", "field", "capability"), LOOSENINGS, ids=IDS)
def test_each_loosening_is_refused_without_its_opt_in(
    api_backend, backend_settings, allow_all_profile, name, loosening, field, capability
):
    security = _security(loosening, allow_all_profile)
    message = rf"^sandbox\.security\.{field}: .*add '{name}' to sandbox\.security\.allow_unsafe"
    refused(api_backend, backend_settings, corral.PolicyError, message, security=security)
    # Opting into another option does not open this one.
    other = "cap_add" if name != "cap_add" else "isolate"
    refused(
        api_backend,
        backend_settings,
        corral.PolicyError,
        message,
        security={**security, "allow_unsafe": [other]},
    )


def _expect_applied(backend: str, name: str, loosening: dict, sb: corral.Sandbox) -> None:
    """Prove from inside the sandbox that the opted-in loosening took effect (or, where
    a backend is stricter than asked, that it stayed safe)."""
    status = _status(sb)
    if name == "cap_add":
        # Within reach (Podman also makes it effective for the sandbox user; Docker
        # leaves a non-root container's execs only the bounding set).
        assert int(status["CapBnd"], 16) == CAP_SYS_ADMIN
    elif name == "no_new_privileges":
        # bubblewrap always sets no_new_privs: stricter than asked, never looser.
        assert status["NoNewPrivs"].strip() == ("1" if backend == "local" else "0")
    elif name == "seccomp" and loosening["seccomp"] == "unconfined":
        assert status["Seccomp"].strip() == "0"
    elif name == "seccomp":  # the allow-all profile: filtered by nothing
        result = sb.exec(["unshare", "-U", "true"])
        assert result.exit_code == 0, result.stderr_text
    elif name == "read_only_root":
        root = sb.exec(["awk", '$5 == "/" { print $6 }', "/proc/self/mountinfo"]).text
        assert root.split(",")[0] == "rw", root
    elif name == "isolate":
        pid_ns = sb.exec(["readlink", "/proc/self/ns/pid"]).text.strip()
        host_ns = os.readlink("/proc/self/ns/pid")
        # Only the local backend can run without isolation; the engines always isolate.
        assert (pid_ns == host_ns) is (backend == "local")


@pytest.mark.through_ray
@pytest.mark.parametrize(("name", "loosening", "field", "capability"), LOOSENINGS, ids=IDS)
def test_an_opt_in_is_applied_where_enforceable_and_recorded(
    kind,
    api_backend,
    backend_settings,
    allow_all_profile,
    raw_client_of,
    name,
    loosening,
    field,
    capability,
):
    security = _security(loosening, allow_all_profile, allow_unsafe=[name])
    have = get_host().backend(api_backend, backend_settings).capabilities()
    if capability is not None and capability not in have:
        refused(
            api_backend,
            backend_settings,
            corral.CapabilityError,
            rf"sandbox\.security\.{field} needs {capability.name}",
            security=security,
        )
        return
    with corral.create(
        backend=api_backend, settings=backend_settings, lifetime="5m", security=security
    ) as sb:
        assert sb.labels["corral.loosened"] == name
        _expect_applied(kind, name, loosening, sb)
        again = corral.attach(sb.id, backend=api_backend, settings=backend_settings)
        assert again.labels["corral.loosened"] == name
        assert again.spec.security.allow_unsafe == (name,)
        again.detach()
        listed = [
            i for i in corral.list(backend=api_backend, settings=backend_settings) if i.id == sb.id
        ]
        assert [i.labels.get("corral.loosened") for i in listed] == [name]
        if kind in ENGINES:
            assert _engine_labels(raw_client_of, kind, sb.id)["corral.loosened"] == name


@pytest.mark.through_ray
def test_a_sensitive_mount_needs_its_opt_in_and_is_recorded(
    api_backend, backend_settings, mount_root, monkeypatch
):
    home = mount_root / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text("example\n")
    monkeypatch.setenv("HOME", str(home))
    mounts = [corral.Mount("~/.ssh", "/keys")]
    refused(
        api_backend,
        backend_settings,
        corral.PolicyError,
        r"^sandbox\.mounts\[0\]\.source: .* holds credentials; .*'sensitive_mounts'",
        mounts=mounts,
    )
    with corral.create(
        backend=api_backend,
        settings=backend_settings,
        lifetime="5m",
        mounts=mounts,
        security={"allow_unsafe": ["sensitive_mounts"]},
    ) as sb:
        assert sb.exec(["cat", "/keys/known_hosts"]).text == "example\n"
        assert sb.labels["corral.loosened"] == "sensitive_mounts"
        again = corral.attach(sb.id, backend=api_backend, settings=backend_settings)
        assert again.labels["corral.loosened"] == "sensitive_mounts"
        again.detach()


@pytest.mark.through_ray
def test_twin_an_unused_opt_in_loosens_nothing_and_records_nothing(sandbox):
    sb = sandbox(security={"allow_unsafe": ["cap_add", "seccomp"]})
    status = _status(sb)
    assert (int(status["CapEff"], 16), int(status["CapBnd"], 16)) == (0, 0)
    assert status["NoNewPrivs"].strip() == "1"
    assert "corral.loosened" not in sb.labels


@pytest.mark.through_ray
def test_t04_the_default_sandbox_is_locked_down(kind, sandbox, raw_client_of):
    sb = sandbox()
    status = _status(sb)
    assert (int(status["CapEff"], 16), int(status["CapBnd"], 16)) == (0, 0)
    assert status["NoNewPrivs"].strip() == "1"
    assert sb.exec(["readlink", "/proc/self/ns/pid"]).text.strip() != os.readlink(
        "/proc/self/ns/pid"
    )
    interfaces = sb.exec(["cat", "/proc/net/dev"]).text.splitlines()[2:]
    assert [line.split(":")[0].strip() for line in interfaces] == ["lo"]
    assert "corral.loosened" not in sb.labels
    if kind not in ENGINES:
        return
    assert status["Seccomp"].strip() == "2"  # the engine's default profile
    client = raw_client_of(kind)
    try:
        inspect = client.inspect_container(f"corral-{sb.id}")
    finally:
        client.close()
    host = inspect["HostConfig"]
    # The CIS section 5 predicates, as docker-bench reads them.
    assert host["Privileged"] is False
    assert host["ReadonlyRootfs"] is True
    for namespace in ("PidMode", "IpcMode", "UTSMode", "UsernsMode"):
        assert host.get(namespace) != "host", namespace
    assert host["NetworkMode"] in ("none", "") or inspect["Config"].get("NetworkDisabled")
    assert not host.get("Devices")
    assert any(o.startswith("no-new-privileges") for o in host.get("SecurityOpt") or [])
    assert not any("unconfined" in o for o in host.get("SecurityOpt") or [])
    assert host["PidsLimit"] and host["PidsLimit"] > 0
    assert host["Memory"] > 0 and host["MemorySwap"] == host["Memory"]


# -- no raw pass-through ---------------------------------------------------------------

PASS_THROUGH_KEYWORDS = [
    "privileged",
    "runtime_config",
    "host_config",
    "cap_add",
    "security_opt",
    "network_mode",
    "pid_mode",
    "devices",
]


def test_t04_create_has_no_pass_through_keywords(backend, backend_settings):
    for keyword in PASS_THROUGH_KEYWORDS:
        with pytest.raises(TypeError, match=rf"unexpected keyword argument '{keyword}'"):
            corral.create(backend=backend, settings=backend_settings, **{keyword: True})


PASS_THROUGH_SECURITY = [
    {"privileged": True},
    {"security_opt": ["seccomp=unconfined"]},
    {"runtime_config": {"privileged": True}},
    {"pid_mode": "host"},
    {"ipc_mode": "host"},
    {"network_mode": "host"},
    {"userns_mode": "host"},
    {"uts_mode": "host"},
    {"devices": ["/dev/sda"]},
]


@pytest.mark.parametrize("security", PASS_THROUGH_SECURITY, ids=lambda s: next(iter(s)))
def test_t04_security_has_no_untyped_options(backend, backend_settings, security):
    key = next(iter(security))
    refused(
        backend,
        backend_settings,
        corral.ConfigError,
        rf"^sandbox\.security\.{key}: unknown setting",
        security={**security, "allow_unsafe": list(UNSAFE_OPTIONS)},
    )


def test_t04_host_network_and_spec_level_engine_options_are_refused(backend, backend_settings):
    refused(
        backend,
        backend_settings,
        corral.ConfigError,
        r"^sandbox\.network\.mode: 'host' is not one of: none, bridge",
        network="host",
    )
    for table in ({"host_config": {"Privileged": True}}, {"privileged": True}):
        key = next(iter(table))
        with pytest.raises(corral.ConfigError, match=rf"sandbox\.{key}: unknown setting"):
            corral.create(
                backend=backend, settings=attrs.evolve(backend_settings, sandbox=table)
            ).close()


@pytest.mark.through_ray
def test_t04_backend_settings_have_no_pass_through(api_backend, backend_settings):
    for option in ("privileged", "host_config", "create_options", "security_opt"):
        table = {**backend_settings.backends[api_backend], option: True}
        settings = attrs.evolve(backend_settings, backends={api_backend: table})
        with pytest.raises(
            corral.ConfigError, match=rf"^backends\.{api_backend}\.{option}: unknown setting"
        ):
            corral.create(backend=api_backend, settings=settings).close()


def test_the_record_cannot_be_forged_or_removed_through_labels(backend, backend_settings):
    for labels in ({"corral.loosened": ""}, {"corral.managed": "false"}):
        key = next(iter(labels))
        refused_labels = {**labels, "campaign.case": uuid.uuid4().hex}
        with pytest.raises(
            corral.ConfigError, match=rf"^sandbox\.labels: '{re.escape(key)}': the 'corral\.'"
        ):
            corral.create(backend=backend, settings=backend_settings, labels=refused_labels)
