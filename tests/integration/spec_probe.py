"""Random sandbox specs, a probe that reads back what a sandbox really is, and the oracle.

``specs(backend)`` draws a ``Drawn``: an abstract spec (mount sources are made per
example by ``Drawn.materialise``). ``probe_script`` is one ``sh -c`` script that prints
what the sandbox is (ids, working folder, environment digests, what each mount shows
and lets write, mount table, rlimits, cgroup limits, network devices);
``check_probe`` compares that with the final spec corral made the sandbox from.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import attrs
from hypothesis import strategies as st

import corral
from corral.core.spec import Limits, Network, SandboxSpec, Security

# The kernel's limit on one argv or environment string, its NUL included (MAX_ARG_STRLEN).
MAX_ARG_STRLEN = 32 * 4096
PAGE = 4096
UNLIMITED = 2**62  # cgroup v1 writes "no limit" as a huge number near 2**63
PROBE_TIMEOUT = 120

# Top-level mount targets: the default workdir, /tmp (which corral fills with a tmpfs of
# its own), folders the image has or lacks, one with a space, one under read-only /etc.
TOP_TARGETS = ("/workspace", "/data", "/srv/job", "/tmp", "/mnt/with space", "/etc/corral")
# Below another mount: "sub" exists in every bind source; "inner" exists nowhere.
NESTED = ("sub", "inner")
USERS = (
    "1000:1000",
    "0:0",
    "0:1000",
    "1000:0",
    "65534:65534",
    "1234:5678",
    "4242",
    "2147483646:2147483646",
    "root",
    "root:root",
    "nobody",
    "1000:nogroup",
)
# The only user and group the test image (busybox) names in /etc/passwd and /etc/group.
IMAGE_NAMES = ("root",)
# Working folders besides the mount targets: the default, /tmp, the root, and folders
# the image lacks.
WORKDIRS = ("/workspace", "/tmp", "/", "/srv/work", "/home/sb/project")
BAD_ENV_NAMES = ("1CP", "CP-X", "CP X", "", "CP=X", "ÇP", "CP.X")


# -- the drawn spec ------------------------------------------------------------------------


@dataclass(frozen=True)
class DrawnMount:
    kind: str  # "dir" or "file" (binds), "tmpfs", "volume"
    target: str
    read_only: bool = True
    size: int = 0  # tmpfs
    mode: int = 0o1777  # tmpfs
    exec: bool = False  # tmpfs


@dataclass(frozen=True)
class Drawn:
    """One spec as drawn: what ``corral.create`` is given, sources not made yet."""

    mounts: tuple[DrawnMount, ...]
    workdir: str | None
    user: str | None
    env: tuple[tuple[str, str], ...]
    limits: tuple[tuple[str, Any], ...]
    network: str | None
    read_only_root: bool | None
    allow_unsafe: tuple[str, ...]

    def __repr__(self) -> str:  # hypothesis prints this as the falsifying example
        env = {k: (v if len(v) <= 40 else f"<{len(v)} chars>") for k, v in self.env}
        parts = [f"mounts={list(self.mounts)!r}"] if self.mounts else []
        for name in ("workdir", "user", "network", "read_only_root"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={getattr(self, name)!r}")
        if env:
            parts.append(f"env={env!r}")
        if self.limits:
            parts.append(f"limits={dict(self.limits)!r}")
        if self.allow_unsafe:
            parts.append(f"allow_unsafe={self.allow_unsafe!r}")
        return f"Drawn({', '.join(parts)})"

    def materialise(self, root: Path, token: str) -> Made:
        """Host sources for the binds (under ``root``, readable and writable by anyone),
        and the keywords for ``corral.create``."""
        root.mkdir(mode=0o755)
        os.chmod(root, 0o755)
        mounts: list[object] = []
        sources: dict[int, Path] = {}
        volumes: list[str] = []
        for i, m in enumerate(self.mounts):
            if m.kind == "dir":
                src = root / f"m{i}"
                (src / "sub").mkdir(parents=True)
                (src / f"marker{i}").write_text(f"mount {i} of {token}")
                for p in (src, src / "sub"):
                    os.chmod(p, 0o777)
                sources[i] = src
                mounts.append(corral.Mount(str(src), m.target, read_only=m.read_only))
            elif m.kind == "file":
                src = root / f"f{i}.txt"
                src.write_text(f"file {i} of {token}")
                os.chmod(src, 0o666)
                sources[i] = src
                mounts.append(corral.Mount(str(src), m.target, read_only=m.read_only))
            elif m.kind == "tmpfs":
                mounts.append(corral.Tmpfs(m.target, size=m.size, mode=m.mode, exec=m.exec))
            else:
                name = f"corralprop-{token}-{i}"
                volumes.append(name)
                mounts.append(corral.Volume(name, m.target, read_only=m.read_only))
        keywords: dict[str, Any] = {"labels": {"corralprop": token}, **dict(self.limits)}
        if mounts:
            keywords["mounts"] = mounts
        for name in ("workdir", "user", "network"):
            if getattr(self, name) is not None:
                keywords[name] = getattr(self, name)
        if self.env:
            keywords["env"] = dict(self.env)
        security: dict[str, Any] = {}
        if self.read_only_root is not None:
            security["read_only_root"] = self.read_only_root
        if self.allow_unsafe:
            security["allow_unsafe"] = list(self.allow_unsafe)
        if security:
            keywords["security"] = security
        return Made(self, token, keywords, sources, volumes)

    def must_refuse(self, backend: str) -> list[str]:
        """What no backend may accept: each reason names the part of the spec."""
        reasons = []
        for name, value in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                reasons.append(f"env name {name!r} is invalid")
            elif len(name.encode()) + len(value.encode()) + 2 > MAX_ARG_STRLEN:
                reasons.append(f"env {name} is longer than the kernel takes")
        total = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in self.env)
        if total > 2 * 1024**2:
            reasons.append(f"the environment ({total} bytes) is over ARG_MAX")
        if self.read_only_root is False and "read_only_root" not in self.allow_unsafe:
            reasons.append("a writable root without 'read_only_root' allowed")
        rw = any(m.kind in ("dir", "file") and not m.read_only for m in self.mounts)
        if rw and "unbounded_rw_mounts" not in self.allow_unsafe:
            reasons.append("a read-write bind without 'unbounded_rw_mounts' allowed")
        for part in (self.user or "").split(":"):
            if not part.isdigit() and part and part not in IMAGE_NAMES:
                reasons.append(f"user {self.user!r}: the image has no {part!r}")
        if backend == "local" and any(m.kind == "volume" for m in self.mounts):
            reasons.append("volumes on the local backend")
        if dict(self.limits).get("disk") is not None:
            reasons.append("no built-in backend enforces limits.disk")
        return reasons


@dataclass
class Made:
    drawn: Drawn
    token: str
    keywords: dict[str, Any]
    sources: dict[int, Path]  # mount index -> host source
    volumes: list[str]  # named volumes asked for (the test removes them)


# -- strategies ----------------------------------------------------------------------------


@st.composite
def _mounts(draw: st.DrawFn, backend: str) -> tuple[DrawnMount, ...]:
    kinds = ["dir", "file", "tmpfs"] + (["volume"] if backend != "local" else [])
    count = draw(st.integers(0, 4))
    mounts: list[DrawnMount] = []
    for _ in range(count):
        kind = draw(st.sampled_from(kinds))
        folders = [m.target for m in mounts if m.kind != "file"]
        if folders and draw(st.booleans()):
            target = f"{draw(st.sampled_from(folders))}/{draw(st.sampled_from(NESTED))}"
        else:
            target = draw(st.sampled_from(TOP_TARGETS))
        if kind == "file":
            target += "/note.txt" if target in ("/workspace", "/tmp") else ".txt"
        if target in [m.target for m in mounts]:
            continue  # two mounts on one target are refused by the spec's own unit tests
        if kind == "tmpfs":
            size = draw(st.sampled_from([64 * 1024**2, 4096, 1024**2 + 1, 300 * 1024**2]))
            mode = draw(st.sampled_from([0o1777, 0o755, 0o700, 0o777]))
            mounts.append(DrawnMount("tmpfs", target, False, size, mode, draw(st.booleans())))
        else:
            mounts.append(DrawnMount(kind, target, draw(st.booleans())))
    # Any order: a nested mount listed before the mount it lies in included.
    return tuple(draw(st.permutations(mounts)))


def _env_value(name: str) -> st.SearchStrategy[str]:
    edge = MAX_ARG_STRLEN - len(name.encode()) - 2  # the longest "NAME=value\0" the kernel takes
    text = st.text(
        st.characters(codec="utf-8", exclude_characters="\0", exclude_categories=("Cs",)),
        max_size=40,
    )
    sized = st.sampled_from([64 * 1024, edge, edge + 1, 200 * 1024]).map(lambda n: "v" * n)
    return st.one_of(text, text, text, sized)  # one value in four is big


@st.composite
def _env(draw: st.DrawFn) -> tuple[tuple[str, str], ...]:
    # Prefixed, so that no name the probe's shell needs (PATH, HOME) is replaced.
    valid = st.builds(
        lambda prefix, rest: prefix + rest,
        st.sampled_from(["CP_", "cp_", "_CP"]),
        st.from_regex(r"[A-Za-z0-9_]{0,8}", fullmatch=True),
    )
    names = draw(st.lists(valid, max_size=3, unique=True))
    if draw(st.sampled_from([False] * 9 + [True])):  # rarely, one bad name
        names.append(draw(st.sampled_from(BAD_ENV_NAMES)))
    env = [(name, draw(_env_value(name))) for name in names]
    # Rarely, many big values: each under the per-string limit, together over ARG_MAX.
    if draw(st.sampled_from([False] * 9 + [True])):
        env += [(f"CP_BULK{i}", "b" * 120 * 1024) for i in range(20)]
    return tuple(env)


_LIMIT_CHOICES: dict[str, list[Any]] = {
    "memory": ["64MiB", "96m", 300 * 1024**2, "1GiB", 16 * 1024**2 + 12345],
    "pids": [64, 100, 1000, 20],
    "nofile": [64, 4096, 20000, 65536],
    "nproc": [4096, 65536, 2048],
    "cpus": [0.5, 1, 1.25, 2, 3],
    "cputime": [30, "2m", 1.5],
    "file_size": ["1MiB", 12345, "2g"],
    "lifetime": ["10m"],
    "disk": ["100MiB"],
}


@st.composite
def _limits(draw: st.DrawFn) -> tuple[tuple[str, Any], ...]:
    chosen = []
    for name, choices in _LIMIT_CHOICES.items():
        # Most examples leave a limit at its default; disk (refused everywhere) is rare.
        weight = 8 if name == "disk" else 2
        value = draw(st.sampled_from([None] * weight + choices))
        if value is not None:
            chosen.append((name, value))
    return tuple(chosen)


@st.composite
def specs(draw: st.DrawFn, backend: str) -> Drawn:
    mounts = draw(_mounts(backend))
    targets = [m.target for m in mounts]
    dirs = [m.target for m in mounts if m.kind == "dir"]
    workdirs = list(WORKDIRS)
    workdirs += [t for t in targets if not t.endswith(".txt")] + [f"{t}/sub" for t in dirs]
    workdir = draw(st.sampled_from([None, *workdirs]))
    rw_binds = any(m.kind in ("dir", "file") and not m.read_only for m in mounts)
    read_only_root = draw(st.sampled_from([None, True, False]))
    allow: list[str] = []
    # Opted in nearly always, so that most examples get past the policy.
    if rw_binds and draw(st.sampled_from([True] * 5 + [False])):
        allow.append("unbounded_rw_mounts")
    if read_only_root is False and draw(st.sampled_from([True] * 5 + [False])):
        allow.append("read_only_root")
    return Drawn(
        mounts=mounts,
        workdir=workdir,
        user=draw(st.sampled_from([None, *USERS])),
        env=draw(_env()),
        limits=draw(_limits()),
        network=draw(st.sampled_from([None, "none", "bridge"])),
        read_only_root=read_only_root,
        allow_unsafe=tuple(allow),
    )


# -- refusals ------------------------------------------------------------------------------

_NESTED_MODELS = {"limits": Limits, "network": Network, "security": Security}


def named_fields(error: corral.SandboxError) -> list[str]:
    """The spec fields an error names: a ConfigError's paths, else ``sandbox.x.y`` in its
    message; only those that are fields of the spec model."""
    if isinstance(error, corral.ConfigError):
        paths = [p for p, _ in error.problems if p]
    else:
        paths = re.findall(r"\bsandbox\.[A-Za-z_][\w.\[\]]*", str(error))
    found = []
    for path in paths:
        parts = re.split(r"[.\[]", path.removeprefix("sandbox.").rstrip("."))
        top = {f.name for f in attrs.fields(SandboxSpec)}
        if parts[0] not in top:
            continue
        model = _NESTED_MODELS.get(parts[0])
        if model is not None and len(parts) > 1 and parts[1] not in attrs.fields_dict(model):
            continue
        found.append(path)
    return found


# -- the probe -----------------------------------------------------------------------------

_CGROUP_FILES = (
    "memory.max",
    "memory.limit_in_bytes",
    "pids.max",
    "cpu.max",
    "cpu.cfs_quota_us",
    "cpu.cfs_period_us",
)
_CGROUP_WALK = r"""
while IFS=: read -r _ controllers path; do
  for c in $(echo "${controllers:-unified}" | tr , ' '); do
    case $c in
      unified) base=/sys/fs/cgroup ;;
      memory|pids|cpu) base=/sys/fs/cgroup/$c ;;
      *) continue ;;
    esac
    d=$base${path%/}
    while :; do
      for f in FILES; do
        [ -r "$d/$f" ] && echo "$d/$f $(cat "$d/$f")"
      done
      [ "$d" = "$base" ] && break
      d=${d%/*}
      case $d in "$base"*) ;; *) d=$base ;; esac
    done
  done
done < /proc/self/cgroup
"""


def _writes(path: str, data: str = "") -> str:
    """Shell that prints yes when a file can be made (or appended to) at ``path``. Empty
    unless ``data``: a full filesystem (a one-page tmpfs) still takes an empty file."""
    write = (
        f"printf {shlex.quote(data)} >> {shlex.quote(path)}"
        if data
        else f": >> {shlex.quote(path)}"
    )
    return f"if ( {write} ) 2>/dev/null; then echo yes; else echo no; fi"


def probe_script(made: Made, spec: SandboxSpec) -> str:
    """One script printing ``key=value`` lines, then sections headed ``### name``."""
    t = made.token
    lines = [
        'p() { printf \'%s=%s\\n\' "$1" "$2"; }',
        'p uid "$(id -u)"',
        'p gid "$(id -g)"',
        'p user "$(id -un 2>/dev/null)"',
        'p group "$(id -gn 2>/dev/null)"',
        'p pwd "$(pwd)"',
        f'p workdir.write "$({_writes(f"./.probe-{t}")})"',
        f'p root.write "$({_writes(f"/.probe-{t}")})"',
    ]
    for name, _ in made.drawn.env:
        lines.append(f'p env.{name}.set "${{{name}+set}}"')
        lines.append(f'p env.{name}.md5 "$(printf %s "${{{name}}}" | md5sum | cut -d" " -f1)"')
    for i, m in enumerate(made.drawn.mounts):
        q = shlex.quote(m.target)
        if m.kind == "dir":
            lines.append(f'p mount.{i}.read "$(cat {q}/marker{i} 2>&1)"')
            lines.append(f'p mount.{i}.write "$({_writes(f"{m.target}/w-{t}")})"')
        elif m.kind == "file":
            lines.append(f'p mount.{i}.read "$(cat {q} 2>&1)"')
            lines.append(f'p mount.{i}.write "$({_writes(m.target, "+")})"')
        else:
            lines.append(f'p mount.{i}.stat "$(stat -c "%u %g %a" {q} 2>&1)"')
            lines.append(f'p mount.{i}.write "$({_writes(f"{m.target}/w-{t}")})"')
    for section, command in (
        ("mountinfo", "cat /proc/self/mountinfo"),
        ("limits", "cat /proc/self/limits"),
        ("netdev", "cat /proc/net/dev"),
        ("cgroup", _CGROUP_WALK.replace("FILES", " ".join(_CGROUP_FILES))),
    ):
        lines += [f"echo '### {section}'", command]
    return "\n".join(lines) + "\n"


@dataclass
class Probe:
    facts: dict[str, str] = field(default_factory=dict)
    sections: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Probe:
        probe = cls()
        current: list[str] | None = None
        for line in text.splitlines():
            if line.startswith("### "):
                current = probe.sections.setdefault(line[4:], [])
            elif current is not None:
                current.append(line)
            elif "=" in line:
                key, _, value = line.partition("=")
                probe.facts[key] = value
        return probe

    def mount_at(self, target: str) -> tuple[set[str], str, set[str]] | None:
        """(mount options, fs type, super options) of the topmost mount on ``target``."""
        found = None
        for line in self.sections.get("mountinfo", []):
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) < 6 or len(rest) < 3:
                continue
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == target:
                found = (set(fields[5].split(",")), rest[0], set(rest[2].split(",")))
        return found

    def rlimit(self, title: str) -> tuple[str, str] | None:
        for line in self.sections.get("limits", []):
            if line.startswith(title):
                soft, hard = line[len(title) :].split()[:2]
                return soft, hard
        return None

    def interfaces(self) -> set[str]:
        return {
            line.split(":")[0].strip() for line in self.sections.get("netdev", []) if ":" in line
        }

    def cgroup(self) -> dict[str, float]:
        """The tightest limit visible per kind: memory (bytes), pids, cpus."""
        values: dict[str, list[float]] = {"memory": [], "pids": [], "cpus": []}
        quotas: dict[str, dict[str, int]] = {}
        for line in self.sections.get("cgroup", []):
            path, _, value = line.partition(" ")
            folder, _, name = path.rpartition("/")
            if name in ("memory.max", "memory.limit_in_bytes", "pids.max") and value.isdigit():
                kind = "pids" if name == "pids.max" else "memory"
                if int(value) < UNLIMITED:
                    values[kind].append(int(value))
            elif name == "cpu.max" and value.split()[0].isdigit():
                quota, period = value.split()
                values["cpus"].append(int(quota) / int(period))
            elif name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"):
                quotas.setdefault(folder, {})[name] = int(value)
        for pair in quotas.values():
            if pair.get("cpu.cfs_quota_us", -1) > 0 and pair.get("cpu.cfs_period_us"):
                values["cpus"].append(pair["cpu.cfs_quota_us"] / pair["cpu.cfs_period_us"])
        return {kind: min(found) for kind, found in values.items() if found}


def host_cgroup_lines(sandbox_id: str) -> list[str]:
    """A local sandbox's cgroup files as the host sees them (the sandbox sees none), in
    the probe's ``path value`` form."""
    lines = []
    for folder in [
        *Path("/sys/fs/cgroup").glob(f"*/corral/corral-{sandbox_id}"),
        Path(f"/sys/fs/cgroup/corral/corral-{sandbox_id}"),
    ]:
        for name in _CGROUP_FILES:
            with contextlib.suppress(OSError):
                lines.append(f"{folder / name} {(folder / name).read_text().strip()}")
    return lines


