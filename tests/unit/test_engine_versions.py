"""The engine and runtime version gate (THREATS T72), case by case."""

import logging

import pytest

from corral.backends import engine_versions
from corral.backends.engine_versions import judge, judge_report, parse, runtime_version


@pytest.mark.parametrize(
    ("engine", "version", "cve"),
    [
        ("docker", "18.06.1-ce", "CVE-2019-5736"),
        ("docker", "19.03.0", "CVE-2019-14271"),
        ("podman", "1.5.1", "CVE-2019-18466"),
    ],
)
def test_releases_with_a_known_escape_are_refused(engine, version, cve):
    verdict = judge(engine, version, None)
    assert verdict.refused is not None and cve in verdict.refused


@pytest.mark.parametrize(
    ("engine", "version"),
    [("docker", "19.03.1"), ("docker", "20.10.24+dfsg1"), ("podman", "4.3.1")],
)
def test_their_fixed_successors_are_not(engine, version):
    assert judge(engine, version, None).refused is None


def test_releases_a_distribution_may_have_patched_are_warned_about_not_refused():
    verdict = judge("podman", "4.3.1", "runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1")
    assert verdict.refused is None
    assert any("CVE-2024-9676" in w for w in verdict.warnings)
    assert any("runc 1.1.5" in w and "CVE-2024-21626" in w for w in verdict.warnings)
    assert judge("docker", "27.1.0", "1.2.8").warnings == ()


def test_versions_are_read_from_what_engines_print():
    assert parse("20.10.24+dfsg1") == (20, 10, 24)
    assert parse("runc version 1.1.5+ds1") == (1, 1, 5)
    assert parse("5.2") == (5, 2, 0)
    assert parse("unknown") is None
    assert runtime_version([{"Name": "Engine"}, {"Name": "runc", "Version": "1.1.5"}]) == "1.1.5"
    assert runtime_version([{"Name": "OCI Runtime (runc)", "Version": "runc version 1.2"}])
    assert runtime_version([]) is None


def test_a_reports_warnings_are_logged_once_per_process_below_warning_level(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never printed at every call: `corral doctor` and `corral backends` show them, and a
    program that wants them in its log gets each one once, at INFO."""
    monkeypatch.setattr(engine_versions, "_logged", set(), raising=False)
    report = {
        "Version": "4.3.1",
        "Components": [{"Name": "OCI Runtime (runc)", "Version": "runc version 1.1.5+ds1"}],
    }
    with caplog.at_level(logging.DEBUG, logger="corral"):
        first = judge_report("podman", report)
        again = judge_report("podman", report)
    assert first == again and len(first.warnings) == 3
    records = [r for r in caplog.records if r.name == "corral"]
    assert [r.getMessage() for r in records] == list(first.warnings)
    assert {r.levelno for r in records} == {logging.INFO}
