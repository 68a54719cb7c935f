"""An append-only JSON-lines file shared by the plugins that write records."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["JsonLinesFile", "utc_now"]

# One lock for every file: writes are short, and two handles on one path must not interleave.
_lock = threading.Lock()


def utc_now() -> str:
    """The current time as ISO 8601 in UTC, to the microsecond (``...T12:00:00.000001Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class JsonLinesFile:
    """Appends one JSON object per line to ``path``, created private (0600) if missing.

    The file is opened in append mode for each record and closed again, so each line
    is one ``write`` (complete even with other writers, flushed when ``write`` returns)
    and a log rotator can move the file at any time.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"JsonLinesFile({str(self.path)!r})"

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record``; values JSON cannot hold are written as their ``str()``.

        Raises:
            OSError: the file cannot be opened or written.
        """
        text = json.dumps(record, default=str, ensure_ascii=False, separators=(",", ":"))
        data = (text + "\n").encode()
        with _lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