# -- the oracle ----------------------------------------------------------------------------


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _writable_by(stat_line: str, uid: int, gids: set[int]) -> bool | None:
    try:
        owner, group, mode = stat_line.split()
        bits = int(mode, 8)
    except ValueError:
        return None
    if int(owner) == uid:
        return bool(bits & 0o200)
    if int(group) in gids:
        return bool(bits & 0o020)
    return bool(bits & 0o002)


def expected_ids(user: str, probe: Probe) -> tuple[int, int] | None:
    """The uid and gid a numeric ``user`` means (``"4242"`` is 4242:4242, as the spec's
    ``uid_gid`` reads it); None for names, checked by name instead."""
    uid, _, gid = user.partition(":")
    if uid.isdigit() and (gid or uid).isdigit():
        return int(uid), int(gid or uid)
    return None


Check = Callable[[str, bool, str], None]


def check_probe(made: Made, spec: SandboxSpec, probe: Probe, check: Check) -> None:
    """Every requested property, each through ``check(name, ok, detail)``."""
    facts = probe.facts
    drawn = made.drawn
    # who and where
    ids = expected_ids(spec.user, probe)
    got = (facts.get("uid"), facts.get("gid"))
    if ids is not None:
        check("user ids", got == (str(ids[0]), str(ids[1])), f"{spec.user!r} ran as {got}")
    else:
        name, _, group = spec.user.partition(":")
        check("user name", facts.get("user") == name, f"{spec.user!r}: id -un {facts}")
        if group:
            check("group name", facts.get("group") == group, f"{spec.user!r}: {facts}")
    check("workdir", facts.get("pwd") == spec.workdir, f"pwd {facts.get('pwd')!r}")
    # environment
    for name, value in drawn.env:
        check(
            "env value",
            facts.get(f"env.{name}.set") == "set" and facts.get(f"env.{name}.md5") == md5(value),
            f"{name} ({len(value)} chars) reads back as {facts.get(f'env.{name}.md5')!r}",
        )
    # mounts
    uid = int(facts.get("uid") or -1)
    gids = {int(facts.get("gid") or -1)}
    ro_targets = set()
    for i, m in enumerate(drawn.mounts):
        seen = probe.mount_at(m.target)
        check("mount present", seen is not None, f"nothing is mounted on {m.target!r}")
        writes = facts.get(f"mount.{i}.write")
        if m.kind in ("dir", "file"):
            want = f"mount {i} of {made.token}" if m.kind == "dir" else f"file {i} of "
            check(
                "bind shows the host's file",
                (facts.get(f"mount.{i}.read") or "").startswith(want),
                f"{m.target!r} shows {facts.get(f'mount.{i}.read')!r}",
            )
            check(
                "bind writability",
                writes == ("no" if m.read_only else "yes"),
                f"{m.kind} bind on {m.target!r} (read_only={m.read_only}) writable: {writes}",
            )
            if not m.read_only and writes == "yes":
                src = made.sources[i]
                landed = (
                    src.read_text().endswith("+")
                    if m.kind == "file"
                    else ((src / f"w-{made.token}").exists())
                )
                check("rw bind writes reach the host", landed, f"{src} unchanged")
        else:
            if seen is not None:
                check(
                    "mount read-only flag",
                    ("ro" in seen[0]) == m.read_only,
                    f"{m.kind} on {m.target!r}: options {sorted(seen[0])}",
                )
            stat_line = facts.get(f"mount.{i}.stat", "")
            can = _writable_by(stat_line, uid, gids)
            if m.read_only:
                check("volume read-only", writes == "no", f"{m.target!r} writable: {writes}")
            elif can is not None:
                check(
                    "mount writability matches its mode",
                    writes == ("yes" if can else "no"),
                    f"{m.kind} on {m.target!r} ({stat_line}) writable: {writes}",
                )
        if m.kind == "tmpfs" and seen is not None:
            options, fstype, super_options = seen
            check("tmpfs type", fstype == "tmpfs", f"{m.target!r} is {fstype}")
            check("tmpfs noexec", ("noexec" in options) != m.exec, f"{m.target!r}: {options}")
            pages = math.ceil(m.size / PAGE) * PAGE
            sizes = [o for o in super_options if o.startswith("size=")]
            check(
                "tmpfs size",
                sizes == [f"size={pages // 1024}k"],
                f"{m.target!r} asked {m.size}, has {sizes}",
            )
            mode = (facts.get(f"mount.{i}.stat") or "").split()[-1:]
            check("tmpfs mode", mode == [f"{m.mode & 0o7777:o}"], f"{m.target!r}: {mode}")
        if m.read_only and m.kind != "tmpfs":
            ro_targets.add(m.target)
    # A workdir in a read-only mount (the innermost around it) is that mount's folder:
    # read-only as asked.
    around = [
        m for m in drawn.mounts if (spec.workdir + "/").startswith(m.target.rstrip("/") + "/")
    ]
    inner = max(around, key=lambda m: len(m.target), default=None)
    in_read_only = inner is not None and inner.read_only and inner.kind != "tmpfs"
    if spec.workdir not in [m.target for m in drawn.mounts] and not in_read_only:
        check(
            "workdir writable",
            facts.get("workdir.write") == "yes",
            f"{spec.workdir!r} (not a mount target) writable: {facts.get('workdir.write')}",
        )
    # the root filesystem
    root = probe.mount_at("/")
    if spec.security.read_only_root:
        check("root read-only", facts.get("root.write") == "no", "/ was writable")
        if root is not None:
            check("root mounted ro", "ro" in root[0], f"/ options {sorted(root[0])}")
    elif root is not None:
        check("root mounted rw", "rw" in root[0], f"/ options {sorted(root[0])}")
    # rlimits
    lim = spec.limits
    nofile = probe.rlimit("Max open files")
    want_nofile = (str(lim.nofile), str(lim.nofile))
    check("rlimit nofile", nofile == want_nofile, f"{nofile} not {want_nofile}")
    cgroup = probe.cgroup()
    # A pids cgroup no larger than nproc bounds the processes as well (the local backend
    # uses it instead: every sandbox there runs as one host user, whose nproc they share).
    nproc = probe.rlimit("Max processes")
    check(
        "rlimit nproc",
        nproc == (str(lim.nproc), str(lim.nproc)) or cgroup.get("pids", math.inf) <= lim.nproc,
        f"{nproc} not {lim.nproc}, and the pids cgroup is {cgroup.get('pids')}",
    )
    if lim.file_size is not None:
        got_limit = probe.rlimit("Max file size")
        check("rlimit file size", got_limit is not None and got_limit[0] == str(lim.file_size),
              f"{got_limit} not {lim.file_size}")  # fmt: skip
    if lim.cputime is not None:
        got_limit = probe.rlimit("Max cpu time")
        want_cpu = str(math.ceil(lim.cputime))
        check("rlimit cpu time", got_limit is not None and got_limit[0] == want_cpu,
              f"{got_limit} not {want_cpu}")  # fmt: skip
    # cgroup limits, where the sandbox (or for the local backend, the test) sees them
    if "memory" in cgroup:
        want_memory = lim.memory - lim.memory % PAGE
        check("memory limit", cgroup["memory"] == want_memory, f"{cgroup} not {want_memory}")
    if "pids" in cgroup:
        # The local backend's pids cgroup also carries nproc (see "rlimit nproc").
        want_pids = {lim.pids, min(lim.pids, lim.nproc)}
        check("pids limit", cgroup["pids"] in want_pids, f"{cgroup} not {want_pids}")
    if lim.cpus is not None and cgroup:  # visible cgroups must show it
        got_cpus = cgroup.get("cpus")
        check("cpu limit", got_cpus is not None and abs(got_cpus - lim.cpus) < 0.011,
              f"{cgroup} not {lim.cpus}")  # fmt: skip
    # network: probe the interfaces only, never send anything
    names = probe.interfaces()
    if spec.network.mode == "none":
        check("network none", names == {"lo"}, f"interfaces {sorted(names)}")
    else:
        check("network bridge", "lo" in names and len(names) > 1, f"interfaces {sorted(names)}")
