"""The plugin host: one pluggy manager per process, entry points, backend selection."""

from __future__ import annotations

import os
import sys
import threading
from types import ModuleType
from typing import Any

import attrs

from ._log import log
from .backend import Availability, Backend, BackendInfo
from .boundary import Provenance, guard_backend, translate
from .convert import structure
from .errors import BackendUnavailableError, ConfigError, PluginError, SandboxError
from .hookcalls import Hooks
from .settings import Settings

# deferred: pluggy with the hookspecs (~4 ms) and json (~2 ms) load with the first host,
# not at `import corral`.

__all__ = ["PluginHost", "PluginRecord", "get_host", "reset_host"]

ENTRY_POINT_GROUP = "corral"
OWN_DISTRIBUTION = "corral"


@attrs.frozen
class PluginRecord:
    """A loaded plugin and where it came from."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]


@attrs.frozen
class BackendRecord:
    """A registered backend with the plugin and distribution that provided it.

    ``refused`` says why the backend cannot be used at all (a class that cannot be
    instantiated), found when the plugins' backends are collected; None for a usable one.
    Selecting a refused backend is a PluginError naming its plugin.
    """

    info: BackendInfo
    plugin: str
    distribution: str | None
    version: str | None
    refused: str | None = None

    @property
    def provenance(self) -> Provenance:
        return Provenance(self.plugin, self.distribution, self.version)


def _flag(environ: Any, name: str) -> bool:
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class PluginHost:
    """The core's typed door to its plugins.

    Built lazily and once per process (``get_host()``). Loading order: hookspecs, the
    core's own default implementations, then every entry point in the ``corral`` group
    (corral's own built-in backends included, exactly like a third party's), except
    those named in ``CORRAL_DISABLE_PLUGINS``; with ``CORRAL_DISABLE_PLUGIN_AUTOLOAD=1``
    only corral's own distribution is loaded. ``check_pending()`` then refuses any hook
    implementation that matches no specification.
    """

    def __init__(self, environ: Any = None) -> None:
        import pluggy

        from . import hookspecs

        environ = os.environ if environ is None else environ
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._provenance: dict[str, tuple[str | None, str | None]] = {}
        #: The typed door the core calls every hook through, each under its rule.
        self.hooks = Hooks(self.pm, self.provenance)
        self._backends: dict[str, BackendRecord] | None = None
        self._instances: dict[tuple[str, str], Backend] = {}
        self._configured: Settings | None = None
        self._instance_plugins: dict[tuple[str, str], str] = {}  # which plugin made each
        self._lock = threading.RLock()
        self.blocked = tuple(
            n.strip() for n in environ.get("CORRAL_DISABLE_PLUGINS", "").split(",") if n.strip()
        )
        for name in self.blocked:
            self.pm.set_blocked(name)
        if _flag(environ, "CORRAL_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()
        from . import defaults

        self.register(defaults, "corral.core", OWN_DISTRIBUTION)
        # register() validated each plugin as it came (check_pending), naming it.
        self._load_entry_points(autoload=not _flag(environ, "CORRAL_DISABLE_PLUGIN_AUTOLOAD"))

    # -- loading -------------------------------------------------------------------

    def register(
        self, plugin: ModuleType | object, name: str, distribution: str | None = None
    ) -> None:
        """Register a plugin object; its hooks are checked against the specifications."""
        import pluggy

        with self._lock:
            try:
                self.pm.register(plugin, name=name)
            except Exception as e:
                # Replaying corral_configure to the new plugin may raise once part of it
                # is registered: take that part out again.
                if self.pm.get_plugin(name) is plugin:
                    self.pm.unregister(name=name)
                raise PluginError(f"plugin {name!r} cannot be registered: {e}") from e
            try:
                # pluggy only refuses a hook without a specification in check_pending().
                self.pm.check_pending()
            except pluggy.PluginValidationError as e:
                self.pm.unregister(name=name)
                raise PluginError(f"plugin {name!r} cannot be registered: {e}") from e
            version = None
            if distribution:
                from importlib import metadata

                try:
                    version = metadata.version(distribution)
                except metadata.PackageNotFoundError:
                    version = None
            self._provenance[name] = (distribution, version)
            self._backends = None  # rebuilt on next use

    def unregister(self, name: str) -> None:
        """Remove a plugin; instances of the backends it provided are closed and dropped."""
        with self._lock:
            self.pm.unregister(name=name)
            self._provenance.pop(name, None)
            self._backends = None
            for key, plugin in list(self._instance_plugins.items()):
                if plugin == name:
                    del self._instance_plugins[key]
                    self._instances.pop(key).close()

    def _load_entry_points(self, autoload: bool) -> None:
        from importlib import metadata  # costly to import; only needed here

        for dist in metadata.distributions():
            dist_name = dist.metadata["Name"]
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP:
                    continue
                own = (dist_name or "").lower() == OWN_DISTRIBUTION
                if (not own and not autoload) or self.pm.is_blocked(ep.name):
                    continue
                if self.pm.has_plugin(ep.name):
                    continue  # the same distribution seen twice on sys.path
                try:
                    plugin = ep.load()
                except Exception as e:
                    raise PluginError(
                        f"plugin {ep.name!r} from {dist_name} failed to load: {e}"
                    ) from e
                self.register(plugin, ep.name, dist_name)

    def plugins(self) -> list[PluginRecord]:
        """Every registered plugin, with its distribution, version and hooks."""
        records = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            dist, version = self._provenance.get(name, (None, None))
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))
            records.append(PluginRecord(name, dist, version, hooks))
        return records

    def provenance(self, plugin: str) -> Provenance:
        """Where plugin ``plugin`` came from, for errors that name it."""
        dist, version = self._provenance.get(plugin, (None, None))
        obj = self.pm.get_plugin(plugin)
        if plugin.isdigit() and obj is not None:
            # Registered without a name (pluggy names it by id): its type says more.
            kind = obj if isinstance(obj, (ModuleType, type)) else type(obj)
            plugin = f"{kind.__module__}.{kind.__qualname__}" if kind is not obj else obj.__name__
        return Provenance(plugin, dist, version)

    # -- configuration -------------------------------------------------------------

    def configure(self, settings: Settings) -> None:
        """Give plugins the settings in use (``corral_configure``), unless they have them.

        Each call to a historic hook is kept and replayed to later plugins, so it is
        made only when the settings differ from the last ones given; when a plugin
        refuses them, nothing is remembered and the next call tries again.
        """
        with self._lock:
            last = self._configured
            if last is not None and (settings is last or settings == last):
                return
            self.hooks.configure(settings)
            self._configured = settings

    # -- backends ------------------------------------------------------------------

    def backends(self) -> dict[str, BackendRecord]:
        """Every registered backend by name; a name two plugins claim is a PluginError."""
        with self._lock:
            if self._backends is not None:
                return self._backends
            found: dict[str, BackendRecord] = {}
            for plugin, infos in self.hooks.backends():
                dist, version = self._provenance.get(plugin, (None, None))
                for info in infos:
                    if not isinstance(info, BackendInfo) or not (
                        isinstance(info.backend, type) and issubclass(info.backend, Backend)
                    ):
                        raise PluginError(
                            f"plugin {plugin!r} returned {info!r} from "
                            "corral_backends; expected BackendInfo records of Backend classes"
                        )
                    if info.name in found:
                        other = found[info.name]
                        raise PluginError(
                            f"backend {info.name!r} is provided twice: by plugin "
                            f"{other.plugin!r} ({other.distribution}) and by "
                            f"{plugin!r} ({dist})"
                        )
                    refused = _uninstantiable(info.backend)
                    found[info.name] = BackendRecord(info, plugin, dist, version, refused)
            self._backends = found
            return found

    def backend(self, name: str, settings: Settings) -> Backend:
        """The backend called ``name``, made once per process (and per settings) and
        checked available then; one that is not is not kept, so the next call checks
        again."""
        # Instances hold engine clients and connection pools, so they are shared; the
        # key includes the backend's settings so that other settings get their own.
        import json

        key = (name, json.dumps(settings.backends.get(name, {}), sort_keys=True, default=str))
        with self._lock:
            instance = self._instances.get(key)
            if instance is not None:
                # Checked when made: an engine that went away since makes the call
                # itself fail as unavailable, without a ping in front of every create.
                return instance
            instance = self.make_backend(name, settings)
        try:
            availability = instance.check()
        except BaseException:
            instance.close()
            raise
        if not availability.ok:
            instance.close()
            raise BackendUnavailableError(
                f"the {name} backend cannot run here: {availability.reason}",
                backend=name,
                fix=availability.fix or None,
            )
        with self._lock:
            if key in self._instances:  # another thread made and checked one meanwhile
                instance.close()
                return self._instances[key]
            self._instances[key] = instance
            self._instance_plugins[key] = self.backends()[name].plugin
        return instance

    def make_backend(self, name: str, settings: Settings) -> Backend:
        """A new instance of backend ``name`` with its ``[backends.NAME]`` settings,
        inside the error boundary (``corral.core.boundary``): whatever but a SandboxError
        escapes its methods reaches the caller as one naming the backend and its plugin.

        Raises:
            ConfigError: an unknown backend, or bad ``[backends.NAME]`` settings.
            PluginError: a backend refused when its plugin was loaded.
            BackendUnavailableError: its client library is missing (the fix installs it).
            InternalError: its constructor failed otherwise.
        """
        records = self.backends()
        if name not in records:
            choices = ", ".join(sorted(records)) or "none are installed"
            raise ConfigError(
                "backend", f"{name!r} is not a known backend. Choose one of: {choices}"
            )
        record = records[name]
        origin = record.provenance
        if record.refused:
            raise PluginError(
                f"the {name} backend of {origin} is refused: {record.refused}",
                backend=name,
                fix=origin.report_fix,
            )
        cls = record.info.backend
        own: Any = structure(settings.backends.get(name, {}), cls.Settings, f"backends.{name}")
        try:
            instance = cls(own)
        except SandboxError:
            raise
        except Exception as e:
            raise translate(e, f"the {name} backend ({origin})", "when made", origin, name) from e
        return guard_backend(instance, name, origin)

    def availability(self, name: str, settings: Settings) -> Availability:
        """Whether backend ``name`` can run with these settings (a throwaway instance,
        closed after the check so that its engine connections do not linger). Never
        raises: a broken backend is one that is not available, with its error's fix."""
        try:
            instance = self.make_backend(name, settings)
        except ConfigError as e:
            return Availability(False, str(e), "fix the settings")
        except SandboxError as e:
            return Availability(False, e.message, e.fix or "")
        try:
            return instance.check()
        except SandboxError as e:
            return Availability(False, e.message, e.fix or "")
        finally:
            try:
                instance.close()
            except SandboxError:
                log.exception("closing a %s backend after its check failed", name)

    def close(self) -> None:
        with self._lock:
            for instance in self._instances.values():
                instance.close()
            self._instances.clear()
            self._instance_plugins.clear()


def _uninstantiable(cls: type[Backend]) -> str | None:
    """Why ``cls`` can never be instantiated, or None (its ``__init__`` is not run: a
    backend may connect to its engine there, and collecting backends must stay cheap)."""
    import inspect

    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        return f"its class {cls.__qualname__} leaves abstract methods unimplemented: {missing}"
    return None


_host: PluginHost | None = None
_host_lock = threading.Lock()


def get_host() -> PluginHost:
    """The process's plugin host, built on first use."""
    global _host
    if _host is None:
        with _host_lock:
            if _host is None:
                _host = PluginHost()
    return _host


def reset_host(host: PluginHost | None = None) -> PluginHost | None:
    """Swap the process's host (tests use this); returns the previous one."""
    global _host
    with _host_lock:
        previous, _host = _host, host
    return previous
