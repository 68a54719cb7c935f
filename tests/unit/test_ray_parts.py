"""The ray backend's parts that need no cluster: settings, placement rules, the streams
between a node and a driver, and errors across the wire."""

from __future__ import annotations

import threading

import pytest

import corral
from corral.backends.ray import placement, wire
from corral.backends.ray.feed import Abandoned, Feed, Intake, Leases
from corral.backends.ray.settings import RaySettings
from corral.core.backend import Capability

MiB = 1024**2


def _report(
    sandboxes: int = 0,
    caps: Capability = Capability.ISOLATION,
    ok: bool = True,
    version: str = corral.__version__,
) -> wire.NodeReport:
    node = corral.NodeInfo("n" * 56, "10.0.0.1")
    backends = {"local": (ok, "" if ok else "broken", caps.value)}
    return wire.NodeReport(node, "local", backends, sandboxes, version)


# -- settings ---------------------------------------------------------------------------


def test_settings_defaults() -> None:
    s = RaySettings()
    assert (s.address, s.namespace, s.node_backend, s.strategy) == (
        "auto",
        "corral",
        None,
        "spread",
    )
    assert s.max_per_node is None and s.resources == {} and s.placement_timeout == 30.0


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("resources", {"CPU": 1}, "resources.CPU"),
        ("resources", {"gpu_slot": -1}, "resources.gpu_slot"),
        ("resources", ["x"], "resources"),
        ("max_per_node", 0, "max_per_node"),
        ("max_per_node", 1.5, "max_per_node"),
        ("strategy", "random", "strategy"),
        ("node_backend", "ray", "node_backend"),
        ("address", "", "address"),
        ("placement_timeout", "-1s", "placement_timeout"),
    ],
)
def test_bad_settings_name_their_field(field: str, value: object, named: str) -> None:
    with pytest.raises(corral.ConfigError) as caught:
        RaySettings(**{field: value})
    assert caught.value.path == named


def test_settings_come_from_the_configuration(tmp_path) -> None:
    settings = corral.load_settings(
        {"backends": {"ray": {"strategy": "pack", "max_per_node": 4, "resources": {"slot": 1}}}},
        cwd=tmp_path,
        environ={},
    )
    from corral.core.convert import structure

    s = structure(settings.backends["ray"], RaySettings, "backends.ray")
    assert (s.strategy, s.max_per_node, s.resources) == ("pack", 4, {"slot": 1.0})


# -- placement --------------------------------------------------------------------------


def test_bundle_reserves_cpus_memory_and_custom_resources() -> None:
    spec = corral.SandboxSpec(limits=corral.Limits(memory="256MiB", cpus=0.5))
    assert placement.bundle(spec, {"slot": 1.0}) == {"memory": 256 * MiB, "CPU": 0.5, "slot": 1.0}
    # Without a CPU cap no CPU is reserved (the sandbox is not limited to any).
    assert "CPU" not in placement.bundle(corral.SandboxSpec(), {})


def test_candidates_say_why_each_other_node_cannot_host() -> None:
    need = Capability.ISOLATION | Capability.MEMORY_LIMIT
    reports = {
        "a": _report(caps=need),
        "b": _report(caps=Capability.ISOLATION),
        "c": _report(ok=False),
        "d": _report(sandboxes=2, caps=need),
    }
    fit, why = placement.candidates(reports, None, need, 2, corral.__version__)
    assert fit == ["a"]
    assert "MEMORY_LIMIT" in why["b"]
    assert "not available: broken" in why["c"]
    assert "max_per_node (2)" in why["d"]


def test_a_node_of_another_corral_gets_no_new_sandboxes() -> None:
    reports = {"old": _report(version="0.0.1"), "new": _report()}
    fit, why = placement.candidates(reports, None, Capability(0), None, corral.__version__)
    assert fit == ["new"] and "runs corral 0.0.1" in why["old"]


def test_a_backend_a_node_lacks_is_named() -> None:
    fit, why = placement.candidates(
        {"a": _report()}, "podman", Capability(0), None, corral.__version__
    )
    assert fit == [] and "podman backend is not available: not installed" in why["a"]


def test_spread_and_pack_order() -> None:
    counts = {"a": 3, "b": 0, "c": 1}
    assert placement.ordered(["a", "b", "c"], counts, "spread") == ["b", "c", "a"]
    assert placement.ordered(["a", "b", "c"], counts, "pack") == ["a", "c", "b"]


