"""The campaign harness's leak check can fail: inner pytest runs (pytester, in this
process) of cases that leave a host process, a file descriptor, a temporary folder, a
changed canary, a container or a network behind must each be reported, and a clean case
must not; so must a sandbox left through ray, on nodes of each kind.

The inner runs use copies of the real conftest files (the campaign's with a shorter
settling time, so a reported leak does not wait out ten seconds); what the inner cases
leave behind is written to a file, and cleaned up here so that this test's own check
passes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import ray_cluster

import corral

CAMPAIGN = Path(__file__).parent
KINDS = ("local", "docker", "podman")

INNER_CASES = """
import json
import os
import tempfile
from pathlib import Path

import pytest

import corral

RECORD = Path(os.environ["CORRALTEST_HARNESS_RECORD"])


def _left(kind, value):
    with RECORD.open("a") as record:
        record.write(json.dumps([kind, value]) + "\\n")


def test_clean(canary):
    assert canary.read_bytes().startswith(b"canary ")


def test_leaves_a_process():
    _left("pid", os.spawnlp(os.P_NOWAIT, "sleep", "sleep", "120"))


def test_leaves_an_fd():
    _left("fd", os.open(os.devnull, os.O_RDONLY))


def test_leaves_a_temporary_folder():
    _left("folder", tempfile.mkdtemp(prefix="corral-leak-"))


def test_changes_a_canary(canary):
    canary.write_bytes(b"changed")


def test_leaves_a_sandbox(settings_of):
    engine = os.environ["CORRALTEST_HARNESS_ENGINE"]
    sandbox = corral.create(backend=engine, settings=settings_of(engine), lifetime="2m")
    _left("sandbox", sandbox.id)
    sandbox.detach()


@pytest.mark.through_ray
def test_ray_leaves_a_sandbox(backend, api_backend, backend_settings):
    sandbox = corral.create(backend=api_backend, settings=backend_settings, lifetime="2m")
    _left("ray-sandbox", sandbox.id)
    sandbox.detach()


def test_leaves_a_network(settings_of, raw_client_of):
    # A bridged sandbox whose container went (as at the end of its lifetime): its
    # network alone is left.
    engine = os.environ["CORRALTEST_HARNESS_ENGINE"]
    sandbox = corral.create(
        backend=engine, settings=settings_of(engine), network="bridge", lifetime="2m"
    )
    _left("network", "corral-" + sandbox.id)
    sandbox.detach()
    client = raw_client_of(engine)
    try:
        client.remove_container("corral-" + sandbox.id, force=True, v=True)
    finally:
        client.close()
