"""The one reader of cgroup files (backends/cgroupfs.py), on v1, v2 and hybrid layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.backends import cgroupfs


def _folder(root: Path, name: str, files: dict[str, str]) -> Path:
    folder = root / name
    folder.mkdir()
    for file, text in files.items():
        (folder / file).write_text(text)
    return folder


@pytest.fixture
def v1(tmp_path: Path) -> dict[str, Path]:
    """A container's cgroups on a v1 host, files as the kernel writes them."""
    return {
        "memory": _folder(
            tmp_path,
            "memory",
            {
                "memory.usage_in_bytes": "4096000\n",
                "memory.max_usage_in_bytes": "8192000\n",
                "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            },
        ),
        "pids": _folder(tmp_path, "pids", {"pids.current": "3\n"}),
        "cpuacct": _folder(tmp_path, "cpuacct", {"cpuacct.usage": "1500000000\n"}),
        "blkio": _folder(
            tmp_path,
            "blkio",
            {
                "blkio.throttle.io_service_bytes": "8:0 Read 4096\n8:0 Write 512\n"
                "8:16 Read 1024\n8:16 Write 0\n8:0 Total 4608\nTotal 5632\n"
            },
        ),
        "unified": _folder(tmp_path, "unified", {"cpu.stat": "usage_usec 99000000\n"}),
    }


@pytest.fixture
def v2(tmp_path: Path) -> dict[str, Path]:
    """A sandbox's cgroup on a v2 host."""
    return {
        "unified": _folder(
            tmp_path,
            "unified",
            {
                "memory.current": "2048\n",
                "memory.peak": "4096\n",
                "memory.events": "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n",
                "pids.current": "7\n",
                "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n",
                "io.stat": "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n"
                "8:16 rbytes=100 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n",
            },
        )
    }


def test_v1_figures(v1: dict[str, Path]) -> None:
    assert cgroupfs.usage(v1) == cgroupfs.CgroupUsage(
        memory_bytes=4096000,
        memory_peak_bytes=8192000,
        cpu_seconds=1.5,  # v1's cpuacct before the unified hierarchy's cpu.stat
        pids=3,
        oom_kills=2,
        block_read_bytes=5120,
        block_write_bytes=512,
    )


def test_v2_figures(v2: dict[str, Path]) -> None:
    assert cgroupfs.usage(v2) == cgroupfs.CgroupUsage(
        memory_bytes=2048,
        memory_peak_bytes=4096,
        cpu_seconds=2.5,
        pids=7,
        oom_kills=1,
        block_read_bytes=4196,
        block_write_bytes=8192,
    )


def test_a_hybrid_host_reads_cpu_from_the_unified_hierarchy_without_cpuacct(
    v1: dict[str, Path],
) -> None:
    # The local backend's v1 folders: memory and pids, and a cpu folder for a quota only.
    local = {key: v1[key] for key in ("memory", "pids", "unified")}
    assert cgroupfs.cpu_seconds(local) == 99.0
    assert cgroupfs.block_io(local) == (None, None)


def test_what_a_host_does_not_keep_is_none(tmp_path: Path) -> None:
    bare = {"unified": _folder(tmp_path, "bare", {"memory.current": "1\n"})}
    assert cgroupfs.usage(bare) == cgroupfs.CgroupUsage(1, None, None, None, 0, None, None)
    assert cgroupfs.usage({}) == cgroupfs.CgroupUsage(None, None, None, None, 0, None, None)


def test_the_figures_of_this_process_own_cgroup() -> None:
    """On the real host: this program's own cgroups, found as HostView finds a
    container's, give figures that say something."""
    root = Path("/sys/fs/cgroup")
    unified = root if (root / "cgroup.controllers").exists() else root / "unified"
    folders: dict[str, Path] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else ["unified"]:
            base = unified if controller == "unified" else root / controller
            if (base / path.lstrip("/")).is_dir():
                folders[controller] = base / path.lstrip("/")
    figures = cgroupfs.usage(folders)
    if figures.memory_bytes is None:
        pytest.skip("this host keeps no memory figures for this program's cgroup")
    assert figures.memory_bytes > 0
    assert figures.pids is None or figures.pids >= 1
    assert figures.cpu_seconds is None or figures.cpu_seconds > 0
