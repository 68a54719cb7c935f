"""The "corral" logger, fetched from logging on first use.

deferred: logging (with traceback, string and textwrap) costs ~5 ms at `import corral`,
and corral only logs on unusual paths (loosened sandboxes, failed clean-ups, pools).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import logging

__all__ = ["log"]


class _LazyLogger:
    """Every attribute is that of ``logging.getLogger("corral")``, looked up when used."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        import logging

        return getattr(logging.getLogger("corral"), name)

    def __repr__(self) -> str:
        return "<lazy logger 'corral'>"


log = cast("logging.Logger", _LazyLogger())
