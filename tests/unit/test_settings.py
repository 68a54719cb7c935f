"""Settings: each source overrides the weaker ones, and each error names its source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import corral
from corral.core.lifecycle import build_spec, select_backend_name
from corral.core.settings import Settings, load_settings

GiB = 1024**3


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def memory(settings: Settings) -> int:
    """The memory limit a sandbox made with these settings (and no keywords) gets."""
    return build_spec(settings, None, {}).limits.memory


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project folder, made the current folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


PYPROJECT = """
[project]
name = "example"

[tool.corral]
backend = "from-pyproject"
max_output = "1MiB"

[tool.corral.sandbox.limits]
memory = "1g"
pids = 64
"""

CORRAL_TOML = """
backend = "from-corral-toml"

[sandbox.limits]
memory = "2g"
"""


def test_defaults_without_any_source(project: Path) -> None:
    settings = load_settings(cwd=project, environ={})
    assert settings == Settings()
    assert settings.backend is None
    assert settings.max_output == 4 * 1024**2
    assert memory(settings) == 512 * 1024**2


def test_pyproject_table_overrides_defaults(project: Path) -> None:
    write(project / "pyproject.toml", PYPROJECT)
    settings = load_settings(cwd=project, environ={})
    assert settings.backend == "from-pyproject"
    assert settings.max_output == 1024**2
    assert memory(settings) == GiB


def test_a_pyproject_without_a_corral_table_changes_nothing(project: Path) -> None:
    write(project / "pyproject.toml", '[project]\nname = "x"\n')
    assert load_settings(cwd=project, environ={}) == Settings()


def test_files_are_found_in_parent_folders(project: Path) -> None:
    write(project / "pyproject.toml", PYPROJECT)
    deeper = project / "src" / "pkg"
    deeper.mkdir(parents=True)
    assert load_settings(cwd=deeper, environ={}).backend == "from-pyproject"


def test_corral_toml_overrides_pyproject_and_tables_merge(project: Path) -> None:
    write(project / "pyproject.toml", PYPROJECT)
    write(project / "corral.toml", CORRAL_TOML)
    settings = load_settings(cwd=project, environ={})
    assert settings.backend == "from-corral-toml"
    assert memory(settings) == 2 * GiB
    # Keys the stronger file does not set are kept from the weaker one.
    assert settings.max_output == 1024**2
    assert build_spec(settings, None, {}).limits.pids == 64


def test_corral_config_names_the_file_instead_of_corral_toml(
    project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    write(project / "corral.toml", CORRAL_TOML)
    elsewhere = write(tmp_path_factory.mktemp("etc") / "site.toml", 'backend = "from-config"\n')
    settings = load_settings(cwd=project, environ={"CORRAL_CONFIG": str(elsewhere)})
    assert settings.backend == "from-config"
    assert memory(settings) == 512 * 1024**2  # the corral.toml beside it was not read


def test_variables_override_files_and_nest_with_double_underscores(project: Path) -> None:
    write(project / "pyproject.toml", PYPROJECT)
    write(project / "corral.toml", CORRAL_TOML)
    environ = {
        "CORRAL_BACKEND": "from-variable",
        "CORRAL_SANDBOX__LIMITS__MEMORY": "3g",
        "CORRAL_SANDBOX__LIMITS__NOFILE": "100",
        "HOME": "/nowhere",  # variables without the prefix are not settings
    }
    settings = load_settings(cwd=project, environ=environ)
    assert settings.backend == "from-variable"
    assert memory(settings) == 3 * GiB
    spec = build_spec(settings, None, {})
    assert spec.limits.nofile == 100  # read as a TOML value: a number, not text
    assert spec.limits.pids == 64


def test_environment_variables_keep_their_names_and_text_in_env(project: Path) -> None:
    environ = {"CORRAL_SANDBOX__ENV__My_Var": "1", "CORRAL_SANDBOX__LABELS__Team": "true"}
    spec = build_spec(load_settings(cwd=project, environ=environ), None, {})
    assert spec.env == {"My_Var": "1"}
    assert spec.labels == {"Team": "true"}


def test_explicit_overrides_win(project: Path) -> None:
    write(project / "corral.toml", CORRAL_TOML)
    settings = load_settings(
        {"backend": "from-arguments", "sandbox": {"limits": {"memory": "4g"}}},
        cwd=project,
        environ={"CORRAL_BACKEND": "from-variable", "CORRAL_SANDBOX__LIMITS__MEMORY": "3g"},
    )
    assert settings.backend == "from-arguments"
    assert memory(settings) == 4 * GiB


def test_the_backend_is_chosen_through_the_settings_alone(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CORRAL_BACKEND is read once, as one source of the settings, in its place."""
    monkeypatch.setenv("CORRAL_BACKEND", "from-process")
    explicit = load_settings({"backend": "from-arguments"}, cwd=project, environ={})
    assert select_backend_name(None, explicit) == "from-arguments"
    assert select_backend_name(None, load_settings(cwd=project, environ={})) == "local"
    assert select_backend_name(None, Settings(backend="given")) == "given"
    # Read from the environment given, and weaker than arguments as documented.
    given = load_settings(cwd=project, environ={"CORRAL_BACKEND": "from-variable"})
    assert select_backend_name(None, given) == "from-variable"
    assert select_backend_name("from-caller", given) == "from-caller"


