"""A filtered copy of a folder staged on the host, for upload: include and exclude globs."""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

import attrs

__all__ = ["PathFilter", "stage"]


def _translate(pattern: str) -> str:
    """A glob as a regular expression: ``*`` and ``?`` stay within a name, ``**`` does not."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            negate = body[:1] in ("!", "^")
            body = re.escape(body[1:] if negate else body).replace(r"\-", "-")
            out.append(f"[{'^/' if negate else ''}{body}]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


@attrs.frozen
class _Pattern:
    regex: re.Pattern[str]
    anchored: bool  # matched against the whole relative path, else against the name

    @classmethod
    def parse(cls, text: str) -> _Pattern:
        body = text.strip("/")
        anchored = text.startswith("/") or "/" in body
        return cls(re.compile(_translate(body) + r"\Z", re.S), anchored)

    def matches(self, relative: str) -> bool:
        subject = relative if self.anchored else relative.rsplit("/", 1)[-1]
        return self.regex.match(subject) is not None


@attrs.frozen
class PathFilter:
    """Which paths (relative, ``/``-separated) of a tree to copy.

    A path is left out when it matches an exclude pattern; otherwise it is copied when
    there are no include patterns, or when it or a folder above it matches one.
    """

    include: tuple[_Pattern, ...]
    exclude: tuple[_Pattern, ...]

    @classmethod
    def of(cls, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> PathFilter:
        return cls(
            tuple(_Pattern.parse(p) for p in include), tuple(_Pattern.parse(p) for p in exclude)
        )

    def excluded(self, relative: str) -> bool:
        return any(p.matches(relative) for p in self.exclude)

    def included(self, relative: str) -> bool:
        """Whether this path itself matches an include pattern (or none are given)."""
        return not self.include or any(p.matches(relative) for p in self.include)


def _copy_file(source: str, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination, follow_symlinks=False)  # cheap when on one filesystem
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def stage(source: Path, destination: Path, rules: PathFilter) -> list[str]:
    """Copy what ``rules`` let through from folder ``source`` into new folder ``destination``.

    Only regular files and folders are copied; symlinks (never followed) and special
    files are skipped, and their relative paths returned.
    """
    destination.mkdir()
    destination.chmod(stat.S_IMODE(source.stat().st_mode) | 0o700)
    skipped: list[str] = []
    # (host folder, its relative path, whether it or a folder above it was included)
    pending: list[tuple[str, str, bool]] = [(str(source), "", not rules.include)]
    while pending:
        folder, relative, included = pending.pop()
        with os.scandir(folder) as entries:
            children = sorted(entries, key=lambda e: e.name)
        for entry in children:
            child = f"{relative}/{entry.name}" if relative else entry.name
            if rules.excluded(child):
                continue
            wanted = included or rules.included(child)
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                if wanted:
                    (destination / child).mkdir(parents=True, exist_ok=True)
                    (destination / child).chmod(stat.S_IMODE(mode) | 0o700)
                pending.append((entry.path, child, wanted))
            elif not wanted:
                continue
            elif stat.S_ISREG(mode):
                _copy_file(entry.path, destination / child)
            else:
                skipped.append(child)
    return skipped
