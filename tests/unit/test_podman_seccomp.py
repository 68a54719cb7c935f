"""corral's default seccomp profile on Podman, derived from Podman's own."""

from corral.backends.podman_seccomp import _tightened

PODMAN_LIKE = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "syscalls": [
        {"names": ["read", "unshare", "keyctl", "clone", "setns"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["mount"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
    ],
}


def _allowed_to_anyone(profile: dict) -> set[str]:
    return {
        name
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("includes") and not rule.get("args")
        for name in rule["names"]
    }


def test_nesting_syscalls_are_kept_for_cap_sys_admin_only():
    tight = _tightened(PODMAN_LIKE)
    anyone = _allowed_to_anyone(tight)
    assert "read" in anyone  # the harmless twin: everything else is untouched
    assert anyone.isdisjoint({"unshare", "keyctl", "clone", "setns", "mount"})
    admin = [r for r in tight["syscalls"] if r.get("includes") == {"caps": ["CAP_SYS_ADMIN"]}]
    assert {"unshare", "keyctl", "mount", "bpf"} <= {n for r in admin for n in r["names"]}
    (clone,) = [r for r in tight["syscalls"] if r["names"] == ["clone"]]
    assert clone["args"][0]["op"] == "SCMP_CMP_MASKED_EQ" and clone["args"][0]["valueTwo"] == 0
    assert clone["args"][0]["value"] & 0x10000000  # CLONE_NEWUSER is in the forbidden mask
    assert tight["defaultAction"] == PODMAN_LIKE["defaultAction"]
