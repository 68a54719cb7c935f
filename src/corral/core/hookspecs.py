"""Every hook corral calls: the contract between the core and its plugins.

Kinds, by name: registration and contribution hooks are plural nouns
(``corral_backends``, ``corral_extra_mounts``); notifications are a subject and an
event (``corral_sandbox_created``); dispatch points are verbs (``corral_exec``,
``corral_usage``), answered first by plugins and last by the core's own default.

Each hook follows one error rule (``corral.core.hookcalls.RULES``), said under "May
raise" in its docstring:

- *may refuse*: a SandboxError a plugin raises (PolicyError, ConfigError, a backend's
  error passing through) reaches the caller as it is; anything else is a bug of the
  plugin's and reaches the caller as an InternalError naming the plugin and its
  distribution, chained to the original exception.
- *observer*: must not raise. Each observer is called on its own; what one raises is
  logged on the ``corral`` logger naming the plugin and dropped, and the others are
  still called.
- *registration* (``corral_backends``): anything raised is a PluginError naming the plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .backend import BackendInfo
    from .output import OutputSink
    from .results import ExecResult, Health, ResourceUsage
    from .sandbox import Sandbox
    from .settings import Settings
    from .spec import ExecRequest, MountLike, SandboxSpec
    from .transfer import FileTransfer, Transferred

PROJECT = "corral"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- registration ----------------------------------------------------------------------


@hookspec
def corral_backends() -> list[BackendInfo]:
    """Declare the backends this plugin provides.

    Called once, when the plugin manager is first used in a process. Each plugin
    returns a list of :class:`corral.BackendInfo` records; the host checks that names do
    not clash (a clash is a PluginError naming both providers) and remembers which
    distribution provided each backend.

    Returns:
        A list of BackendInfo (may be empty).

    A class that cannot be instantiated (abstract methods left unimplemented) is refused
    here, naming the plugin: ``corral backends`` and ``corral doctor`` list it as
    refused, and selecting it is a PluginError.

    May raise: no (registration rule); an exception here is reported as a PluginError
    naming the plugin.

    Added in 0.1.

    Example::

        @corral.hookimpl
        def corral_backends():
            return [corral.BackendInfo(name="firecracker", backend=FirecrackerBackend,
                                       description="microVMs")]
    """


# -- configuration ---------------------------------------------------------------------


@hookspec(historic=True)
def corral_configure(settings: Settings) -> None:
    """Receive the settings in use, to read this plugin's own ``[plugins.NAME]`` table.

    Historic: called by ``corral.create`` and ``corral.attach`` before any other hook,
    the first time they are given settings and again whenever the settings differ from
    the last ones given (an equal Settings object does not call it again), and replayed
    to a plugin registered later. A process normally has one Settings, so this is a
    one-time configuration; where it has several, the most recent are in force. Keep it
    cheap, and keep nothing from older settings.

    Args:
        settings: the effective Settings; ``settings.plugins`` holds one raw table per
            plugin, which the plugin structures into its own attrs class with
            ``corral.core.convert.structure(table, Cls, "plugins.NAME")`` so that a
            typo is a ConfigError naming its path.

    May raise: ConfigError for a bad table (may-refuse rule). The create or attach that
    brought the settings fails with it before anything is made, and the next one given the same
    settings calls this hook again. Raised while replaying to a plugin being
    registered, it fails that registration (PluginError).

    Added in 0.1.

    Example::

        @corral.hookimpl
        def corral_configure(settings):
            global config
            config = structure(settings.plugins.get("quota", {}), QuotaSettings,
                               "plugins.quota")
    """


# -- contributions at create -----------------------------------------------------------


@hookspec
def corral_extra_mounts(spec: SandboxSpec, backend: str) -> list[MountLike]:
    """Contribute mounts to a sandbox about to be created.

    Called by ``corral.create`` after the spec is validated and before policy checks,
    once per plugin. The mounts returned are appended to ``spec.mounts`` and go through
    the same checks as the user's own (sensitive sources are still refused).

    Args:
        spec: the spec as the user gave it (defaults applied).
        backend: the name of the chosen backend.

    Returns:
        A list of Mount, Tmpfs or Volume (may be empty).

    May raise: ConfigError or PolicyError to refuse the sandbox (may-refuse rule).

    Added in 0.1.

    Example::

        @corral.hookimpl
        def corral_extra_mounts(spec, backend):
            return [corral.Tmpfs("/cache", size="128MiB")]
    """


@hookspec
def corral_extra_env(spec: SandboxSpec, backend: str) -> dict[str, str]:
    """Contribute environment variables to a sandbox about to be created.

    Called by ``corral.create`` right after ``corral_extra_mounts``. The variables are
    merged under the user's own: a variable the spec sets itself always wins.

    Args:
        spec: the spec as the user gave it.
        backend: the name of the chosen backend.

    Returns:
        A mapping of names to values (may be empty).

    May raise: ConfigError or PolicyError to refuse the sandbox (may-refuse rule).

    Added in 0.1.

    Example::

        @corral.hookimpl
        def corral_extra_env(spec, backend):
            return {"GIT_AUTHOR_NAME": "corral"}
    """


@hookspec
def corral_check_spec(spec: SandboxSpec, backend: str) -> None:
    """Accept or refuse the final spec, before anything is created.

    Called by ``corral.create`` after contributions are merged and corral's own policy
    (unsafe options, mount sources) has passed, and before the capability check. A
    policy plugin raises PolicyError to refuse; returning means no objection.

    Args:
        spec: the final spec.
        backend: the name of the chosen backend.

    May raise: PolicyError (or ConfigError) to refuse the sandbox (may-refuse rule).

    Added in 0.1.

    Example::

        @corral.hookimpl
        def corral_check_spec(spec, backend):
            if spec.network.mode != "none":
                raise corral.PolicyError("this service allows no network")
    """


# -- lifecycle notifications -----------------------------------------------------------


@hookspec
def corral_sandbox_creating(spec: SandboxSpec, sandbox_id: str, backend: str) -> None:
    """Notification: a sandbox is about to be created (the spec passed every check).

    Called once, just before ``Backend.create``.

    Args:
        spec: the final spec.
        sandbox_id: the id the sandbox will have.
        backend: the backend's name.

    May raise: a SandboxError (a PolicyError for a quota) aborts the create, nothing
    made yet (may-refuse rule).

    Added in 0.1.

    Example::

        @corral.hookimpl
        def corral_sandbox_creating(spec, sandbox_id, backend):
            log.info("creating %s on %s", sandbox_id, backend)
    """


@hookspec
def corral_sandbox_created(sandbox: Sandbox) -> None:
    """Notification: a sandbox is created and started.

    Called once per sandbox, after ``Backend.create`` returned (for ``corral.run``'s
    sandbox, before the backend makes it: ``sandbox.info.status`` is ``pending``).

    Args:
        sandbox: the new sandbox.

    May raise: a SandboxError to refuse the sandbox (may-refuse rule): the sandbox is
    closed (observers see it go) and the error reaches the caller of ``corral.create``,
    so nothing leaks.

    Added in 0.1.

    Example::

        @corral.hookimpl
        def corral_sandbox_created(sandbox):
            registry.add(sandbox.id)
    """


@hookspec
def corral_sandbox_destroying(sandbox: Sandbox) -> None:
    """Notification: a sandbox is about to be destroyed (``close()`` was called).

    Called once per sandbox, before ``Backend.destroy``, while the sandbox can still be
    used (to collect logs or files).

    Args:
        sandbox: the sandbox being closed.

    May raise: no (observer rule): what it raises is logged and dropped, so a plugin can
    never keep a sandbox alive.

    Added in 0.1.

    Example::

        @corral.hookimpl
        def corral_sandbox_destroying(sandbox):
            save(sandbox.read_file("/workspace/report.json"))
    """


@hookspec
def corral_sandbox_destroyed(sandbox_id: str, backend: str, error: BaseException | None) -> None:
    """Notification: a sandbox is gone (or its removal failed, with ``error``).

    Called once per sandbox after ``Backend.destroy``.

    Args:
        sandbox_id: the id the sandbox had.
        backend: the backend's name.
        error: the removal's error, or None when it succeeded.

    May raise: no (observer rule): what it raises is logged and dropped.

    Added in 0.1.

    Example::

        @corral.hookimpl
        def corral_sandbox_destroyed(sandbox_id, backend, error):
            registry.discard(sandbox_id)
    """


@hookspec
def corral_process_spawned(sandbox: Sandbox, request: ExecRequest, process_id: str) -> None:
    """Notification: ``Sandbox.spawn`` started a background process.

    Called once per process, after the backend started it; how it ends is read from
    its ``Process``, which outlives the program that spawned it.

    Args:
        sandbox: the sandbox.
        request: the validated request (argv, env, workdir, user, tty, timeouts).
        process_id: the process's id (``Sandbox.process(process_id)``).

    May raise: no (observer rule): what it raises is logged and dropped.

    Added in 0.2.

    Example::

        @corral.hookimpl
        def corral_process_spawned(sandbox, request, process_id):
            log.info("%s started %s", sandbox.id, request.argv)
    """


# -- dispatch --------------------------------------------------------------------------


@hookspec(firstresult=True)
def corral_exec(sandbox: Sandbox, request: ExecRequest, sink: OutputSink) -> ExecResult | None:
    """Run one command in a sandbox: the dispatch point every exec goes through.

    The core answers last (``trylast``) by asking the backend and building the
    ExecResult from ``sink``. A plugin may answer first (record/replay: return a
    result without running anything), or wrap the call with ``wrapper=True`` to
    observe or change it (audit, tracing, retries, policy on argv).

    Args:
        sandbox: the sandbox.
        request: the validated request (argv, env, workdir, user, stdin, timeout).
        sink: where output goes; bounded by ``request.max_output``.

    Returns:
        The ExecResult, or None to let the next implementation answer.

    May raise: PolicyError to refuse the command; SandboxError from the backend
    (may-refuse rule).

    Added in 0.1.

    Example::

        @corral.hookimpl(wrapper=True)
        def corral_exec(sandbox, request, sink):
            started = time.monotonic()
            result = yield
            log.info("%s took %.3fs", request.argv, time.monotonic() - started)
            return result
    """


@hookspec(firstresult=True)
def corral_usage(sandbox: Sandbox) -> ResourceUsage | None:
    """Read what a sandbox uses now: the dispatch point behind ``sandbox.usage()``.

    The core answers last by asking the backend. A plugin may answer first (for
    example from its own metrics agent) or wrap the call.

    Args:
        sandbox: the sandbox.

    Returns:
        A ResourceUsage, or None to let the next implementation answer.

    May raise: SandboxError from the backend (may-refuse rule).

    Added in 0.1.

    Example::

        @corral.hookimpl(tryfirst=True)
        def corral_usage(sandbox):
            return agent.sample(sandbox.id)  # None when the agent does not know it
    """


@hookspec
def corral_usage_sampled(sandbox: Sandbox, usage: ResourceUsage) -> None:
    """Notification: a usage sample was read; exporters forward it.

    Called after every ``sandbox.usage()``.

    Args:
        sandbox: the sandbox.
        usage: the sample.

    May raise: no (observer rule): what it raises is logged and dropped, so a broken
    exporter never breaks the caller.

    Added in 0.1.

    Example::

        @corral.hookimpl
        def corral_usage_sampled(sandbox, usage):
            gauge.labels(sandbox.id).set(usage.memory_bytes or 0)
    """


@hookspec(firstresult=True)
def corral_transfer(sandbox: Sandbox, transfer: FileTransfer) -> Transferred | None:
    """Copy files into or out of a sandbox: the dispatch point of ``write_file``,
    ``read_file``, ``upload`` and ``download``.

    Called once per call of those four methods, after the paths are checked and before
    anything is copied. The core answers last (``trylast``) by asking the backend
    (``put_archive`` or ``get_archive``). A plugin may wrap the call with
    ``wrapper=True`` to observe it (audit: path, direction and bytes) or refuse it, or
    answer first (record/replay).

    Args:
        sandbox: the sandbox.
        transfer: a :class:`corral.core.transfer.FileTransfer`: ``operation``, ``path``
            in the sandbox, ``host_path`` (upload's source, download's destination),
            ``direction`` (``in`` or ``out``) and write_file's ``data``.

    Returns:
        A :class:`corral.core.transfer.Transferred` (``size`` in bytes; read_file's
        ``data``, download's ``local`` path), or None to let the next implementation
        answer.

    May raise: PolicyError to refuse the transfer; SandboxError from the backend
    (may-refuse rule).

    Added in 0.1.

    Example::

        @corral.hookimpl(wrapper=True)
        def corral_transfer(sandbox, transfer):
            if transfer.direction == "in" and transfer.path.startswith("/etc/"):
                raise corral.PolicyError(f"{transfer.path}: not writable by policy")
            done = yield
            log.info("%s %s: %d bytes", transfer.operation, transfer.path, done.size)
            return done
    """


@hookspec(firstresult=True)
def corral_health(sandbox: Sandbox) -> Health | None:
    """Read a sandbox's healthcheck state: the dispatch point behind ``sandbox.health()``.

    The core answers last by asking the backend. A plugin may answer first (a health
    probe of its own) or wrap the call to observe it.

    Args:
        sandbox: the sandbox.

    Returns:
        A :class:`corral.Health`, or None to let the next implementation answer.

    May raise: SandboxError from the backend (may-refuse rule).

    Added in 0.1.

    Example::

        @corral.hookimpl(wrapper=True)
        def corral_health(sandbox):
            health = yield
            if health.status == "unhealthy":
                alert(sandbox.id, health.last_output)
            return health
    """
