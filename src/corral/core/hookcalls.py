"""The core's typed door to its hooks: one method per hook, each hook's error rule once.

The rules (``RULES`` says which hook follows which; ``docs/hooks.md`` repeats them):

- ``REFUSE``: the hook may refuse. A SandboxError raised by a plugin (a PolicyError,
  a ConfigError, a backend's error passing through a dispatch hook) reaches the caller
  as it is; anything else is a bug of the plugin's and reaches the caller as an
  InternalError naming the plugin and its distribution, chained to the original.
- ``OBSERVE``: an observer must not raise, and cannot break its caller. Each observer is
  called on its own, so that one failing does not keep the others from being told;
  what it raises is logged on the ``corral`` logger naming the plugin, and dropped.
- ``REGISTER``: ``corral_backends``; whatever a plugin raises there is a PluginError
  naming it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from ._log import log
from .boundary import Provenance, translate
from .errors import PluginError, SandboxError

if TYPE_CHECKING:
    import pluggy

    from .backend import BackendInfo
    from .output import OutputSink
    from .results import ExecResult, Health, ResourceUsage
    from .sandbox import Sandbox
    from .settings import Settings
    from .spec import ExecRequest, MountLike, SandboxSpec
    from .transfer import FileTransfer, Transferred

__all__ = ["RULES", "Hooks", "Rule"]


class Rule(enum.Enum):
    """What a hook's caller does with what its implementations raise."""

    REFUSE = "may refuse: SandboxErrors reach the caller; anything else is an InternalError"
    OBSERVE = "must not raise: each observer on its own; a failure is logged, never raised"
    REGISTER = "registration: anything raised is a PluginError naming the plugin"


RULES: dict[str, Rule] = {
    "corral_backends": Rule.REGISTER,
    "corral_configure": Rule.REFUSE,
    "corral_extra_mounts": Rule.REFUSE,
    "corral_extra_env": Rule.REFUSE,
    "corral_check_spec": Rule.REFUSE,
    "corral_sandbox_creating": Rule.REFUSE,
    "corral_sandbox_created": Rule.REFUSE,
    "corral_exec": Rule.REFUSE,
    "corral_transfer": Rule.REFUSE,
    "corral_usage": Rule.REFUSE,
    "corral_health": Rule.REFUSE,
    "corral_usage_sampled": Rule.OBSERVE,
    "corral_sandbox_destroying": Rule.OBSERVE,
    "corral_sandbox_destroyed": Rule.OBSERVE,
    "corral_process_spawned": Rule.OBSERVE,
}


