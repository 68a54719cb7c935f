"""MkDocs hooks: the reference parts of the docs are generated from the code at build time.

A page writes a marker such as ``<!-- corral:config -->`` and gets, in its place, the
configuration reference (from the attrs classes), the command-line reference (from the
argparse parser), the hook reference (from the hookspecs) or the table of what each
backend enforces (from the backends' declared capability conditions). So the docs
cannot drift from the code.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from typing import Any

import attrs

MARKER = re.compile(r"<!-- corral:([a-z-]+) -->")


def _type_name(field: attrs.Attribute) -> str:
    kind = field.type
    text = kind.__name__ if isinstance(kind, type) else str(kind)
    text = text.replace("typing.", "").replace("NoneType", "None")
    return text.replace("|", "\\|")


def _default(field: attrs.Attribute) -> str:
    default = field.default
    if default is attrs.NOTHING:
        return "required"
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    if attrs.has(type(default)):
        return "(table below)"
    if default is None:
        return "none"
    return f"`{default!r}`"


def _doc_of(cls: type) -> str:
    return inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0]


def _table(cls: type, prefix: str) -> list[str]:
    lines = [f"### `{prefix}`", "", _doc_of(cls), "", "| key | type | default |", "|---|---|---|"]
    nested = []
    for field in attrs.fields(cls):
        lines.append(f"| `{field.name}` | {_type_name(field)} | {_default(field)} |")
        default = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        if attrs.has(type(default)):
            nested.append((type(default), f"{prefix}.{field.name}"))
    lines.append("")
    for sub, name in nested:
        lines += _table(sub, name)
    return lines


def config_reference() -> str:
    from corral import Healthcheck, Mount, SandboxSpec, Settings, Tmpfs, Volume
    from corral.core.plugins import PluginHost

    lines = _table(Settings, "top level")
    lines += _table(SandboxSpec, "sandbox")
    for cls, name in (
        (Mount, 'sandbox.mounts[] (type = "bind")'),
        (Tmpfs, 'sandbox.mounts[] (type = "tmpfs")'),
        (Volume, 'sandbox.mounts[] (type = "volume")'),
        (Healthcheck, "sandbox.healthcheck"),
    ):
        lines += _table(cls, name)
    host = PluginHost(environ={"CORRAL_DISABLE_PLUGIN_AUTOLOAD": "1"})
    for name, record in sorted(host.backends().items()):
        settings_cls = record.info.backend.Settings
        if attrs.fields(settings_cls):
            lines += _table(settings_cls, f"backends.{name}")
    from corral.plugins.audit import AuditSettings
    from corral.plugins.metrics import MetricsSettings
    from corral.plugins.repository.model import CredentialsSettings, RepositorySettings

    for cls, name in ((AuditSettings, "plugins.audit"), (MetricsSettings, "plugins.metrics"),
                      (RepositorySettings, "plugins.repository"),
                      (CredentialsSettings, "plugins.repository.credentials")):
        lines += _table(cls, name)
    return "\n".join(lines)


def cli_reference() -> str:
    from corral.cli import build_parser

    parser = build_parser()
    parts = ["```text", parser.format_help().rstrip(), "```", ""]
    for action in parser._subparsers._group_actions:  # argparse offers no public walk
        for name, sub in action.choices.items():
            parts += [f"### `corral {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def hooks_reference() -> str:
    from corral.core import hookspecs

    parts = []
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if not name.startswith("corral_"):
            continue
        opts: dict[str, Any] = getattr(fn, "corral_spec", {}) or {}
        kind = (
            ", ".join(k for k in ("firstresult", "historic") if opts.get(k))
            or "all implementations"
        )
        signature = str(inspect.signature(fn)).replace("'", "")
        parts += [f"## `{name}`", "", f"`{name}{signature}` — called: {kind}.", ""]
        parts += [textwrap.dedent(inspect.getdoc(fn) or "").strip(), ""]
    return "\n".join(parts)


def security_table() -> str:
    from corral.core.backend import Capability
    from corral.core.plugins import PluginHost

    host = PluginHost(environ={"CORRAL_DISABLE_PLUGIN_AUTOLOAD": "1"})
    backends = sorted(host.backends().items())
    lines = [
        "| capability | " + " | ".join(f"`{n}`" for n, _ in backends) + " |",
        "|---|" + "---|" * len(backends),
    ]
    for cap in Capability:
        cells = []
        for _, record in backends:
            found = [why for caps, why in record.info.backend.capability_conditions if cap in caps]
            cells.append(found[0] if found else "no (refused)")
        lines.append(f"| `{cap.name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


GENERATORS = {
    "config": config_reference,
    "cli": cli_reference,
    "hooks": hooks_reference,
    "security-table": security_table,
}


def on_page_markdown(markdown: str, **_: Any) -> str:
    return MARKER.sub(lambda m: GENERATORS[m.group(1)](), markdown)
