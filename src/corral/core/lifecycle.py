"""Making, finding and removing sandboxes: create, attach, list and gc, through the hooks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import capacity, options
from ._log import log
from .backend import Backend, Capability, required_capabilities
from .convert import structure, unstructure
from .errors import CapabilityError, ConfigError, SandboxError
from .plugins import PluginHost, get_host
from .policy import apply_policy, loosened
from .results import LEFTOVER, LEFTOVER_GRACE, ExecResult, OutputChunk, SandboxInfo
from .sandbox import Sandbox
from .settings import Settings, _merge, load_settings
from .spec import ExecRequest, MountLike, SandboxSpec

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .snapshot import Snapshot

__all__ = [
    "attach",
    "build_spec",
    "check_capabilities",
    "create",
    "gc",
    "list_sandboxes",
    "run",
    "select_backend_name",
]

# corral.create()'s keywords that describe the sandbox (corral.run takes them too).
_CREATE_KEYWORDS = options.names(options.CREATE)


def select_backend_name(explicit: str | None, settings: Settings) -> str:
    """The backend to use: the argument, else the settings' (where ``CORRAL_BACKEND`` was
    read, once, in its place among the sources), else local."""
    return explicit or settings.backend or "local"


def build_spec(
    settings: Settings, spec: SandboxSpec | None, keywords: dict[str, Any]
) -> SandboxSpec:
    """The spec from settings defaults, a spec object and keywords, strongest last."""
    data = dict(settings.sandbox)
    if spec is not None:
        if not isinstance(spec, SandboxSpec):
            raise ConfigError("spec", f"{type(spec).__name__} is not a SandboxSpec")
        data = _merge(data, unstructure(spec))
    return structure(_merge(data, options.keyword_layer(keywords)), SandboxSpec, "sandbox")


def _contribute(host: PluginHost, spec: SandboxSpec, backend: str) -> SandboxSpec:
    extra_mounts: list[MountLike] = host.hooks.extra_mounts(spec, backend)
    extra_env = host.hooks.extra_env(spec, backend)
    if not extra_mounts and not extra_env:
        return spec
    return structure(
        {
            **unstructure(spec),
            "mounts": [unstructure(m) for m in (*spec.mounts, *extra_mounts)],
            "env": {**extra_env, **spec.env},
        },
        SandboxSpec,
        "sandbox",
    )


def check_capabilities(backend: Backend, spec: SandboxSpec) -> None:
    """Refuse, naming each field, what ``spec`` asks for that ``backend`` cannot enforce
    here (a cluster's node agent asks it again of the node's own backend)."""
    have = backend.capabilities()
    missing = {cap: field for cap, field in required_capabilities(spec).items() if cap not in have}
    if missing:
        lines = "; ".join(f"{field} needs {cap.name}" for cap, field in missing.items())
        combined = Capability(0)
        for cap in missing:
            combined |= cap
        hint = backend.capability_hint(combined)
        raise CapabilityError(
            f"the {backend.name} backend cannot enforce what this sandbox asks for here: "
            f"{lines}" + (f" ({hint})" if hint else ""),
            backend=backend.name,
        )


def create(
    image: str | None = None,
    *,
    backend: str | None = None,
    spec: SandboxSpec | None = None,
    command: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    workdir: str | None = None,
    user: str | None = None,
    mounts: Sequence[Any] | None = None,
    memory: int | str | None = None,
    cpus: float | None = None,
    pids: int | None = None,
    nofile: int | None = None,
    nproc: int | None = None,
    cputime: float | str | None = None,
    file_size: int | str | None = None,
    disk: int | str | None = None,
    lifetime: float | str | None = None,
    network: str | None = None,
    security: Any = None,
    labels: Mapping[str, str] | None = None,
    healthcheck: Any = None,
    ports: Sequence[int] | None = None,
    auto_resume: bool | None = None,
    settings: Settings | None = None,
) -> Sandbox:
    """Create and start a sandbox; use the result as a context manager.

    The backend is ``backend``, else the ``backend`` setting (``CORRAL_BACKEND`` among
    its sources), else ``local``. Keywords override ``spec``, which overrides the ``[sandbox]``
    defaults of the settings. Nothing is created unless every check passes.

    Raises:
        ConfigError: a bad value (the message names the field).
        PolicyError: an unsafe option not opted into, or a refused mount source.
        CapabilityError: the backend cannot enforce what the spec asks for.
        BackendUnavailableError: the backend cannot run here (with the fix).
        CapacityError: ``max_sandboxes`` are open here already (after ``capacity_wait``).
    """
    given = locals()  # the parameters, and nothing else yet
    keywords = {name: given[name] for name in _CREATE_KEYWORDS}
    return _open(keywords, backend=backend, spec=spec, settings=settings, pending=False)


def run(
    argv: Sequence[str],
    image: str | None = None,
    *,
    timeout: float | str | None = None,
    stdin: bytes | str | None = None,
    max_output: int | str | None = None,
    idle_timeout: float | str | None = None,
    on_chunk: Callable[[OutputChunk], None] | None = None,
    cancel: threading.Event | None = None,
    backend: str | None = None,
    spec: SandboxSpec | None = None,
    settings: Settings | None = None,
    **keywords: Unpack[options.SandboxOptions],
) -> ExecResult:
    """Run ``argv`` in a fresh sandbox, remove the sandbox, and return how it ended.

    The same as ``create`` then ``exec`` then ``close``, in one call and faster: where the
    backend can, the command is the sandbox's own process, so no exec is needed (the
    container engines start it as the container's command; the image then needs
    ``timeout``, as for a spec's own ``command``). ``keywords`` are ``create``'s (env,
    workdir, user, mounts, memory, cpus, pids, lifetime, network, ...); ``timeout``,
    ``stdin``, ``max_output``, ``on_chunk`` and ``cancel`` are ``Sandbox.exec``'s.
    Plugins see the sandbox made and removed and the command run, as for the three
    calls; a plugin that uses the sandbox before the command (a created hook that
    writes files) gets it made first, and the command then runs as an exec.

    The result's ``duration`` is the whole call's, the sandbox's making and removal
    included. Raises what ``create`` and ``exec`` raise; nothing of the sandbox is left
    after.
    """
    unknown = sorted(set(keywords) - set(_CREATE_KEYWORDS))
    if unknown:
        raise ConfigError(unknown[0], "not a keyword of corral.run (see corral.create)")
    if keywords.get("command") is not None:
        raise ConfigError(
            "command", "corral.run runs argv as the sandbox's command; pass the command as argv"
        )
    # The command is checked before any hook sees a sandbox made for it.
    ExecRequest(argv=argv, timeout=timeout, stdin=stdin, idle_timeout=idle_timeout)  # type: ignore[arg-type]
    layer: dict[str, Any] = {**keywords, "image": image}
    sandbox = _open(layer, backend=backend, spec=spec, settings=settings, pending=True)
    with sandbox:
        return sandbox._run_once(
            argv,
            timeout=timeout,
            stdin=stdin,
            max_output=max_output,
            idle_timeout=idle_timeout,
            on_chunk=on_chunk,
            cancel=cancel,
        )


def _open(
    keywords: dict[str, Any],
    *,
    backend: str | None,
    spec: SandboxSpec | None,
    settings: Settings | None,
    pending: bool,
) -> Sandbox:
    """A checked sandbox and its hooks; made by the backend now, or (``pending``, for
    ``run``) when first used."""
    from .snapshot import Snapshot

    image = keywords.get("image")
    if isinstance(image, Snapshot):  # started from a snapshot: on the backend that took it
        keywords = {**keywords, "image": image.image}
        backend = backend or image.backend.name
    settings = load_settings() if settings is None else settings
    final = build_spec(settings, spec, keywords)
    host = get_host()
    host.configure(settings)
    name = select_backend_name(backend, settings)
    chosen = host.backend(name, settings)
    final = _contribute(host, final, name)
    final = apply_policy(final, settings)
    host.hooks.check_spec(final, name)
    check_capabilities(chosen, final)

    import uuid  # deferred: ~2 ms at `import corral`, needed only once a sandbox is made

    sandbox_id = uuid.uuid4().hex[:16]
    now = time.time()
    labels_out = {
        **final.labels,
        "corral.managed": "true",
        "corral.sandbox": sandbox_id,
        "corral.backend": name,
        "corral.created": str(int(now)),
        "corral.expires": str(int(now + final.limits.lifetime)),
    }
    unsafe = loosened(final)
    if unsafe:  # recorded on the sandbox, and said out loud
        labels_out["corral.loosened"] = ",".join(unsafe)
        log.warning("sandbox %s loosens: %s", sandbox_id, ", ".join(unsafe))
    host.hooks.sandbox_creating(final, sandbox_id, name)
    # T42 capacity: a slot from here until Sandbox.close (CapacityError past the cap).
    capacity.claim(name, sandbox_id, now + final.limits.lifetime, settings)
    if not pending:
        try:
            chosen.create(sandbox_id, final, labels_out)
        except BaseException:
            _destroy_quietly(chosen, sandbox_id)
            capacity.release(name, sandbox_id)  # T42 capacity: a failed create gives it back
            raise
    info = SandboxInfo(
        id=sandbox_id,
        backend=name,
        status="pending" if pending else "running",
        created=now,
        expires=now + final.limits.lifetime,
        image=final.image,
        labels=labels_out,
        node=None if pending else chosen.node_of(sandbox_id),
    )
    sandbox = Sandbox(
        sandbox_id=sandbox_id,
        backend=chosen,
        spec=final,
        info=info,
        host=host,
        settings=settings,
        pending=pending,
    )
    try:
        host.hooks.sandbox_created(sandbox)
    except BaseException:
        # A full close, so observers that saw it created also see it go.
        try:
            sandbox.close()
        except Exception:
            log.exception("cleaning up sandbox %s after a failed create also failed", sandbox_id)
        raise
    return sandbox


def _destroy_quietly(backend: Backend, sandbox_id: str) -> None:
    """Clean up after a failed create without hiding why it failed."""
    try:
        backend.destroy(sandbox_id)
    except Exception:
        log.exception("cleaning up sandbox %s after a failed create also failed", sandbox_id)


def attach(
    sandbox_id: str, *, backend: str | None = None, settings: Settings | None = None
) -> Sandbox:
    """A handle on a sandbox made elsewhere (another process); NotFoundError if gone."""
    settings = load_settings() if settings is None else settings
    host = get_host()
    host.configure(settings)
    chosen = host.backend(select_backend_name(backend, settings), settings)
    info, spec = chosen.inspect(sandbox_id)
    return Sandbox(
        sandbox_id=sandbox_id, backend=chosen, spec=spec, info=info, host=host, settings=settings
    )


def list_sandboxes(
    *, backend: str | None = None, settings: Settings | None = None
) -> list[SandboxInfo]:
    """Every sandbox corral made on the backend (found by corral's labels)."""
    settings = load_settings() if settings is None else settings
    chosen = get_host().backend(select_backend_name(backend, settings), settings)
    return chosen.list()


def gc(
    *, backend: str | None = None, settings: Settings | None = None, everything: bool = False
) -> list[str]:
    """Remove expired sandboxes (all of corral's with ``everything``); their ids.

    Leftovers (what remains of a sandbox that is gone, such as a bridged sandbox's
    network after its container ended) go too once expired, or a minute old.
    """
    settings = load_settings() if settings is None else settings
    chosen = get_host().backend(select_backend_name(backend, settings), settings)
    now = time.time()
    removed = []
    listed = chosen.list()
    for info in listed:
        stale = info.status == LEFTOVER and info.created <= now - LEFTOVER_GRACE
        if everything or info.expires <= now or stale:
            try:
                chosen.destroy(info.id)
                removed.append(info.id)
            except SandboxError:
                log.exception("could not remove sandbox %s", info.id)
    # What this host keeps of sandboxes that are gone: their processes' folders.
    from . import processes

    remaining = {info.id for info in listed} - set(removed)
    for sandbox_id in processes.kept_sandboxes(chosen):
        if sandbox_id not in remaining:
            chosen.forget_processes(sandbox_id)
    # Snapshots past their own lifetime; one a sandbox still starts from waits (conflict).
    for snap in chosen.snapshots():
        if everything or snap.expires <= now:
            try:
                chosen.remove_snapshot(snap.id)
                removed.append(snap.id)
            except SandboxError as e:
                log.info("snapshot %s stays for now: %s", snap.id, e)
    return removed


def snapshots(*, backend: str | None = None, settings: Settings | None = None) -> list[Snapshot]:
    """Every snapshot corral took on the backend (found by corral's labels)."""
    from .snapshot import Snapshot

    settings = load_settings() if settings is None else settings
    chosen = get_host().backend(select_backend_name(backend, settings), settings)
    return [Snapshot(info, chosen) for info in chosen.snapshots()]
