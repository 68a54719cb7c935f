"""The node agent: one Ray actor per node that serves every corral sandbox of its node.

It runs the node's own corral (its settings, plugins and backends), so each node
applies corral's policy, its plugins' ``corral_check_spec`` and its backend's secure
defaults to every sandbox it makes, whatever the driver asked. One process serves the
node's sandboxes, however many: each one's CPU, memory and custom resources are held
by a placement group of one bundle pinned to the node, which reserves them without a
process. The actor is threaded: a call that waits (an exec's next output) holds a
thread, not the node.

Every call answers a value or a ``wire.Failure``. Nothing of a sandbox lives only
here: the node backend's labels say which node and placement group a sandbox belongs
to, so an agent that restarts finds what its previous run made, keeps what is still
reserved, and removes the rest (``reconcile``).

Long-lived sandboxes (docs/long-lived.md) are the node backend's as well: a spawned
process runs under corral's keeper on this node (the node backend's own process
methods, which start it from here), so it outlives drivers and this agent alike; the
agent removes a sandbox's processes with the sandbox. Snapshots are this node's (an
image of its engine, a folder of its local backend): the agent labels each with its
node, cluster and namespace, as it labels sandboxes, and lists only its own. ``extend``
moves the sweep's deadline with the sandbox's end.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import io
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs

from ...core._log import log
from ...core.backend import Backend, Capability
from ...core.errors import (
    BackendUnavailableError,
    ConfigError,
    InternalError,
    NotFoundError,
    SandboxError,
)
from ...core.lifecycle import check_capabilities
from ...core.output import OutputSink
from ...core.plugins import get_host
from ...core.policy import apply_policy
from ...core.results import (
    Change,
    Health,
    NodeInfo,
    OutputChunk,
    ProcessInfo,
    ProcessRead,
    ResourceUsage,
    SandboxInfo,
    SnapshotInfo,
)
from ...core.settings import load_settings
from ...core.spec import ExecRequest, SandboxSpec
from . import wire
from .feed import Abandoned, Feed, Intake, Leases

__all__ = [
    "LABEL_BACKEND",
    "LABEL_GROUP",
    "LABEL_NODE",
    "NodeAgent",
    "agent_name",
    "group_name",
    "standing_groups",
]

# Labels the agent adds to each sandbox it makes, on top of corral's own.
LABEL_NODE = "corral.ray.node"  # the Ray node id
LABEL_GROUP = "corral.ray.group"  # the placement group's id (hex)
LABEL_BACKEND = "corral.ray.backend"  # the node backend that holds it
# Which cluster (its session) and namespace made it: an agent touches only its own
# (the machine may run nodes of other clusters, sharing a state folder or an engine).
LABEL_CLUSTER = "corral.ray.cluster"
LABEL_NAMESPACE = "corral.ray.namespace"
_FEED_LIMIT = 8 * 1024**2  # bytes a stream holds on the node before its producer waits
_REPLY_MOST = 1024**2  # bytes of one reply to a driver
_SWEEP_EVERY = 2.0  # seconds between sweeps of expired sandboxes and gone drivers
_SWEEP_GRACE = 2.0  # seconds past a sandbox's lifetime before the sweep removes it
_RECONCILE_EVERY = 10  # sweeps between two reconciliations with the node backends
_READ_MOST = 1.0  # seconds one process_read call waits on the node (a thread held)
_BUILT_IN = ("local", "docker", "podman")  # a node's default backend: the first available

T = TypeVar("T")


def agent_name(node_id: str) -> str:
    return f"corral-agent-{node_id}"


def group_name(namespace: str, sandbox_id: str, node_id: str) -> str:
    """A sandbox's placement group: the driver finds a sandbox's node from it."""
    return f"corral.{namespace}.{sandbox_id}.{node_id}"


def standing_groups(namespace: str) -> dict[str, tuple[str, str]]:
    """The namespace's placement groups that are not removed: id: (sandbox, node)."""
    from ray.util.placement_group import placement_group_table

    found = {}
    for gid, group in placement_group_table().items():
        prefix, _, rest = group.get("name", "").partition(".")
        space, sandbox_id, node = rest.rsplit(".", 2) if rest.count(".") >= 2 else ("", "", "")
        if prefix == "corral" and space == namespace and group["state"] != "REMOVED":
            found[gid] = (sandbox_id, node)
    return found