class Hooks:
    """Calls the hooks of ``pm`` under their rules; ``provenance`` names a plugin's origin.

    Made by the PluginHost (``host.hooks``); the core calls hooks only through it.
    """

    def __init__(self, pm: pluggy.PluginManager, provenance: Callable[[str], Provenance]) -> None:
        self._pm = pm
        self._provenance = provenance

    # -- the rules -----------------------------------------------------------------------

    def _culprit(self, name: str, error: BaseException) -> Provenance:
        """The plugin whose implementation of hook ``name`` raised ``error``: the deepest
        of its frames in the traceback (a wrapper's frame sits above the one it wraps)."""
        impls = {
            getattr(impl.function, "__code__", None): impl.plugin_name
            for impl in getattr(self._pm.hook, name).get_hookimpls()
        }
        found = None
        tb = error.__traceback__
        while tb is not None:
            found = impls.get(tb.tb_frame.f_code, found)
            tb = tb.tb_next
        return self._provenance(found) if found else Provenance("(unknown)")

    def _call(self, name: str, **kwargs: Any) -> Any:
        """Hook ``name`` under its rule (``RULES``)."""
        if RULES[name] is Rule.OBSERVE:
            return self._observe(name, **kwargs)
        return self._refuse(name, **kwargs)

    def _refuse(self, name: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._pm.hook, name)(**kwargs)
        except SandboxError:
            raise
        except Exception as e:
            origin = self._culprit(name, e)
            raise translate(e, str(origin), f"in {name}", origin, None) from e

    def _observe(self, name: str, **kwargs: Any) -> None:
        done: set[str] = set()
        # pluggy calls the last registered first; so do we, one plugin at a time.
        for impl in reversed(getattr(self._pm.hook, name).get_hookimpls()):
            if impl.plugin_name in done:
                continue
            done.add(impl.plugin_name)
            try:
                result = impl.function(*(kwargs[arg] for arg in impl.argnames))
                if impl.wrapper or impl.hookwrapper:  # a generator: run it to its end
                    next(result)
                    for _ in result:
                        pass
            except Exception:
                log.exception(
                    "%s failed in %s (an observer; ignored)",
                    self._provenance(impl.plugin_name),
                    name,
                )

    # -- registration and configuration --------------------------------------------------

    def backends(self) -> list[tuple[str, list[BackendInfo]]]:
        """Each plugin's ``corral_backends`` answer, with the plugin's name."""
        answers: list[tuple[str, list[BackendInfo]]] = []
        for impl in self._pm.hook.corral_backends.get_hookimpls():
            try:
                infos = cast("Iterable[BackendInfo]", impl.function() or ())
                answers.append((impl.plugin_name, list(infos)))
            except Exception as e:
                origin = self._provenance(impl.plugin_name)
                raise PluginError(
                    f"{origin} failed in corral_backends: {type(e).__name__}: {e}",
                    fix=origin.report_fix,
                ) from e
        return answers

    def configure(self, settings: Settings) -> None:
        """``corral_configure`` (historic: replayed to plugins registered later)."""
        try:
            self._pm.hook.corral_configure.call_historic(kwargs={"settings": settings})
        except SandboxError:
            raise
        except Exception as e:
            origin = self._culprit("corral_configure", e)
            raise translate(e, str(origin), "in corral_configure", origin, None) from e

    # -- create ------------------------------------------------------------------------

    def extra_mounts(self, spec: SandboxSpec, backend: str) -> list[MountLike]:
        answers = self._call("corral_extra_mounts", spec=spec, backend=backend)
        return [mount for mounts in answers for mount in mounts or ()]

    def extra_env(self, spec: SandboxSpec, backend: str) -> dict[str, str]:
        env: dict[str, str] = {}
        for answer in self._call("corral_extra_env", spec=spec, backend=backend):
            env.update(answer or {})
        return env

    def check_spec(self, spec: SandboxSpec, backend: str) -> None:
        self._call("corral_check_spec", spec=spec, backend=backend)

    def sandbox_creating(self, spec: SandboxSpec, sandbox_id: str, backend: str) -> None:
        self._call("corral_sandbox_creating", spec=spec, sandbox_id=sandbox_id, backend=backend)

    def sandbox_created(self, sandbox: Sandbox) -> None:
        self._call("corral_sandbox_created", sandbox=sandbox)

    # -- dispatch ----------------------------------------------------------------------

    def exec(self, sandbox: Sandbox, request: ExecRequest, sink: OutputSink) -> ExecResult:
        result: ExecResult = self._call("corral_exec", sandbox=sandbox, request=request, sink=sink)
        return result

    def transfer(self, sandbox: Sandbox, transfer: FileTransfer) -> Transferred:
        result: Transferred = self._call("corral_transfer", sandbox=sandbox, transfer=transfer)
        return result

    def usage(self, sandbox: Sandbox) -> ResourceUsage:
        result: ResourceUsage = self._call("corral_usage", sandbox=sandbox)
        return result

    def health(self, sandbox: Sandbox) -> Health:
        result: Health = self._call("corral_health", sandbox=sandbox)
        return result

    # -- notifications -----------------------------------------------------------------

    def usage_sampled(self, sandbox: Sandbox, usage: ResourceUsage) -> None:
        self._call("corral_usage_sampled", sandbox=sandbox, usage=usage)

    def sandbox_destroying(self, sandbox: Sandbox) -> None:
        self._call("corral_sandbox_destroying", sandbox=sandbox)

    def process_spawned(self, sandbox: Sandbox, request: ExecRequest, process_id: str) -> None:
        self._call(
            "corral_process_spawned", sandbox=sandbox, request=request, process_id=process_id
        )

    def sandbox_destroyed(self, sandbox_id: str, backend: str, error: BaseException | None) -> None:
        self._call("corral_sandbox_destroyed", sandbox_id=sandbox_id, backend=backend, error=error)
