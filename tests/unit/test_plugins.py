"""The plugin host: entry points of a real installed distribution, blocking, clashes."""

from __future__ import annotations

from pathlib import Path

import pytest

import corral
from corral.core.backend import BackendInfo
from corral.core.plugins import PluginHost, get_host, reset_host
from corral.core.settings import Settings, load_settings

BACKEND = "subprocess-test"
DIST = "corral-test-plugin"


def plugin_names(host: PluginHost) -> set[str]:
    return {record.name for record in host.plugins()}


# -- discovery -------------------------------------------------------------------------


def test_the_installed_plugin_is_discovered_with_its_provenance(
    host: PluginHost, test_plugin_version: str
) -> None:
    record = host.backends()[BACKEND]
    assert record.plugin == "testplugin"
    assert record.distribution == DIST
    assert record.version == test_plugin_version
    assert issubclass(record.info.backend, corral.Backend)
    assert record.info.backend.name == BACKEND
    assert "NOT isolating" in record.info.description
    (plugin,) = [p for p in host.plugins() if p.name == "testplugin"]
    assert (plugin.distribution, plugin.version) == (DIST, test_plugin_version)
    assert plugin.hooks == ("corral_backends",)


def test_the_test_backend_says_it_does_not_isolate(host: PluginHost) -> None:
    cls = host.backends()[BACKEND].info.backend
    assert "NOT isolating" in (cls.__doc__ or "")
    backend = cls(cls.Settings())
    capabilities = backend.capabilities()
    for missing in ("ISOLATION", "NETWORK_NONE", "READ_ONLY_ROOT", "NO_NEW_PRIVILEGES"):
        assert corral.Capability[missing] not in capabilities
    assert corral.Capability.MEMORY_LIMIT in capabilities
    assert backend.check().ok


def test_corrals_own_plugins_are_registered(host: PluginHost) -> None:
    records = {p.name: p for p in host.plugins()}
    assert records["corral.core"].distribution == "corral"
    assert set(records["corral.core"].hooks) == {
        "corral_exec",
        "corral_health",
        "corral_transfer",
        "corral_usage",
    }
    assert records["local"].distribution == "corral"
    assert records["local"].version == corral.__version__