def answers(method: Callable[..., T]) -> Callable[..., T | wire.Failure]:
    """A method whose SandboxErrors (and anything else) come back as a Failure."""

    @functools.wraps(method)
    def call(self: NodeAgent, *args: Any, **kwargs: Any) -> T | wire.Failure:
        try:
            return method(self, *args, **kwargs)
        except SandboxError as e:
            return wire.failure(e)
        except Exception as e:
            log.exception("node agent %s: %s failed", self.node.id[:12], method.__name__)
            return wire.failure(
                InternalError(f"the node agent on {self.node} failed: {type(e).__name__}: {e}")
            )

    return call


@attrs.define
class _Entry:
    backend: str
    group: str  # placement group id, hex
    expires: float
    known: float = attrs.field(factory=time.monotonic)  # since when this agent knows it


class NodeAgent:
    """Serves the corral sandboxes of one node (made a Ray actor by the driver)."""

    def __init__(self, node_id: str, namespace: str) -> None:
        import ray

        _log_to_stderr()  # Ray keeps a worker's stderr in the node's logs
        self.node = NodeInfo(node_id, ray.util.get_node_ip_address())
        self.namespace = namespace
        self.cluster = ray.get_runtime_context().get_session_name()
        self.settings = load_settings()
        self.host = get_host()
        self.host.configure(self.settings)
        self._lock = threading.Lock()
        self._sandboxes: dict[str, _Entry] = {}
        self._reserving = 0
        self._creating: set[str] = set()  # ids whose create is in flight here
        self._doomed: set[str] = set()  # ... and whose destroy came meanwhile
        self._feeds: dict[str, tuple[Feed, str]] = {}
        self._intakes: dict[str, tuple[Intake, threading.Thread, list[Any], str]] = {}
        self._leases = Leases(self._job_dead)
        self._backends = self._probe()
        self.reconcile()
        threading.Thread(target=self._sweep_forever, name="corral-agent-sweep", daemon=True).start()

    # -- what the node offers -------------------------------------------------------

    def _probe(self) -> dict[str, tuple[bool, str, int]]:
        """Each backend of the node: available (checked once, when made), why not, and
        what it enforces."""
        found = {}
        for name in self.host.backends():
            if name == "ray":
                continue
            try:
                caps = self.host.backend(name, self.settings).capabilities()
            except SandboxError as e:  # unavailable: the check's reason (and fix)
                found[name] = (False, e.message, 0)
                continue
            found[name] = (True, "", caps.value)
        return found

    def _default(self) -> str | None:
        """The node's ``backend`` setting where available; else the first available
        backend that isolates, corral's own first (local, docker, podman)."""
        configured = self.settings.backend
        if configured in self._backends and self._backends[configured][0]:
            return configured
        others = sorted(set(self._backends) - set(_BUILT_IN))
        for name in (*_BUILT_IN, *others):
            ok, _, caps = self._backends.get(name, (False, "", 0))
            if ok and Capability.ISOLATION in Capability(caps):
                return name
        return None

    def report(self) -> wire.NodeReport:
        with self._lock:
            count = len(self._sandboxes) + self._reserving
        return wire.NodeReport(self.node, self._default(), self._backends, count, _version())

    def _backend(self, name: str) -> Backend:
        return self.host.backend(name, self.settings)

    def _of(self, sandbox_id: str) -> Backend:
        with self._lock:
            entry = self._sandboxes.get(sandbox_id)
        if entry is None:
            entry = self._adopt(sandbox_id)
        return self._backend(entry.backend)

    def _adopt(self, sandbox_id: str) -> _Entry:
        """A sandbox of this node this agent does not know yet (a previous agent's, not
        seen by a listing: the first one after a restart can miss a sandbox whose old
        agent was still going away), taken on when its group still stands."""
        for name, (ok, _, _) in self._backends.items():
            if not ok:
                continue
            try:
                info, _ = self._backend(name).inspect(sandbox_id)
            except SandboxError:
                continue
            labels = info.labels
            group = labels.get(LABEL_GROUP, "")
            if (
                labels.get(LABEL_NODE) == self.node.id
                and labels.get(LABEL_BACKEND) == name
                and self._owns(labels)
                and group in standing_groups(self.namespace)
            ):
                entry = _Entry(name, group, _sweep_at(info))
                with self._lock:
                    return self._sandboxes.setdefault(sandbox_id, entry)
        raise NotFoundError(
            f"no sandbox {sandbox_id} on node {self.node}", backend="ray", sandbox_id=sandbox_id
        )

    # -- lifecycle --------------------------------------------------------------------

    @answers
    def create(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        labels: dict[str, str],
        backend: str | None,
        bundle: dict[str, float],
        max_per_node: int | None,
        mount_roots: tuple[str, ...],
        wait: float,
    ) -> NodeInfo | wire.Full:
        """Reserve the bundle on this node, then make the sandbox with the node's backend."""
        name = backend or self._default()
        if name is None or name not in self._backends or not self._backends[name][0]:
            why = self._backends.get(name or "", (False, "not installed", 0))[1]
            raise BackendUnavailableError(
                f"node {self.node} cannot run the {name or 'any'} backend: {why}", backend="ray"
            )
        with self._lock:
            if max_per_node is not None and len(self._sandboxes) + self._reserving >= max_per_node:
                return wire.Full(f"max_per_node ({max_per_node}) reached")
            self._reserving += 1
            self._creating.add(sandbox_id)
        try:
            group = self._reserve(sandbox_id, bundle)
            if isinstance(group, wire.Full):
                return group
            # Made while Ray places the group (a few ms: about what the making takes),
            # and answered only once it is placed: no command runs in the sandbox
            # before its resources are held.
            try:
                self._make(sandbox_id, spec, labels, name, group.id.hex(), mount_roots)
            except BaseException:
                _remove_group(group.id.hex())
                raise
            if not _placed(group, wait):
                _quietly(functools.partial(self._backend(name).destroy, sandbox_id))
                _remove_group(group.id.hex())
                return wire.Full("no room", self._short_of(bundle))
            with self._lock:
                self._sandboxes[sandbox_id] = _Entry(name, group.id.hex(), _expires(labels))
                doomed = sandbox_id in self._doomed
            if doomed:  # its driver gave up waiting and asked for it gone
                self.destroy(sandbox_id)
                raise BackendUnavailableError(
                    f"sandbox {sandbox_id} was removed while it was made", backend="ray"
                )
            return self.node
        finally:
            with self._lock:
                self._reserving -= 1
                self._creating.discard(sandbox_id)
                self._doomed.discard(sandbox_id)

    def _reserve(self, sandbox_id: str, bundle: dict[str, float]) -> Any:
        """The sandbox's placement group on this node, asked of Ray; or Full. A group is
        asked for only when the node has the bundle free: Ray (2.60) can keep a bundle's
        resources reserved for good when its group is removed while being placed, so
        groups that would only wait and be removed are not made at all."""
        from ray.util.placement_group import placement_group

        short = self._short_of(bundle)
        if short is not None:
            return wire.Full("no room", short)
        return placement_group(
            [bundle],
            name=group_name(self.namespace, sandbox_id, self.node.id),
            lifetime="detached",  # released by destroy, or by a sweep at lifetime's end
            bundle_label_selector=[{"ray.io/node-id": self.node.id}],
        )

    def _short_of(self, bundle: dict[str, float]) -> str | None:
        """The first resource of ``bundle`` this node has too little of free now."""
        try:
            from ray._private.state import available_resources_per_node

            free = available_resources_per_node().get(self.node.id, {})
        except Exception:  # a private call: without it the error names no resource
            return None
        return next((r for r, amount in bundle.items() if free.get(r, 0.0) < amount), None)

    def _make(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        labels: dict[str, str],
        name: str,
        group: str,
        mount_roots: tuple[str, ...],
    ) -> None:
        """The node's own checks, then its backend's create: what ``corral.create`` does
        on one host, for a sandbox whose id and labels the driver chose."""
        settings = self.settings
        if settings.mount_roots is None:  # the node's own, where its operator set them
            settings = attrs.evolve(settings, mount_roots=mount_roots)
        chosen = self._backend(name)
        spec = apply_policy(spec, settings)
        self.host.hooks.check_spec(spec, name)
        check_capabilities(chosen, spec)
        labels = {**labels, **self._labels(name), LABEL_GROUP: group}
        try:
            chosen.create(sandbox_id, spec, labels)
        except BaseException:
            try:
                chosen.destroy(sandbox_id)
            except SandboxError:
                log.exception("cleaning up sandbox %s after a failed create", sandbox_id)
            raise

    def _labels(self, backend: str) -> dict[str, str]:
        """What marks a sandbox or a snapshot as this node's, made with ``backend``."""
        return {
            "corral.backend": backend,  # the node backend's own, which it looks for
            LABEL_NODE: self.node.id,
            LABEL_CLUSTER: self.cluster,
            LABEL_NAMESPACE: self.namespace,
            LABEL_BACKEND: backend,
        }

    @answers
    def destroy(self, sandbox_id: str) -> None:
        with self._lock:
            entry = self._sandboxes.get(sandbox_id)
            creating = sandbox_id in self._creating
            if entry is None and creating:
                self._doomed.add(sandbox_id)  # removed as soon as its create ends
        if entry is None and not creating:
            with contextlib.suppress(NotFoundError):
                entry = self._adopt(sandbox_id)
        if entry is None:
            return  # gone is fine
        self._remove(entry.backend, sandbox_id)
        _remove_group(entry.group)
        with self._lock:
            self._sandboxes.pop(sandbox_id, None)

    @answers
    def inspect(self, sandbox_id: str) -> tuple[SandboxInfo, SandboxSpec]:
        info, spec = self._of(sandbox_id).inspect(sandbox_id)
        return self._ours(info), spec

    @answers
    def list(self) -> list[SandboxInfo]:
        with self._lock:
            names = {entry.backend for entry in self._sandboxes.values()}
        found = []
        for name in sorted(names):
            for info in self._backend(name).list():
                if info.labels.get(LABEL_NODE) == self.node.id and self._owns(info.labels):
                    found.append(self._ours(info))
        return found

    def _owns(self, labels: dict[str, str]) -> bool:
        return (
            labels.get(LABEL_CLUSTER) == self.cluster
            and labels.get(LABEL_NAMESPACE) == self.namespace
        )

    def _ours(self, info: SandboxInfo) -> SandboxInfo:
        return attrs.evolve(info, backend="ray", node=self.node)

    @answers
    def alive(self, sandbox_id: str) -> bool:
        return self._of(sandbox_id).alive(sandbox_id)

    @answers
    def usage(self, sandbox_id: str) -> ResourceUsage:
        return self._of(sandbox_id).usage(sandbox_id)

    @answers
    def health(self, sandbox_id: str) -> Health:
        return self._of(sandbox_id).health(sandbox_id)

    @answers
    def pause(self, sandbox_id: str) -> None:
        self._of(sandbox_id).pause(sandbox_id)

    @answers
    def resume(self, sandbox_id: str) -> None:
        self._of(sandbox_id).resume(sandbox_id)

    def _remove(self, backend: str, sandbox_id: str) -> None:
        """The sandbox gone from its backend, and then its processes' keeper and folder
        on this node (the keeper's commands end with the sandbox)."""
        chosen = self._backend(backend)
        chosen.destroy(sandbox_id)
        chosen.forget_processes(sandbox_id)

    # -- long-lived sandboxes: the node backend's own, each refusing without its flag --

    @answers
    def extend(self, sandbox_id: str, expires: float) -> None:
        """Move the sandbox's end on its backend, then this agent's sweep with it."""
        self._of(sandbox_id).extend(sandbox_id, expires)
        with self._lock:
            entry = self._sandboxes.get(sandbox_id)
            if entry is not None:
                entry.expires = expires + 1.0 + _SWEEP_GRACE

    @answers
    def port(self, sandbox_id: str, port: int) -> tuple[str, int]:
        return self._of(sandbox_id).port(sandbox_id, port)

    @answers
    def changes(self, sandbox_id: str) -> builtins.list[Change]:
        return self._of(sandbox_id).changes(sandbox_id)

    @answers
    def exec_signal(self, sandbox_id: str, name: str, signum: int) -> None:
        self._of(sandbox_id).exec_signal(sandbox_id, name, signum)

    @answers
    def exec_resize(self, sandbox_id: str, name: str, rows: int, cols: int) -> None:
        self._of(sandbox_id).exec_resize(sandbox_id, name, rows, cols)

    # The node backend's default process methods: corral's keeper, started from this
    # process, runs the sandbox's processes on this node and outlives this agent.

    @answers
    def spawn(
        self, sandbox_id: str, request: ExecRequest, idle_timeout: float | None
    ) -> ProcessInfo:
        return self._of(sandbox_id).spawn(sandbox_id, request, idle_timeout)

    @answers
    def processes(self, sandbox_id: str) -> builtins.list[ProcessInfo]:
        return self._of(sandbox_id).processes(sandbox_id)

    @answers
    def process_read(
        self, sandbox_id: str, process_id: str, offset: int, wait: float
    ) -> ProcessRead:
        """At most ``_READ_MOST`` seconds of waiting: a longer wait is the driver's
        loop of such calls, so no thread of the agent waits long on one."""
        backend = self._of(sandbox_id)
        return backend.process_read(sandbox_id, process_id, offset, min(wait, _READ_MOST))

    @answers
    def process_control(
        self, sandbox_id: str, process_id: str, op: str, args: dict[str, Any]
    ) -> None:
        self._of(sandbox_id).process_control(sandbox_id, process_id, op, **args)

    @answers
    def forget_processes(self, sandbox_id: str) -> None:
        self._of(sandbox_id).forget_processes(sandbox_id)

    @answers
    def snapshot(
        self, sandbox_id: str, snapshot_id: str, labels: dict[str, str], memory: bool
    ) -> SnapshotInfo:
        """The node backend's snapshot, labelled as this node's (only this node can
        start sandboxes from it)."""
        with self._lock:
            entry = self._sandboxes.get(sandbox_id)
        if entry is None:
            entry = self._adopt(sandbox_id)
        labels = {**labels, **self._labels(entry.backend)}
        info = self._backend(entry.backend).snapshot(sandbox_id, snapshot_id, labels, memory)
        return attrs.evolve(info, backend="ray")

    def _snapshots_here(self, strict: bool) -> builtins.list[tuple[str, SnapshotInfo]]:
        """This node's snapshots of this cluster's namespace, with the backend of each.
        A backend that fails to list (an engine busy removing images another program
        made) leaves out only its own, unless ``strict``."""
        found = []
        for name, (ok, _, _) in sorted(self._backends.items()):
            if not ok:
                continue
            try:
                listed = self._backend(name).snapshots()
            except SandboxError:
                if strict:
                    raise
                log.exception("node agent %s: listing %s snapshots failed", self.node, name)
                continue
            for info in listed:
                labels = info.labels
                if (
                    labels.get(LABEL_NODE) == self.node.id
                    and labels.get(LABEL_BACKEND) == name
                    and self._owns(labels)
                ):
                    found.append((name, info))
        return found

    @answers
    def snapshots(self) -> builtins.list[SnapshotInfo]:
        return [attrs.evolve(info, backend="ray") for _, info in self._snapshots_here(False)]

    @answers
    def remove_snapshot(self, snapshot_id: str) -> None:
        """Remove one of this node's snapshots; one it does not hold is fine (gone)."""
        for name, info in self._snapshots_here(True):
            if info.id == snapshot_id:
                self._backend(name).remove_snapshot(snapshot_id)

    # -- exec -------------------------------------------------------------------------

    @answers
    def exec(
        self, sandbox_id: str, request: ExecRequest, job: str, watched: bool, wait: float
    ) -> wire.ExecReply:
        """Start the command, and answer its first output (or its end, for a quick one)."""
        backend = self._of(sandbox_id)
        feed = Feed(_FEED_LIMIT)
        sent = {"stdout": 0, "stderr": 0}

        def forward(chunk: OutputChunk) -> None:
            data = chunk.data
            if not watched:  # nobody streams: past the cap (and a byte to say so) stays
                room = max(request.max_output + 1 - sent[chunk.stream], 0)
                if len(data) > room:
                    data = data[:room]
                    feed.dropped = True
                sent[chunk.stream] += len(data)
            if data:
                # Abandoned: the driver is gone, and the command is being stopped.
                with contextlib.suppress(Abandoned):
                    feed.put((chunk.stream, data), len(data))

        sink = OutputSink(request.max_output, on_chunk=forward, cancel=feed.cancelled)

        def run() -> None:
            end: Any
            try:
                end = backend.exec(sandbox_id, request, sink)
            except SandboxError as e:
                end = wire.failure(e)
            except BaseException as e:
                end = wire.failure(InternalError(f"exec on node {self.node} failed: {e}"))
            feed.finish(end)

        token = self._serve(feed, job, run, f"corral-exec-{sandbox_id}")
        return self._exec_reply(token, wait)

    def _serve(self, feed: Feed, job: str, fill: Callable[[], None], name: str) -> str:
        """A token for ``feed``, whose driver (Ray job ``job``) takes what the thread
        running ``fill`` puts in it."""
        token = uuid.uuid4().hex
        with self._lock:
            self._feeds[token] = (feed, job)
        threading.Thread(target=fill, name=name, daemon=True).start()
        return token

    @answers
    def exec_more(self, token: str, wait: float) -> wire.ExecReply:
        return self._exec_reply(token, wait)

    def _exec_reply(self, token: str, wait: float) -> wire.ExecReply:
        feed = self._feed(token)
        chunks, end = feed.take(wait, _REPLY_MOST)
        if isinstance(end, wire.Failure):
            self._forget(token)
            wire.raise_failure(end)
        if end is not None:
            self._forget(token)
        return wire.ExecReply(token, tuple(chunks), end, dropped=feed.dropped)

    @answers
    def cancel(self, token: str) -> None:
        with self._lock:
            held = self._feeds.get(token)
        if held is not None:
            held[0].cancelled.set()

    @answers
    def drop(self, token: str) -> None:
        """The driver stopped reading or sending: the stream's node side stops too."""
        with self._lock:
            held = self._feeds.pop(token, None)
            intake = self._intakes.pop(token, None)
        if held is not None:
            held[0].abandon()
        if intake is not None:
            intake[0].abandon()

    def _feed(self, token: str) -> Feed:
        with self._lock:
            held = self._feeds.get(token)
        if held is None:
            raise NotFoundError(
                f"the stream {token} is not known on node {self.node} (it ended, or the "
                "node agent restarted)",
                backend="ray",
            )
        return held[0]

    def _forget(self, token: str) -> None:
        with self._lock:
            self._feeds.pop(token, None)

    # -- files ------------------------------------------------------------------------

    @answers
    def get_archive(self, sandbox_id: str, path: str, job: str, wait: float) -> wire.Reply:
        """Start reading ``path`` as a tar stream; the first chunks."""
        backend = self._of(sandbox_id)
        feed = Feed(_FEED_LIMIT)

        def run() -> None:
            end: Any = True
            chunks: Iterator[bytes] | None = None
            try:
                chunks = backend.get_archive(sandbox_id, path)
                for chunk in chunks:
                    feed.put(chunk, len(chunk))
            except Abandoned:
                pass
            except SandboxError as e:
                end = wire.failure(e)
            except BaseException as e:
                end = wire.failure(InternalError(f"reading {path} on node {self.node}: {e}"))
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
            feed.finish(end)

        token = self._serve(feed, job, run, f"corral-get-{sandbox_id}")
        return self._reply(token, wait)

    @answers
    def get_more(self, token: str, wait: float) -> wire.Reply:
        return self._reply(token, wait)

    def _reply(self, token: str, wait: float) -> wire.Reply:
        chunks, end = self._feed(token).take(wait, _REPLY_MOST)
        if end is not None:
            self._forget(token)
            if isinstance(end, wire.Failure):
                wire.raise_failure(end)
        return wire.Reply(token, tuple(chunks), done=end is not None)

    @answers
    def put_archive(
        self, sandbox_id: str, path: str, data: bytes, last: bool, job: str
    ) -> str | None:
        """Unpack a tar into ``path``: all of it now (``last``), or its first chunk, the
        rest following by ``put_more`` under the token answered."""
        backend = self._of(sandbox_id)
        if last:
            backend.put_archive(sandbox_id, path, io.BytesIO(data))
            return None
        intake = Intake(_FEED_LIMIT)
        result: list[Any] = []

        def run() -> None:
            try:
                backend.put_archive(sandbox_id, path, io.BufferedReader(intake))
                result.append(None)
            except Abandoned:
                result.append(None)
            except SandboxError as e:
                result.append(wire.failure(e))
            except BaseException as e:
                result.append(wire.failure(InternalError(f"writing {path} on {self.node}: {e}")))
            finally:
                intake.abandon()  # a driver still sending is not left waiting

        token = uuid.uuid4().hex
        worker = threading.Thread(target=run, name=f"corral-put-{sandbox_id}", daemon=True)
        with self._lock:
            self._intakes[token] = (intake, worker, result, job)
        worker.start()
        intake.feed(data, last=False)
        return token

    @answers
    def put_more(self, token: str, data: bytes, last: bool) -> None:
        with self._lock:
            held = self._intakes.get(token)
        if held is None:
            raise NotFoundError(f"the upload {token} is not known on node {self.node}")
        intake, worker, result, _ = held
        intake.feed(data, last)
        if not last and not result:
            return
        worker.join()
        with self._lock:
            self._intakes.pop(token, None)
        if result and isinstance(result[0], wire.Failure):
            wire.raise_failure(result[0])

    # -- upkeep -----------------------------------------------------------------------

    def _job_dead(self, job: str) -> bool:
        import ray

        gcs = ray._private.worker.global_worker.gcs_client  # type: ignore[attr-defined]
        jobs = gcs.get_all_job_info(
            job_or_submission_id=job, skip_submission_job_info_field=True, timeout=5
        )
        return all(info.is_dead for info in jobs.values())

    def _sweep_forever(self) -> None:
        rounds = 0
        while True:
            time.sleep(_SWEEP_EVERY)
            rounds += 1
            try:
                self.sweep()
                if rounds % _RECONCILE_EVERY == 0:
                    self.reconcile()
            except Exception:
                log.exception("node agent %s: sweep failed", self.node.id[:12])

    def sweep(self) -> None:
        """Remove sandboxes past their lifetime; drop streams whose driver is gone."""
        now = time.time()
        with self._lock:
            expired = [sid for sid, entry in self._sandboxes.items() if entry.expires <= now]
            feeds = list(self._feeds.items())
            intakes = list(self._intakes.items())
        for sandbox_id in expired:
            self.destroy(sandbox_id)
        for token, (feed, job) in feeds:
            if self._leases.expired(feed.touched, job):
                feed.abandon()
                self._forget(token)
        for token, (intake, _, _, job) in intakes:
            if self._leases.expired(intake.touched, job):
                intake.abandon()
                with self._lock:
                    self._intakes.pop(token, None)

    def reconcile(self) -> None:
        """Match what this agent knows with what the node's backends hold.

        A sandbox of this node whose placement group still stands is (again) this
        agent's; one without is removed. A sandbox of a node that is no longer in the
        cluster (on a machine that runs several nodes, or a raylet that restarted with a
        new id) is removed, and so is its group; an entry whose sandbox is gone has its
        group released.
        """
        import ray

        began = time.monotonic()
        listed: list[tuple[str, SandboxInfo]] = []
        for name, (ok, _, _) in self._backends.items():
            if ok:
                with contextlib.suppress(SandboxError):
                    listed.extend((name, info) for info in self._backend(name).list())
        # Read after the listing: a sandbox listed had its group and node before it.
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        groups = standing_groups(self.namespace)
        held: set[str] = set()
        listed_ids = {info.id for _, info in listed}
        for name, info in listed:
            node = info.labels.get(LABEL_NODE)
            group = info.labels.get(LABEL_GROUP, "")
            if (
                node is None
                or info.labels.get(LABEL_BACKEND) != name
                or not self._owns(info.labels)
            ):
                continue  # not a ray sandbox of this cluster's namespace
            if node == self.node.id and group in groups:
                held.add(info.id)
                with self._lock:
                    entry = self._sandboxes.setdefault(info.id, _Entry(name, group, 0.0))
                    # An end moved by extend is the backend's to say (labels stay).
                    entry.expires = max(entry.expires, _sweep_at(info))
            elif node == self.node.id or node not in alive:
                log.info("node agent %s: removing stray sandbox %s", self.node, info.id)
                _quietly(functools.partial(self._remove, name, info.id))
                _remove_group(group)
        # Known before the listing began and not in it: removed on the node (its own
        # lifetime), or its group is gone. (One made since may not be listed yet.)
        with self._lock:
            gone = [
                sid
                for sid, entry in self._sandboxes.items()
                if sid not in held and entry.known < began
            ]
        for sandbox_id in gone:
            self.destroy(sandbox_id)
        # A group of this node with no sandbox (its create broke off: a killed agent,
        # a driver gone mid-way) holds resources for nothing.
        for gid, (sandbox_id, node) in groups.items():
            with self._lock:
                busy = sandbox_id in self._creating or sandbox_id in self._sandboxes
            if node == self.node.id and sandbox_id not in listed_ids and not busy:
                log.info("node agent %s: releasing the group of gone %s", self.node, sandbox_id)
                _remove_group(gid)

    def ping(self) -> int:
        return os.getpid()


