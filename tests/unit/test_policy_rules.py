"""corral's own policy on read-write bind mounts (THREATS.md T38): an opt-in by name, and
a free-space reserve on the mount's filesystem, both checked before any backend call."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import corral
from corral.core.lifecycle import build_spec
from corral.core.policy import apply_policy, loosened
from corral.core.settings import Settings, load_settings
from corral.testing import FakeBackend

OPT_IN = {"allow_unsafe": ["unbounded_rw_mounts"]}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    made = tmp_path / "data"
    made.mkdir()
    return made


@pytest.fixture
def settings(tmp_path: Path, folder: Path) -> Settings:
    return load_settings({"mount_roots": [str(folder)]}, cwd=tmp_path, environ={})


def checked(settings: Settings, **keywords: Any) -> corral.SandboxSpec:
    return apply_policy(build_spec(settings, None, keywords), settings)


def test_a_rw_bind_without_the_opt_in_is_refused_naming_the_mount_and_the_fix(
    settings: Settings, folder: Path
) -> None:
    mounts = [corral.Mount(str(folder / ".." / "data"), "/out", read_only=False)]
    with pytest.raises(corral.PolicyError) as caught:
        checked(settings, mounts=[corral.Mount(str(folder), "/in"), *mounts])
    message = str(caught.value)
    assert message.startswith("sandbox.mounts[1]: ")
    assert repr(str(folder)) in message and "'/out'" in message  # resolved source, target
    assert "no cap" in message
    assert "add 'unbounded_rw_mounts' to sandbox.security.allow_unsafe" in message


@pytest.mark.parametrize(
    "written", ["{src}:/out:rw", {"source": "{src}", "target": "/out", "read_only": False}]
)
def test_every_spelling_of_a_rw_bind_needs_the_opt_in(
    settings: Settings, folder: Path, written: Any
) -> None:
    mount = (
        written.format(src=folder)
        if isinstance(written, str)
        else {**written, "source": str(folder)}
    )
    with pytest.raises(corral.PolicyError, match="unbounded_rw_mounts"):
        checked(settings, mounts=[mount])
    assert checked(settings, mounts=[mount], security=OPT_IN).mounts[0].read_only is False


def test_with_the_opt_in_a_rw_bind_is_allowed_and_named_as_a_loosening(
    settings: Settings, folder: Path
) -> None:
    spec = checked(
        settings, mounts=[corral.Mount(str(folder), "/out", read_only=False)], security=OPT_IN
    )
    assert loosened(spec) == ["unbounded_rw_mounts"]


def test_read_only_binds_tmpfs_and_volumes_need_no_opt_in(settings: Settings, folder: Path) -> None:
    spec = checked(
        settings,
        mounts=[
            corral.Mount(str(folder), "/in"),
            corral.Tmpfs("/scratch"),
            corral.Volume("cache", "/cache"),
        ],
    )
    assert loosened(spec) == []


def test_the_opt_in_alone_loosens_nothing(settings: Settings, folder: Path) -> None:
    spec = checked(settings, mounts=[corral.Mount(str(folder), "/in")], security=OPT_IN)
    assert loosened(spec) == []


def test_the_opt_in_does_not_open_other_mount_rules(settings: Settings, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(corral.PolicyError, match="not under an allowed mount root"):
        checked(settings, mounts=[f"{outside}:/out:rw"], security=OPT_IN)
    with pytest.raises(corral.PolicyError, match="is a system folder"):
        checked(settings, mounts=["/etc:/out:rw"], security=OPT_IN)


def test_a_rw_bind_on_a_filesystem_below_the_reserve_is_refused(
    settings: Settings, folder: Path
) -> None:
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    greedy = attrs.evolve(settings, rw_mount_reserve=free + 1024**4)
    rw = [corral.Mount(str(folder), "/out", read_only=False)]
    with pytest.raises(corral.ResourceLimitError) as caught:
        checked(greedy, mounts=rw, security=OPT_IN)
    message = str(caught.value)
    assert message.startswith("sandbox.mounts[0]: ") and "rw_mount_reserve" in message
    assert " free, less than the " in message
    # Only read-write binds are held to it; 0 turns it off.
    checked(greedy, mounts=[corral.Mount(str(folder), "/in")])
    checked(attrs.evolve(greedy, rw_mount_reserve=0), mounts=rw, security=OPT_IN)


def test_the_reserve_is_a_size_setting_of_1GiB_by_default(tmp_path: Path) -> None:
    assert load_settings(cwd=tmp_path, environ={}).rw_mount_reserve == 1024**3
    found = load_settings(cwd=tmp_path, environ={"CORRAL_RW_MOUNT_RESERVE": "2g"})
    assert found.rw_mount_reserve == 2 * 1024**3
    with pytest.raises(corral.ConfigError, match="rw_mount_reserve"):
        load_settings({"rw_mount_reserve": "lots"}, cwd=tmp_path, environ={})


# -- through corral.create, on the fake backend ---------------------------------------------


@pytest.fixture
def make(fake_backend: FakeBackend, settings: Settings) -> Iterator[Callable[..., corral.Sandbox]]:
    made: list[corral.Sandbox] = []

    def create(**keywords: Any) -> corral.Sandbox:
        made.append(corral.create(backend="fake", settings=settings, **keywords))
        return made[-1]

    yield create
    for sandbox in made:
        sandbox.close()


def test_a_refused_rw_bind_reaches_no_backend(
    fake_backend: FakeBackend, make: Callable[..., corral.Sandbox], folder: Path
) -> None:
    with pytest.raises(corral.PolicyError, match="unbounded_rw_mounts"):
        make(mounts=[f"{folder}:/out:rw"])
    assert fake_backend.calls == []


def test_an_allowed_rw_bind_is_recorded_on_the_sandbox(
    fake_backend: FakeBackend, make: Callable[..., corral.Sandbox], folder: Path
) -> None:
    sandbox = make(mounts=[f"{folder}:/out:rw"], security=OPT_IN)
    assert sandbox.info.labels["corral.loosened"] == "unbounded_rw_mounts"
    assert [c.method for c in fake_backend.calls][:1] == ["create"]


def test_the_clis_allow_unsafe_adds_to_the_settings_opt_ins(tmp_path: Path) -> None:
    from corral.cli import _allowing, parse_args

    args = parse_args(["run", "--allow-unsafe", "unbounded_rw_mounts", "--", "true"])
    assert args.allow_unsafe == ["unbounded_rw_mounts"]
    configured = load_settings(
        {"sandbox": {"security": {"allow_unsafe": ["cap_add"]}}}, cwd=tmp_path, environ={}
    )
    assert _allowing(configured, args.allow_unsafe) == {
        "allow_unsafe": ["cap_add", "unbounded_rw_mounts"]
    }
    assert _allowing(configured, None) is None  # without the flag, the settings alone


# -- places inside read-only mounts -------------------------------------------------------


def test_a_mount_point_missing_in_a_read_only_mount_is_refused_by_field(
    settings: Settings, folder: Path
) -> None:
    # No backend can make it there: runc and bubblewrap fail once the sandbox starts.
    inner = folder / "inner"
    inner.mkdir()
    with pytest.raises(corral.ConfigError, match=r"sandbox\.mounts\[1\]\.target") as refused:
        checked(settings, mounts=[corral.Mount(str(folder), "/src"), corral.Tmpfs("/src/x")])
    assert "create it there" in str(refused.value)
    # The twins: present in the source, or under a writable mount, it is fine.
    checked(settings, mounts=[corral.Mount(str(folder), "/src"), corral.Tmpfs("/src/inner")])
    checked(settings, mounts=[corral.Tmpfs("/src"), corral.Tmpfs("/src/x")])


def test_only_the_innermost_mount_around_a_place_counts(settings: Settings, folder: Path) -> None:
    (folder / "inner").mkdir()
    mounts = [
        corral.Mount(str(folder), "/src"),
        corral.Tmpfs("/src/inner"),
        corral.Tmpfs("/src/inner/x"),
    ]
    checked(settings, mounts=mounts)


def test_a_workdir_missing_in_a_read_only_mount_and_a_read_only_volume_are_refused(
    settings: Settings, folder: Path
) -> None:
    with pytest.raises(corral.ConfigError, match=r"sandbox\.workdir"):
        checked(settings, mounts=[corral.Mount(str(folder), "/src")], workdir="/src/nowhere")
    volume = corral.Volume("data", "/data", read_only=True)
    with pytest.raises(corral.ConfigError, match=r"sandbox\.mounts\[1\]\.target"):
        checked(settings, mounts=[volume, corral.Tmpfs("/data/x")])


def test_the_workspace_cannot_be_the_root() -> None:
    with pytest.raises(corral.ConfigError, match=r"sandbox\.workdir"):
        corral.create(workdir="/")
