"""Word statistics for plain text: the small project that fan_out.py tests."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

__all__ = ["counts", "reading_minutes", "top", "words", "write_report"]

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def words(text: str) -> list[str]:
    """The words of ``text``, lower-cased, in order; an apostrophe inside a word keeps it
    whole ("don't"), punctuation around it does not count."""
    return _WORD.findall(text.lower())


def counts(text: str) -> Counter[str]:
    """How often each word occurs."""
    return Counter(words(text))


def top(text: str, n: int) -> list[tuple[str, int]]:
    """The ``n`` most frequent words with their counts, most frequent first; words
    that occur equally often in alphabetical order."""
    if n < 0:
        raise ValueError(f"n must be 0 or more, not {n}")
    ranked = sorted(counts(text).items(), key=lambda item: (-item[1], item[0]))
    return ranked[:n]


def reading_minutes(text: str, per_minute: int = 200) -> int:
    """Whole minutes to read ``text`` at ``per_minute`` words a minute (0 for no words)."""
    if per_minute <= 0:
        raise ValueError(f"per_minute must be positive, not {per_minute}")
    return math.ceil(len(words(text)) / per_minute)


def write_report(text: str, path: Path, n: int = 10) -> int:
    """Write the ``n`` most frequent words to ``path``, one ``word count`` a line; the
    number of lines written."""
    lines = [f"{word} {count}" for word, count in top(text, n)]
    path.write_text("".join(line + "\n" for line in lines))
    return len(lines)