def _sweep_at(info: SandboxInfo) -> float:
    """When the sweep removes a listed sandbox: by its labels, or by the end its
    backend reports when later (an ``extend`` moves that one, not the labels)."""
    return max(_expires(info.labels), info.expires + 1.0 + _SWEEP_GRACE)


def _expires(labels: dict[str, str]) -> float:
    """When the sweep removes the sandbox: its lifetime's end (the label is rounded down
    to the second) and a grace after it, so that a command cut by the lifetime ends by
    its own timeout, reported as one, before the sweep takes the sandbox away."""
    try:
        return float(labels["corral.expires"]) + 1.0 + _SWEEP_GRACE
    except (KeyError, ValueError):
        raise ConfigError("labels", "a sandbox without corral.expires") from None


def _placed(group: Any, wait: float) -> bool:
    """Whether the group holds its bundle within ``wait`` seconds. Read from the
    cluster's table, not by ``group.wait()``: that runs a task in the bundle, which
    costs a worker process on the node."""
    from ray.util.placement_group import placement_group_table

    deadline = time.monotonic() + wait
    pause = 0.002
    while True:
        if placement_group_table(group)["state"] == "CREATED":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _version() -> str:
    from ... import __version__

    return __version__


def _log_to_stderr() -> None:
    import logging

    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _remove_group(group: str) -> None:
    from ray import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    if not group:
        return
    try:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group))))
    except Exception:  # removed already, or the head is away: a later sweep retries
        log.debug("placement group %s not removed", group, exc_info=True)


def _quietly(call: Callable[[], Any]) -> None:
    try:
        call()
    except SandboxError:
        log.exception("node agent cleanup failed")
