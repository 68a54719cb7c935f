"""Verification: refuse a container the engine did not configure as planned."""

from __future__ import annotations

from typing import Any

from ...core.errors import PolicyError
from .. import sweep
from .plan import TIMER_TARGET, ContainerPlan


def verify(plan_: ContainerPlan, inspect: dict[str, Any]) -> None:
    """Refuse a container the engine did not configure as asked (inspect after create)."""
    hc = inspect.get("HostConfig") or {}
    problems = []

    def expect(field: str, ok: bool, wanted: object) -> None:
        if not ok:
            problems.append(f"{field} is {hc.get(field)!r}, wanted {wanted!r}")

    expect("Privileged", hc.get("Privileged") is False, False)
    expect("ReadonlyRootfs", bool(hc.get("ReadonlyRootfs")) == plan_.read_only, plan_.read_only)
    # Docker reports CapDrop ["ALL"]; Podman lists the dropped capabilities and the
    # effective set it left, which must be exactly what was added.
    dropped_all = "ALL" in [c.upper() for c in hc.get("CapDrop") or []]
    if "EffectiveCaps" in inspect:
        effective = sorted(c.upper().removeprefix("CAP_") for c in inspect["EffectiveCaps"] or [])
        dropped_all = effective == sorted(c.upper().removeprefix("CAP_") for c in plan_.cap_add)
    expect("CapDrop", dropped_all, ["ALL"])
    if "EffectiveCaps" not in inspect:  # Podman leaves CapAdd empty; checked just above
        added = sorted(c.upper().removeprefix("CAP_") for c in hc.get("CapAdd") or [])
        wanted = sorted(c.upper().removeprefix("CAP_") for c in plan_.cap_add)
        expect("CapAdd", added == wanted, plan_.cap_add)
    opts = hc.get("SecurityOpt") or []
    if "no-new-privileges" in plan_.security_opt:
        expect(
            "SecurityOpt", any(o.startswith("no-new-privileges") for o in opts), "no-new-privileges"
        )
    expect("Memory", hc.get("Memory") == plan_.memory, plan_.memory)
    expect("MemorySwap", hc.get("MemorySwap") == plan_.memory, plan_.memory)
    expect("PidsLimit", hc.get("PidsLimit") == plan_.pids, plan_.pids)
    adj = sweep.EXEC_OOM_SCORE_ADJ  # every process's; the keep-alive's is lowered later
    expect("OomScoreAdj", hc.get("OomScoreAdj") == adj, adj)
    if plan_.nano_cpus is not None:
        expect("NanoCpus", hc.get("NanoCpus") == plan_.nano_cpus, plan_.nano_cpus)
    if plan_.network == "none":
        mode = hc.get("NetworkMode")
        expect(
            "NetworkMode",
            mode in ("none", "", None) or inspect.get("Config", {}).get("NetworkDisabled"),
            "none",
        )
    if plan_.network_name is not None:
        # On its own network and no other (the engine's default bridge joins every
        # bridged container to every other).
        joined = sorted((inspect.get("NetworkSettings") or {}).get("Networks") or {})
        if joined != [plan_.network_name]:
            problems.append(f"networks are {joined!r}, wanted [{plan_.network_name!r}]")
    for ns in ("PidMode", "IpcMode", "UTSMode", "UsernsMode"):
        expect(ns, hc.get(ns) != "host", "not host")
    expect("Devices", not hc.get("Devices"), [])
    limits = {u["Name"].lower().removeprefix("rlimit_"): u for u in hc.get("Ulimits") or []}
    expect("Ulimits", limits.get("nofile", {}).get("Hard") == plan_.ulimits["nofile"][1], "nofile")
    if hc.get("MaskedPaths") is not None:  # Docker reports them; Podman does not
        missing = set(plan_.masked_paths) - set(hc["MaskedPaths"])
        expect("MaskedPaths", not missing, sorted(missing))
    mounts = {m.get("Destination"): m for m in inspect.get("Mounts") or []}
    for bind in plan_.binds:
        found = mounts.get(bind.target)
        if found is None or bool(found.get("RW")) == bind.read_only:
            problems.append(f"mount {bind.target} is {found!r}, wanted read_only={bind.read_only}")
    bindings = hc.get("PortBindings") or {}
    for port in plan_.ports:
        # Published beyond the host's loopback, any host that reaches it reaches in.
        hosts = [b.get("HostIp") for b in bindings.get(f"{port}/tcp") or []]
        if not hosts or any(h != "127.0.0.1" for h in hosts):
            problems.append(f"port {port} is published on {hosts!r}, wanted ['127.0.0.1']")
    if plan_.lifetime_folder is not None:
        # Writable, the sandbox could move its own end.
        found = mounts.get(TIMER_TARGET)
        if found is None or found.get("RW"):
            problems.append(f"mount {TIMER_TARGET} is {found!r}, wanted read_only=True")
    if problems:
        raise PolicyError("the engine did not apply the sandbox's settings: " + "; ".join(problems))
