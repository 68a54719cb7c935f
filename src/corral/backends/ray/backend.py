"""The ray backend, as the driver sees it: sandboxes on the nodes of a Ray cluster.

Each node runs one agent (``agent.NodeAgent``, a detached Ray actor) that makes and
serves the node's sandboxes with the node's own corral backend. This side chooses a
node, reserves the sandbox's resources there through its agent, and forwards every
call; nothing is kept here that another driver could not find again: a sandbox's
placement group is named after it and its node (``corral.<id>.<node>``).

Long-lived sandboxes are the node's too: background processes run under corral's
keeper on the sandbox's node (the five process methods go to the node agent, whose
node backend starts the keeper there), and a snapshot stays on the node that took it
(its labels name the node), so a sandbox started from one is made on that node.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import logging
import operator
import os
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any

from ... import __version__
from ...core.backend import (
    Availability,
    Backend,
    Capability,
    ExecStatus,
    is_snapshot_image,
    required_capabilities,
    snapshot_id_of,
)
from ...core.errors import (
    BackendUnavailableError,
    CapabilityError,
    CapacityError,
    NotFoundError,
    SandboxError,
)
from ...core.output import OutputSink
from ...core.results import (
    LOST,
    Change,
    Health,
    NodeInfo,
    ProcessInfo,
    ProcessRead,
    ResourceUsage,
    SandboxInfo,
    SnapshotInfo,
)
from ...core.spec import ExecRequest, Mount, SandboxSpec
from . import placement, wire
from .agent import LABEL_BACKEND, LABEL_NODE, NodeAgent, agent_name, standing_groups
from .settings import RaySettings

__all__ = ["RayBackend"]

_FIRST_WAIT = 0.5  # seconds an exec's first call waits for output or the end
_POLL_WAIT = 0.5  # ... and each later one (also how soon a cancel is noticed)
_RESERVE_WAIT = 2.0  # seconds a node with the room free waits for its group to be placed
_REPORTS_FRESH = 2.0  # seconds the nodes' reports are reused for placement
_CHUNK = 512 * 1024  # bytes of an archive per call into a node
_READ_STEP = 1.0  # seconds one call for a process's output waits on the node
# Seconds a process call may take on the node beyond call_timeout: a keeper's start
# (a spawn), a write waiting for room in the process's stdin (the keeper's 30 s).
_PROCESS_MARGIN = 35.0
# Not carried through ray: a memory snapshot is untested across the hop (docs/cluster.md).
_NOT_THROUGH_RAY = Capability.MEMORY_SNAPSHOTS
_START_HINT = "ray start --head (then `ray start --address=HEAD:6379` on each other node)"


class RayBackend(Backend):
    """Sandboxes on the nodes of a Ray cluster, each made by its node's corral backend."""

    name = "ray"
    Settings = RaySettings
    capability_conditions = (
        (
            functools.reduce(operator.or_, Capability) & ~_NOT_THROUGH_RAY,
            "where the backend of the sandbox's node enforces it (a create goes only to "
            "such a node; corral doctor lists each node's)",
        ),
    )

    def __init__(self, settings: RaySettings) -> None:
        super().__init__(settings)
        self.settings: RaySettings = settings
        self._lock = threading.RLock()
        self._ray: Any = None
        self._job = ""
        self._agents: dict[str, Any] = {}
        self._reports: dict[str, wire.NodeReport] = {}
        self._node_totals: dict[str, dict[str, float]] = {}
        self._reported = 0.0
        # Nodes this driver chose since the reports were read (creates in flight
        # included), by a token of each create, so that spread sees its own choices.
        self._placed: dict[str, tuple[str, float]] = {}
        self._where: dict[str, str] = {}  # sandbox id: node id
        self._nodes: dict[str, NodeInfo] = {}  # the node of each sandbox made here

    # -- the cluster ------------------------------------------------------------------

    def _address(self) -> str | None:
        if self.settings.address != "auto":
            return self.settings.address
        if os.environ.get("RAY_ADDRESS"):
            return os.environ["RAY_ADDRESS"]
        # Where `ray start --head` records the cluster of this machine.
        recorded = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")
        try:
            with open(recorded) as f:
                return f.read().strip() or None
        except OSError:
            return None

    def check(self) -> Availability:
        if not _installed():
            return Availability(
                False, "the ray package is not installed", "pip install 'corral[ray]'"
            )
        if self._ray is not None:
            return Availability(True, f"connected, namespace {self.settings.namespace}")
        address = self._address()
        if address is None:
            return Availability(
                False, "no Ray cluster runs on this machine (address = auto)", _START_HINT
            )
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=2).close()
        except (OSError, ValueError):
            return Availability(False, f"no Ray cluster answers at {address}", _START_HINT)
        return Availability(True, f"cluster at {address}")

    def _connect(self) -> Any:
        with self._lock:
            if self._ray is not None:
                return self._ray
            try:
                import ray
            except ImportError as e:
                raise BackendUnavailableError(
                    "the ray package is not installed",
                    backend=self.name,
                    fix="pip install 'corral[ray]'",
                ) from e
            if not ray.is_initialized():
                address = self._address()
                if address is None:
                    raise BackendUnavailableError(
                        "no Ray cluster runs on this machine (address = auto)",
                        backend=self.name,
                        fix=_START_HINT,
                    )
                try:
                    ray.init(
                        address=address,
                        namespace=self.settings.namespace,
                        logging_level=logging.WARNING,
                        log_to_driver=False,
                    )
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise BackendUnavailableError(
                        f"cannot join the Ray cluster at {address}: {e}",
                        backend=self.name,
                        fix=_START_HINT,
                    ) from e
            joined = ray.get_runtime_context().gcs_address
            wanted = self.settings.address
            if wanted != "auto" and "://" not in wanted and joined and joined != wanted:
                raise BackendUnavailableError(
                    f"this process is a driver of the Ray cluster at {joined} already, and "
                    f"[backends.ray] address names {wanted}: a process joins one cluster",
                    backend=self.name,
                    fix=f"set [backends.ray] address = {joined!r}, or use another process",
                )
            self._job = ray.get_runtime_context().get_job_id()
            self._ray = ray
            return ray

    def _agent(self, node: str) -> Any:
        """The node's agent, started when it has none (a detached actor: it outlives
        this driver, and serves every driver)."""
        with self._lock:
            handle = self._agents.get(node)
        if handle is not None:
            return handle
        ray = self._connect()
        if node not in self._alive_nodes():  # an actor pinned there would never start
            raise BackendUnavailableError(
                f"node {self._describe(node)} of the Ray cluster is lost",
                backend=self.name,
                retryable=True,
            )
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        handle = (
            _actor_class(ray)
            .options(
                name=agent_name(node),
                namespace=self.settings.namespace,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=1024,  # a waiting call (an exec's output) holds one thread
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            )
            .remote(node, self.settings.namespace)
        )
        with self._lock:
            self._agents[node] = handle
        return handle

    def _alive_nodes(self) -> dict[str, dict[str, Any]]:
        ray = self._connect()
        return {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}

    def _cluster(self, fresh: bool = False) -> dict[str, wire.NodeReport]:
        """Every live node's report, reused for ``_REPORTS_FRESH`` seconds."""
        with self._lock:
            if not fresh and time.monotonic() - self._reported < _REPORTS_FRESH:
                return self._reports
        ray = self._connect()
        began = time.monotonic()  # placements before this are in the reports
        nodes = self._alive_nodes()
        pending = {node: self._agent(node).report.remote() for node in nodes}
        totals = {n: node["Resources"] for n, node in nodes.items()}
        reports = {}
        for node, ref in pending.items():
            try:
                reports[node] = ray.get(ref, timeout=self.settings.call_timeout)
            except Exception:  # a node going away: placement leaves it out
                with self._lock:
                    self._agents.pop(node, None)
        with self._lock:
            self._reports, self._reported = reports, time.monotonic()
            self._node_totals = totals
            self._placed = {k: v for k, v in self._placed.items() if v[1] >= began}
        return reports

    def _call(self, node: str, method: str, *args: Any, timeout: float | None = None) -> Any:
        """A call to the node's agent; its Failure raised here, a lost node a retryable
        error that names it."""
        from ray import exceptions as rx

        try:
            answer = self._ask(node, method, args, timeout)
        except rx.GetTimeoutError as e:
            raise BackendUnavailableError(
                f"node {self._describe(node)} did not answer {method} within "
                f"{timeout or self.settings.call_timeout:g} s",
                backend=self.name,
                retryable=True,
            ) from e
        except (rx.RayActorError, rx.ObjectLostError, rx.RaySystemError, rx.RayTaskError) as e:
            with self._lock:
                self._agents.pop(node, None)
            raise BackendUnavailableError(
                f"node {self._describe(node)} of the Ray cluster is lost or its agent "
                f"failed ({type(e).__name__})",
                backend=self.name,
                retryable=True,
            ) from e
        if isinstance(answer, wire.Failure):
            wire.raise_failure(answer)
        return answer

    def _ask(self, node: str, method: str, args: tuple[Any, ...], timeout: float | None) -> Any:
        """The agent's answer; an agent that died on a live node (killed, crashed) is
        started again and asked once more: it finds its node's sandboxes again."""
        ray = self._connect()
        from ray import exceptions as rx

        bound = timeout or self.settings.call_timeout
        try:
            return ray.get(getattr(self._agent(node), method).remote(*args), timeout=bound)
        except rx.ActorDiedError:
            with self._lock:
                self._agents.pop(node, None)
            if node not in self._alive_nodes():
                raise
        return ray.get(getattr(self._agent(node), method).remote(*args), timeout=bound)

    def _describe(self, node: str) -> str:
        report = self._reports.get(node)
        return str(report.node) if report is not None else node[:12]

    # -- capabilities -----------------------------------------------------------------

    def capabilities(self) -> Capability:
        """What some node's backend enforces (a create goes only to a node that enforces
        all the spec asks for)."""
        have = Capability(0)
        why = {}
        reports = self._cluster()
        for node, report in reports.items():
            name = placement.backend_of(report, self.settings.node_backend)
            ok, reason, caps = report.backends.get(name or "", (False, "not installed", 0))
            if ok:
                have |= Capability(caps)
            else:
                why[node] = f"{name or 'no backend'}: {reason}"
        if len(why) == len(reports):  # no node at all: say so, not what it would enforce
            reasons = "; ".join(f"node {self._describe(n)}: {w}" for n, w in why.items())
            raise BackendUnavailableError(
                f"no node of the Ray cluster can run the "
                f"{self.settings.node_backend or 'default'} backend: {reasons or 'no nodes'}",
                backend=self.name,
                fix="install and start that backend on the nodes, or set "
                "[backends.ray] node_backend (corral doctor on a node says what is missing)",
            )
        return have & ~_NOT_THROUGH_RAY

    def capability_hint(self, missing: Capability) -> str:
        if missing & _NOT_THROUGH_RAY:
            return "memory snapshots are not carried through ray (untested across the hop)"
        chosen = self.settings.node_backend or "their default backend"
        return f"no node of the Ray cluster enforces it with {chosen}"

    def diagnose(self) -> builtins.list[str]:
        lines = []
        for report in self._cluster(fresh=True).values():
            backends = ", ".join(
                name + ("" if ok else f" (unavailable: {why})")
                for name, (ok, why, _) in report.backends.items()
            )
            lines.append(
                f"node {report.node}: {report.sandboxes} sandboxes; default backend "
                f"{report.default}; backends: {backends}"
            )
        return lines

    # -- lifecycle --------------------------------------------------------------------

    def create(self, sandbox_id: str, spec: SandboxSpec, labels: dict[str, str]) -> None:
        need = Capability(0)
        for cap in required_capabilities(spec):
            need |= cap
        want = placement.bundle(spec, self.settings.resources)
        # The driver's policy let these sources in; a node whose operator set no
        # mount_roots of its own takes them as its roots (its own checks still apply).
        roots = tuple(m.source for m in spec.mounts if isinstance(m, Mount))
        backend, home, started = self.settings.node_backend, None, ""
        if spec.image and is_snapshot_image(spec.image):
            # A snapshot is on one node only, with the backend that took it.
            home, backend = self._snapshot_home(snapshot_id_of(spec.image))
            started = (
                f" (it starts from snapshot {snapshot_id_of(spec.image)}, which only node "
                f"{self._describe(home)} holds)"
            )
        ask = (sandbox_id, spec, labels, backend, want)
        deadline = time.monotonic() + self.settings.placement_timeout
        failed: dict[str, SandboxError] = {}  # nodes whose backend failed the create
        short: set[str] = set()  # resources some node was short of
        fresh = False
        while True:
            for node in self._ranked(want, need, failed, fresh, backend, home, started):
                with self._lock:
                    self._placed[sandbox_id] = (node, time.monotonic())
                try:
                    answer = self._call(
                        node, "create", *ask, self.settings.max_per_node, roots, _RESERVE_WAIT
                    )
                except BackendUnavailableError as e:  # that node, not the spec
                    failed[node], answer = e, None
                if isinstance(answer, NodeInfo):
                    with self._lock:
                        self._where[sandbox_id] = node
                        self._nodes[sandbox_id] = answer
                    return
                with self._lock:
                    self._placed.pop(sandbox_id, None)
                if isinstance(answer, wire.Full) and answer.resource:
                    short.add(answer.resource)
            if time.monotonic() >= deadline:
                what = " and ".join(sorted(short)) or "room (max_per_node)"
                reserves = ", ".join(f"{placement.shown(r, a)} {r}" for r, a in want.items())
                raise CapacityError(
                    f"no node of the Ray cluster had {what} free for this sandbox within "
                    f"{self.settings.placement_timeout:g} s (it reserves {reserves}){started}",
                    backend=self.name,
                    sandbox_id=sandbox_id,
                )
            time.sleep(0.2)
            fresh = True

    def _ranked(
        self,
        want: dict[str, float],
        need: Capability,
        failed: dict[str, SandboxError],
        fresh: bool,
        backend: str | None,
        home: str | None,
        started: str,
    ) -> builtins.list[str]:
        """The nodes to ask, in the strategy's order: those that can host the sandbox
        (each says whether it has room now); only ``home`` when given (the node holding
        the snapshot it starts from). Raises when no node could ever host it."""
        reports = {n: r for n, r in self._cluster(fresh).items() if n not in failed}
        totals = self._totals()
        impossible = placement.too_big(want, totals)
        if impossible:  # on no node, however long we wait
            raise CapacityError(impossible, backend=self.name)
        fit, why = placement.candidates(
            reports, backend, need, self.settings.max_per_node, __version__
        )
        for node in [n for n in fit if not placement.holds(want, totals.get(n, {}))]:
            fit.remove(node)
            why[node] = "it has too little of " + ", ".join(want)
        if home is not None:
            fit = [n for n in fit if n == home]
            default = "it left the cluster" if home not in failed else "its create failed"
            why = {} if fit else {home: why.get(home, default) + started}
        if not fit and not any("max_per_node" in w for w in why.values()):
            self._refuse(why, failed)  # no node could take it, however long we wait
        with self._lock:
            mine = Counter(node for node, _ in self._placed.values())
        counts = {n: reports[n].sandboxes + mine[n] for n in fit}
        return placement.ordered(fit, counts, self.settings.strategy)

    def _refuse(self, why: dict[str, str], failed: dict[str, SandboxError]) -> None:
        """Raise why no node can host the sandbox: what it asks that no node's backend
        enforces, else what a node answered when asked, else why none has a backend."""
        reasons = "; ".join(f"node {self._describe(n)}: {w}" for n, w in why.items())
        if any("cannot enforce" in w for w in why.values()):
            raise CapabilityError(
                f"no node of the Ray cluster can host this sandbox: {reasons}",
                backend=self.name,
            )
        if failed:
            raise next(iter(failed.values()))
        raise BackendUnavailableError(
            f"no node of the Ray cluster can host this sandbox: {reasons or 'no nodes'}",
            backend=self.name,
            fix="install and start a corral backend on the nodes "
            "(corral doctor on a node says what is missing)",
        )

    def _totals(self) -> dict[str, dict[str, float]]:
        """What each live node has in all, as read with the reports."""
        with self._lock:
            return self._node_totals

    def _node_of(self, sandbox_id: str) -> str:
        """The node a sandbox is on: known here, else read from its placement group's
        name; a node that is gone is a retryable error naming it."""
        with self._lock:
            node = self._where.get(sandbox_id)
        if node is None:
            node = self._groups().get(sandbox_id, (None, None))[0]
            if node is None:
                raise NotFoundError(
                    f"no sandbox {sandbox_id} in the Ray cluster",
                    backend=self.name,
                    sandbox_id=sandbox_id,
                )
            with self._lock:
                self._where[sandbox_id] = node
        return node

    def _groups(self) -> dict[str, tuple[str, str]]:
        """Each corral sandbox's node and placement group id, from the cluster's table."""
        self._connect()
        groups = standing_groups(self.settings.namespace)
        return {sandbox_id: (node, gid) for gid, (sandbox_id, node) in groups.items()}

    def _on(self, sandbox_id: str, method: str, *args: Any, timeout: float | None = None) -> Any:
        node = self._node_of(sandbox_id)
        try:
            return self._call(node, method, sandbox_id, *args, timeout=timeout)
        except BackendUnavailableError as e:
            if e.sandbox_id is None:
                e.sandbox_id = sandbox_id
            raise

    def destroy(self, sandbox_id: str) -> None:
        try:
            node = self._node_of(sandbox_id)
        except NotFoundError:
            return
        if node in self._alive_nodes():
            self._call(node, "destroy", sandbox_id)
        else:  # the node is gone: release what the cluster still holds for it
            gid = self._groups().get(sandbox_id, (None, ""))[1]
            from .agent import _remove_group

            _remove_group(gid)
        with self._lock:
            self._where.pop(sandbox_id, None)
            self._nodes.pop(sandbox_id, None)

    def node_of(self, sandbox_id: str) -> NodeInfo | None:
        with self._lock:
            return self._nodes.get(sandbox_id)

    def inspect(self, sandbox_id: str) -> tuple[SandboxInfo, SandboxSpec]:
        info, spec = self._on(sandbox_id, "inspect")
        return info, spec

    def list(self) -> builtins.list[SandboxInfo]:
        """Every node's sandboxes, asked of all agents at once; those of a node that is
        gone, or whose agent does not answer, from their placement groups as ``lost``."""
        ray = self._connect()
        answers = self._everywhere("list")
        found: builtins.list[SandboxInfo] = [info for answer in answers.values() for info in answer]
        answered = set(answers)
        listed = {info.id for info in found}
        every = {n["NodeID"]: n for n in ray.nodes()}
        for sandbox_id, (node, _) in self._groups().items():
            if node not in answered and sandbox_id not in listed:
                address = every.get(node, {}).get("NodeManagerAddress", "?")
                lost = NodeInfo(node, address)
                # When it was made and until when are the node's to say: unknown here,
                # so gc releases it at once.
                found.append(SandboxInfo(sandbox_id, self.name, LOST, 0.0, 0.0, node=lost))
        return found

    def alive(self, sandbox_id: str) -> bool:
        try:
            return bool(self._on(sandbox_id, "alive"))
        except SandboxError:
            return False

    def usage(self, sandbox_id: str) -> ResourceUsage:
        usage: ResourceUsage = self._on(sandbox_id, "usage")
        return usage

    def health(self, sandbox_id: str) -> Health:
        health: Health = self._on(sandbox_id, "health")
        return health

    def pause(self, sandbox_id: str) -> None:
        self._on(sandbox_id, "pause")

    def resume(self, sandbox_id: str) -> None:
        self._on(sandbox_id, "resume")

    # -- long-lived sandboxes: each the node backend's, refused there without its flag --

    def extend(self, sandbox_id: str, expires: float) -> None:
        """On the node backend, and in the node agent's sweep."""
        self._on(sandbox_id, "extend", expires)

    def port(self, sandbox_id: str, port: int) -> tuple[str, int]:
        """Where the node backend published ``port``: on the node's loopback, so
        reachable from a driver on the node's own machine only (docs/cluster.md)."""
        host, published = self._on(sandbox_id, "port", port)
        return host, published

    def changes(self, sandbox_id: str) -> builtins.list[Change]:
        changes: builtins.list[Change] = self._on(sandbox_id, "changes")
        return changes

    def exec_signal(self, sandbox_id: str, name: str, signum: int) -> None:
        # The keeper runs on the node and signals there; this serves other callers.
        self._on(sandbox_id, "exec_signal", name, signum)

    def exec_resize(self, sandbox_id: str, name: str, rows: int, cols: int) -> None:
        self._on(sandbox_id, "exec_resize", name, rows, cols)

    # The five process methods together (Backend.spawn says why): the keeper is the
    # node's, so that processes run, and are kept, where their sandbox is.

    def spawn(
        self, sandbox_id: str, request: ExecRequest, idle_timeout: float | None
    ) -> ProcessInfo:
        bound = self.settings.call_timeout + _PROCESS_MARGIN
        info: ProcessInfo = self._on(sandbox_id, "spawn", request, idle_timeout, timeout=bound)
        return info

    def processes(self, sandbox_id: str) -> builtins.list[ProcessInfo]:
        found: builtins.list[ProcessInfo] = self._on(sandbox_id, "processes")
        return found

    def process_read(
        self, sandbox_id: str, process_id: str, offset: int, wait: float
    ) -> ProcessRead:
        """Calls of at most ``_READ_STEP`` seconds' wait each, until output, the end,
        or ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while True:
            step = max(0.0, min(_READ_STEP, deadline - time.monotonic()))
            bound = self.settings.call_timeout + step
            read: ProcessRead = self._on(
                sandbox_id, "process_read", process_id, offset, step, timeout=bound
            )
            if read.chunks or read.result is not None or time.monotonic() >= deadline:
                return read
            offset = read.offset  # from "now" (-1): where now was

    def process_control(self, sandbox_id: str, process_id: str, op: str, **args: Any) -> None:
        bound = self.settings.call_timeout + _PROCESS_MARGIN
        self._on(sandbox_id, "process_control", process_id, op, args, timeout=bound)

    def forget_processes(self, sandbox_id: str) -> None:
        """The node forgets a sandbox's processes when it removes the sandbox (a
        destroy, its sweep): only a sandbox still there is asked about."""
        try:
            node = self._node_of(sandbox_id)
        except NotFoundError:
            return
        bound = self.settings.call_timeout + _PROCESS_MARGIN
        with contextlib.suppress(NotFoundError):  # gone meanwhile: forgotten with it
            self._call(node, "forget_processes", sandbox_id, timeout=bound)

    def snapshot(
        self, sandbox_id: str, snapshot_id: str, labels: dict[str, str], memory: bool
    ) -> SnapshotInfo:
        """Taken by the node backend, on the sandbox's node (named in its labels)."""
        if memory and not self.capabilities() & Capability.MEMORY_SNAPSHOTS:
            raise self._lacks("take memory snapshots", Capability.MEMORY_SNAPSHOTS)
        info: SnapshotInfo = self._on(sandbox_id, "snapshot", snapshot_id, labels, memory)
        return info

    def snapshots(self) -> builtins.list[SnapshotInfo]:
        """Every live node's snapshots, asked of all agents at once."""
        found: builtins.list[SnapshotInfo] = []
        for answer in self._everywhere("snapshots").values():
            found.extend(answer)
        return sorted(found, key=lambda s: (s.created, s.id))

    def remove_snapshot(self, snapshot_id: str) -> None:
        """Asked of every live node (each removes it if it holds it): a node whose
        listing failed for a moment must not make a removal that did nothing look done.
        One no live node holds is gone (fine)."""
        self._everywhere("remove_snapshot", snapshot_id)

    def _snapshot_home(self, snapshot_id: str) -> tuple[str, str]:
        """The node holding the snapshot and the backend that took it."""
        for info in self.snapshots():
            if info.id == snapshot_id:
                return info.labels[LABEL_NODE], info.labels[LABEL_BACKEND]
        raise NotFoundError(
            f"no live node of the Ray cluster holds snapshot {snapshot_id} (removed, or its "
            "node left the cluster)",
            backend=self.name,
            fix="take it again; corral.snapshots(backend='ray') lists the snapshots there are",
        )

    def _everywhere(self, method: str, *args: Any) -> dict[str, Any]:
        """Every live node agent's answer to ``method`` (asked at once); a node that does
        not answer, once more through its agent's restart, else left out."""
        ray = self._connect()
        nodes = self._alive_nodes()
        refs = {node: getattr(self._agent(node), method).remote(*args) for node in nodes}
        answers = {}
        for node, ref in refs.items():
            try:
                answer = ray.get(ref, timeout=self.settings.call_timeout)
            except Exception:
                try:
                    answer = self._call(node, method, *args)
                except BackendUnavailableError:
                    continue
            if isinstance(answer, wire.Failure):
                wire.raise_failure(answer)
            answers[node] = answer
        return answers

    # -- exec and files ---------------------------------------------------------------

    def exec(self, sandbox_id: str, request: ExecRequest, sink: OutputSink) -> ExecStatus:
        node = self._node_of(sandbox_id)
        bound = self.settings.call_timeout + _POLL_WAIT
        reply: wire.ExecReply = self._on(
            sandbox_id, "exec", request, self._job, sink.watched, _FIRST_WAIT, timeout=bound
        )
        cancelled = False
        try:
            while True:
                for stream, data in reply.chunks:
                    sink.write(stream, data)
                if reply.status is not None:
                    if reply.dropped:
                        sink.truncated = True
                    return reply.status
                if sink.cancelled and not cancelled:
                    self._call(node, "cancel", reply.token)
                    cancelled = True
                reply = self._call(node, "exec_more", reply.token, _POLL_WAIT, timeout=bound)
        except BaseException:
            if not cancelled:  # an interrupted driver: stop the command, do not wait
                self._agent(node).cancel.remote(reply.token)
            raise

    def get_archive(self, sandbox_id: str, path: str) -> Iterator[bytes]:
        node = self._node_of(sandbox_id)
        reply: wire.Reply = self._on(sandbox_id, "get_archive", path, self._job, _POLL_WAIT)
        try:
            while True:
                yield from reply.chunks
                if reply.done:
                    return
                reply = self._call(node, "get_more", reply.token, _POLL_WAIT)
        finally:
            if not reply.done:  # the reader stopped early: the node stops reading too
                self._agent(node).drop.remote(reply.token)

    def put_archive(self, sandbox_id: str, path: str, archive: IO[bytes]) -> None:
        node = self._node_of(sandbox_id)
        data = archive.read(_CHUNK)
        following = archive.read(_CHUNK)
        token = self._on(sandbox_id, "put_archive", path, data, not following, self._job)
        if token is None:
            return
        try:
            while following:
                data, following = following, archive.read(_CHUNK)
                self._call(node, "put_more", token, data, not following)
        except BaseException:
            self._agent(node).drop.remote(token)
            raise


def _installed() -> bool:
    """Whether ``import ray`` would work, without importing it (a second or more)."""
    import importlib.util

    try:
        return importlib.util.find_spec("ray") is not None
    except ValueError:  # in sys.modules as None: an import of it fails
        return False


_ACTOR: Any = None


def _actor_class(ray: Any) -> Any:
    global _ACTOR
    if _ACTOR is None:
        _ACTOR = ray.remote(NodeAgent)
    return _ACTOR