def test_too_big_names_the_resource_and_the_largest_node() -> None:
    totals = {"a": {"CPU": 4.0, "memory": 4096.0 * MiB}, "b": {"CPU": 2.0, "memory": 8192.0 * MiB}}
    assert placement.too_big({"CPU": 2.0, "memory": 1.0 * MiB}, totals) is None
    why = placement.too_big({"CPU": 64.0, "memory": 1.0}, totals)
    assert why is not None and "64 of CPU" in why and "most any node has is 4" in why
    why = placement.too_big({"memory": 16384.0 * MiB}, totals)
    assert why is not None and "16384 MiB of memory" in why
    # Each resource exists somewhere, but no node has both.
    why = placement.too_big({"CPU": 4.0, "memory": 8192.0 * MiB}, totals)
    assert why is not None and why.startswith("no single node")
    why = placement.too_big({"slot": 1.0}, totals)
    assert why is not None and "of slot" in why


# -- streams ----------------------------------------------------------------------------


def test_feed_gives_items_then_the_end() -> None:
    feed = Feed(limit=MiB)
    feed.put(b"a", 1)
    feed.put(b"b", 1)
    assert feed.take(0.1, MiB, linger=0) == ([b"a", b"b"], None)
    feed.finish("done")
    assert feed.take(0.1, MiB) == ([], "done")


def test_feed_take_waits_only_as_long_as_asked() -> None:
    assert Feed(limit=MiB).take(0.05, MiB) == ([], None)


def test_a_quick_end_travels_with_the_last_output() -> None:
    feed = Feed(limit=MiB)
    feed.put(b"out", 3)
    threading.Timer(0.001, feed.finish, args=("end",)).start()
    # linger long enough that the end always arrives within it
    assert feed.take(1.0, MiB, linger=5.0) == ([b"out"], "end")


def test_feed_replies_are_bounded_and_the_producer_waits_when_full() -> None:
    feed = Feed(limit=4)
    feed.put(b"12", 2)
    feed.put(b"34", 2)
    blocked = threading.Thread(target=feed.put, args=(b"56", 2))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # full: a pipe's back-pressure
    assert feed.take(0.1, 2, linger=0) == ([b"12"], None)
    blocked.join(5)
    assert not blocked.is_alive()
    assert feed.take(0.1, 100, linger=0)[0] == [b"34", b"56"]


def test_an_abandoned_feed_stops_its_producer() -> None:
    feed = Feed(limit=1)
    feed.put(b"x", 1)
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            feed.put(b"y", 1)
        except Abandoned as e:
            errors.append(e)

    worker = threading.Thread(target=produce)
    worker.start()
    feed.abandon()
    worker.join(5)
    assert len(errors) == 1


def test_intake_reads_what_the_driver_sends_in_order() -> None:
    intake = Intake(limit=MiB)
    intake.feed(b"hello ", last=False)
    intake.feed(b"world", last=True)
    import io

    assert io.BufferedReader(intake).read() == b"hello world"


def test_an_abandoned_intake_fails_its_reader() -> None:
    intake = Intake(limit=MiB)
    intake.abandon()
    with pytest.raises(Abandoned):
        intake.read(10)


def test_a_lease_ends_only_when_its_driver_is_dead() -> None:
    dead = {"1": True, "2": False}
    leases = Leases(dead.__getitem__, grace=0.0)
    assert leases.expired(0.0, "1") and not leases.expired(0.0, "2")
    import time

    assert not Leases(dead.__getitem__, grace=60).expired(time.monotonic(), "1")

    def head_away(job: str) -> bool:
        raise ConnectionError

    assert not Leases(head_away, grace=0.0).expired(0.0, "1")


# -- errors across the wire -------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        corral.ConfigError("sandbox.limits.memory", "'x' is not a size"),
        corral.CapacityError("full", backend="ray", sandbox_id="abc"),
        corral.BackendUnavailableError("gone", backend="local", fix="start it", retryable=False),
        corral.PathSecurityError("escapes", backend="local"),
    ],
)
def test_errors_come_back_as_themselves(error: corral.SandboxError) -> None:
    import pickle

    answer = pickle.loads(pickle.dumps(wire.failure(error)))
    with pytest.raises(type(error)) as caught:
        wire.raise_failure(answer)
    got = caught.value
    assert str(got) == str(error)
    assert (got.retryable, got.fix, got.backend, got.sandbox_id) == (
        error.retryable,
        error.fix,
        error.backend,
        error.sandbox_id,
    )


def test_an_unknown_error_class_comes_back_as_internal() -> None:
    class PluginsOwn(corral.SandboxError):
        pass

    with pytest.raises(corral.InternalError, match="odd"):
        wire.raise_failure(wire.failure(PluginsOwn("odd")))


# -- no cluster -------------------------------------------------------------------------


def test_no_cluster_is_unavailable_with_the_fix(tmp_path) -> None:
    # A loopback port nothing listens on: the check connects nowhere else.
    settings = corral.load_settings(
        {"backends": {"ray": {"address": "127.0.0.1:9"}}}, cwd=tmp_path, environ={}
    )
    with pytest.raises(corral.BackendUnavailableError) as caught:
        corral.create(backend="ray", settings=settings)
    assert "127.0.0.1:9" in str(caught.value)
    assert caught.value.fix is not None and "ray start --head" in caught.value.fix