def test_control_variables_are_not_settings(project: Path) -> None:
    environ = {
        "CORRAL_DISABLE_PLUGINS": "a,b",
        "CORRAL_DISABLE_PLUGIN_AUTOLOAD": "1",
        "CORRAL_TRACE_PLUGINS": "1",
        "CORRAL_DEBUG": "1",
    }
    assert load_settings(cwd=project, environ=environ) == Settings()


def test_backend_tables_are_kept_raw_for_the_backend(project: Path) -> None:
    write(project / "corral.toml", '[backends.docker]\nbase_url = "unix:///x.sock"\n')
    settings = load_settings(cwd=project, environ={"CORRAL_BACKENDS__DOCKER__TIMEOUT": "30"})
    assert settings.backends == {"docker": {"base_url": "unix:///x.sock", "timeout": 30}}


def test_plugin_tables_are_kept_raw_for_the_plugin(project: Path) -> None:
    write(project / "corral.toml", '[plugins.audit]\npath = "audit.jsonl"\n')
    environ = {"CORRAL_PLUGINS__METRICS__PROMETHEUS": "true"}
    settings = load_settings(cwd=project, environ=environ)
    assert settings.plugins == {"audit": {"path": "audit.jsonl"}, "metrics": {"prometheus": True}}
    with pytest.raises(corral.ConfigError, match=r"plugins\.audit: 'x' is not a table"):
        load_settings({"plugins": {"audit": "x"}}, cwd=project, environ={})


# -- errors name their source ----------------------------------------------------------


def test_unknown_key_in_pyproject_names_it(project: Path) -> None:
    path = write(project / "pyproject.toml", "[tool.corral]\nbakend = 'docker'\n")
    expected = re.escape(f"{path} [tool.corral]: bakend: unknown setting")
    with pytest.raises(corral.ConfigError, match=expected):
        load_settings(cwd=project, environ={})


def test_unknown_key_in_corral_toml_names_the_file_and_field(project: Path) -> None:
    path = write(project / "corral.toml", "[sandbox.limits]\nmemroy = '1g'\n")
    expected = re.escape(f"{path}: sandbox.limits.memroy: unknown setting")
    with pytest.raises(corral.ConfigError, match=expected):
        load_settings(cwd=project, environ={})


def test_bad_value_in_corral_toml_names_the_file_and_field(project: Path) -> None:
    path = write(project / "corral.toml", "[sandbox.limits]\nmemory = '-1g'\n")
    expected = re.escape(f"{path}: sandbox.limits.memory: '-1g' is not a size")
    with pytest.raises(corral.ConfigError, match=expected):
        load_settings(cwd=project, environ={})


def test_unknown_variable_names_the_variables(project: Path) -> None:
    with pytest.raises(corral.ConfigError, match=r"^CORRAL_\* variables: bakend: unknown"):
        load_settings(cwd=project, environ={"CORRAL_BAKEND": "docker"})
    with pytest.raises(
        corral.ConfigError, match=r"^CORRAL_\* variables: sandbox\.limits\.memroy: unknown"
    ):
        load_settings(cwd=project, environ={"CORRAL_SANDBOX__LIMITS__MEMROY": "1g"})


def test_unknown_override_names_the_arguments(project: Path) -> None:
    with pytest.raises(corral.ConfigError, match=r"^arguments: bakend: unknown setting"):
        load_settings({"bakend": "docker"}, cwd=project, environ={})


def test_missing_corral_config_file_is_an_error(project: Path) -> None:
    missing = project / "nope.toml"
    with pytest.raises(corral.ConfigError, match=r"^CORRAL_CONFIG: .*nope\.toml.* is not a file"):
        load_settings(cwd=project, environ={"CORRAL_CONFIG": str(missing)})


def test_bad_toml_names_the_file(project: Path) -> None:
    path = write(project / "corral.toml", "backend = \n")
    with pytest.raises(corral.ConfigError, match=re.escape(f"{path}: not valid TOML")) as info:
        load_settings(cwd=project, environ={})
    assert info.value.path == str(path)


def test_bad_toml_in_pyproject_names_the_file(project: Path) -> None:
    path = write(project / "pyproject.toml", "[tool.corral\n")
    with pytest.raises(corral.ConfigError, match=re.escape(f"{path}: not valid TOML")):
        load_settings(cwd=project, environ={})


def test_a_sandbox_table_of_the_wrong_shape_is_refused(project: Path) -> None:
    write(project / "corral.toml", 'sandbox = "big"\n')
    with pytest.raises(corral.ConfigError, match=r"sandbox: 'big' is not a table"):
        load_settings(cwd=project, environ={})