"""


@pytest.fixture
def inner(
    pytester: pytest.Pytester,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    settings_of,
    raw_client_of,
):
    """A pytester folder laid out like tests/integration, with the real fixtures."""
    pytester.makeconftest((CAMPAIGN.parent / "conftest.py").read_text())
    harness = (CAMPAIGN / "conftest.py").read_text()
    quick = harness.replace("SETTLE = 10.0", "SETTLE = 1.0")
    assert quick != harness, "the harness no longer has SETTLE = 10.0; update this test"
    folder = pytester.mkdir("campaign")
    (folder / "conftest.py").write_text(quick)
    (folder / "test_cases.py").write_text(INNER_CASES)
    record = tmp_path / "left.jsonl"
    record.touch()
    monkeypatch.setenv("CORRALTEST_HARNESS_RECORD", str(record))
    yield pytester
    _clean_up(record, settings_of, raw_client_of)


def _clean_up(record: Path, settings_of, raw_client_of) -> None:
    """Remove what the inner cases left, by what they recorded (never by name)."""
    for line in record.read_text().splitlines():
        kind, value = json.loads(line)
        if kind == "pid":
            with contextlib.suppress(ProcessLookupError):
                os.kill(value, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(value, 0)
        elif kind == "fd":
            os.close(value)
        elif kind == "folder":
            shutil.rmtree(value, ignore_errors=True)
        elif kind == "sandbox":
            engine = os.environ["CORRALTEST_HARNESS_ENGINE"]
            corral.attach(value, backend=engine, settings=settings_of(engine)).close()
        elif kind == "ray-sandbox":
            settings = ray_cluster.ray_settings(record.parent)
            corral.attach(value, backend="ray", settings=settings).close()
        elif kind == "network":
            client = raw_client_of(os.environ["CORRALTEST_HARNESS_ENGINE"])
            try:
                client.remove_network(value)
            finally:
                client.close()


def _run(inner: pytest.Pytester, *names: str) -> pytest.RunResult:
    return inner.runpytest("-p", "no:cacheprovider", "-k", " or ".join(names))


@pytest.mark.local
def test_host_side_leaks_are_reported_and_a_clean_case_is_not(inner):
    result = _run(
        inner,
        "test_clean",
        "test_leaves_a_process",
        "test_leaves_an_fd",
        "test_leaves_a_temporary_folder",
        "test_changes_a_canary",
    )
    result.assert_outcomes(passed=5, errors=4)
    reports = _teardown_reports(result.stdout.str())
    assert reports.keys() == {
        "test_leaves_a_process",
        "test_leaves_an_fd",
        "test_leaves_a_temporary_folder",
        "test_changes_a_canary",
    }, "the clean case was reported, or a leaking one was not"
    assert "host processes left: [" in reports["test_leaves_a_process"]
    assert "client file descriptors " in reports["test_leaves_an_fd"]
    assert "temporary folders left: ['corral-leak-" in reports["test_leaves_a_temporary_folder"]
    assert "host files changed: ['" in reports["test_changes_a_canary"]


def _teardown_reports(output: str) -> dict[str, str]:
    """Each inner case whose teardown failed, with the text of its failure."""
    sections = output.split("ERROR at teardown of ")[1:]
    return {section.split(" ", 1)[0]: section for section in sections}


@pytest.mark.parametrize(
    "engine",
    [pytest.param(name, marks=getattr(pytest.mark, name)) for name in ("docker", "podman")],
)
def test_a_sandbox_left_on_an_engine_is_reported(inner, engine, settings_of, monkeypatch):
    settings_of(engine)  # fails under CI, skips elsewhere, when the engine is not set up
    monkeypatch.setenv("CORRALTEST_HARNESS_ENGINE", engine)
    result = _run(inner, "test_leaves_a_sandbox")
    result.assert_outcomes(passed=1, errors=1)
    report = _teardown_reports(result.stdout.str())["test_leaves_a_sandbox"]
    assert f"the case leaked or touched the host: {engine} kept [" in report


@pytest.mark.parametrize(
    "engine",
    [pytest.param(name, marks=getattr(pytest.mark, name)) for name in ("docker", "podman")],
)
def test_a_network_left_on_an_engine_is_reported(inner, engine, settings_of, monkeypatch):
    settings_of(engine)
    monkeypatch.setenv("CORRALTEST_HARNESS_ENGINE", engine)
    result = _run(inner, "test_leaves_a_network")
    result.assert_outcomes(passed=1, errors=1)
    report = _teardown_reports(result.stdout.str())["test_leaves_a_network"]
    assert f"{engine} kept ['network:corral-" in report


@pytest.mark.parametrize(
    "backend",
    [pytest.param(f"ray-{k}", marks=[pytest.mark.ray, getattr(pytest.mark, k)]) for k in KINDS],
)
def test_a_sandbox_left_through_ray_is_reported(inner, backend, kind):
    """Made by a node's agent, not this process: still found, by the cluster's listing and
    placement groups, and by the engine's labels or the nodes' local state folder. (This
    case is a ray case itself, so that its own check allows for the driver's connection.)"""
    ray_cluster.address()  # fails under CI, skips elsewhere, without the cluster
    markers = "".join(f"\n    {name}" for name in ("through_ray", "ray", *KINDS))
    inner.makeini(f"[pytest]\nmarkers ={markers}\n")
    name = "test_ray_leaves_a_sandbox"
    result = inner.runpytest("-p", "no:cacheprovider", "-k", name, "-m", f"ray and {kind}")
    result.assert_outcomes(passed=1, errors=1)
    report = _teardown_reports(result.stdout.str())[f"{name}[{backend}]"]
    assert "the Ray cluster kept [" in report
    assert "'listed: " in report and "'placement group: " in report
    if kind == "local":
        assert "'local folder: " in report
    else:
        assert f"{kind} kept [" in report