def test_without_autoload_only_corrals_own_plugins_load(test_plugin_version: str) -> None:
    host = PluginHost(environ={"CORRAL_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert BACKEND not in host.backends()
    assert "testplugin" not in plugin_names(host)
    assert "local" in plugin_names(host)
    assert host.backends()["local"].distribution == "corral"


def test_a_blocked_plugin_is_not_loaded(test_plugin_version: str) -> None:
    host = PluginHost(environ={"CORRAL_DISABLE_PLUGINS": " testplugin , other"})
    assert host.blocked == ("testplugin", "other")
    assert BACKEND not in host.backends()
    assert "testplugin" not in plugin_names(host)
    assert "local" in plugin_names(host)


def test_unregistering_a_plugin_removes_its_backends(host: PluginHost) -> None:
    assert BACKEND in host.backends()
    host.unregister("testplugin")
    assert BACKEND not in host.backends()


# -- registration is validated ---------------------------------------------------------


def test_a_hook_without_a_specification_is_refused(host: PluginHost) -> None:
    from corral_test_plugin import unspecced

    with pytest.raises(corral.PluginError, match="corral_no_such_hook"):
        host.register(unspecced, "unspecced", DIST)
    assert not host.pm.has_plugin("unspecced")
    assert "unspecced" not in plugin_names(host)


def test_a_hook_with_wrong_arguments_is_refused(host: PluginHost) -> None:
    class WrongArguments:
        @corral.hookimpl
        def corral_sandbox_created(self, sandbox, surprise):  # no such argument
            pass

    with pytest.raises(corral.PluginError, match="'wrong' cannot be registered"):
        host.register(WrongArguments(), "wrong")


def test_the_same_plugin_name_twice_is_refused(host: PluginHost) -> None:
    class Empty:
        pass

    with pytest.raises(corral.PluginError, match="'testplugin' cannot be registered"):
        host.register(Empty(), "testplugin")


def test_two_plugins_with_one_backend_name_are_refused_naming_both(host: PluginHost) -> None:
    cls = host.backends()[BACKEND].info.backend

    class Impostor:
        @corral.hookimpl
        def corral_backends(self):
            return [BackendInfo(name=BACKEND, backend=cls)]

    host.register(Impostor(), "impostor", "impostor-dist")
    with pytest.raises(corral.PluginError, match=f"backend '{BACKEND}' is provided twice") as info:
        host.backends()
    message = str(info.value)
    assert "'testplugin' (corral-test-plugin)" in message
    assert "'impostor' (impostor-dist)" in message


def test_a_registration_that_is_not_a_backend_record_is_refused(host: PluginHost) -> None:
    class Sloppy:
        @corral.hookimpl
        def corral_backends(self):
            return [("mine", object)]

    host.register(Sloppy(), "sloppy")
    with pytest.raises(corral.PluginError, match="plugin 'sloppy' returned"):
        host.backends()


# -- selection and backend settings ----------------------------------------------------


def test_an_unknown_backend_lists_the_known_ones(
    host: PluginHost, clean_settings: Settings
) -> None:
    with pytest.raises(corral.ConfigError, match="'nope' is not a known backend") as info:
        host.make_backend("nope", clean_settings)
    assert info.value.path == "backend"
    choices = str(info.value).split("Choose one of: ", 1)[1].split(", ")
    assert choices == sorted(host.backends())
    assert {"local", BACKEND} <= set(choices)


def test_backend_settings_come_from_their_table(
    host: PluginHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corral.toml").write_text(f'[backends.{BACKEND}]\nroot = "{tmp_path}/boxes"\n')
    settings = load_settings(cwd=tmp_path, environ={})
    backend = host.make_backend(BACKEND, settings)
    cls = host.backends()[BACKEND].info.backend
    assert type(backend) is cls
    assert isinstance(backend.settings, cls.Settings)
    assert backend.settings.root == f"{tmp_path}/boxes"


def test_backend_settings_default_when_the_table_is_absent(
    host: PluginHost, clean_settings: Settings
) -> None:
    assert host.make_backend(BACKEND, clean_settings).settings.root is None


def test_an_unknown_backend_setting_names_its_path(host: PluginHost, tmp_path: Path) -> None:
    settings = load_settings(
        {"backends": {BACKEND: {"root": str(tmp_path), "x": 1}}}, cwd=tmp_path, environ={}
    )
    with pytest.raises(corral.ConfigError, match=rf"^backends\.{BACKEND}\.x: unknown setting"):
        host.make_backend(BACKEND, settings)
    availability = host.availability(BACKEND, settings)
    assert not availability.ok
    assert f"backends.{BACKEND}.x" in availability.reason


def test_backend_instances_are_made_once(host: PluginHost, clean_settings: Settings) -> None:
    first = host.backend(BACKEND, clean_settings)
    assert host.backend(BACKEND, clean_settings) is first
    assert host.make_backend(BACKEND, clean_settings) is not first


# -- the process's host and tracing ----------------------------------------------------


def test_reset_host_swaps_the_process_host(host: PluginHost) -> None:
    previous = reset_host(host)
    try:
        assert get_host() is host
        assert get_host() is host  # built once, then reused
    finally:
        assert reset_host(previous) is host


def test_tracing_prints_hook_calls(
    test_plugin_version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without the built-in repository plugin, which would answer with an empty mapping.
    host = PluginHost(environ={"CORRAL_TRACE_PLUGINS": "1", "CORRAL_DISABLE_PLUGINS": "repository"})
    host.pm.hook.corral_extra_env(spec=corral.SandboxSpec(), backend=BACKEND)
    err = capsys.readouterr().err
    assert "corral_extra_env [hook]" in err
    assert f"backend: {BACKEND}" in err
    assert "finish corral_extra_env --> []" in err


def test_no_tracing_by_default(host: PluginHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.pm.hook.corral_extra_env(spec=corral.SandboxSpec(), backend=BACKEND)
    assert capsys.readouterr().err == ""
