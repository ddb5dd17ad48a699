"""Haystack text: what needles hide in and what perplexity is measured on.

The default source is the Python standard library's own source (found through `sysconfig`), so every
machine that runs lcplug has a long, varied, license-clean text without a download. Any file or
directory can replace it. Files are read in a stable sorted order (by path relative to the source),
so a seed picks the same windows on every machine with the same source.
"""

from __future__ import annotations

import os
import random
import sysconfig
from pathlib import Path

from ..errors import LcplugError
from .tokens import Tokenizer

SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
"""Never read: installed third-party packages (they differ per machine) and bytecode caches."""

SEPARATOR = "\n\n"
"""Joins documents, and the end of the text to its start when a window wraps around."""


class HaystackError(LcplugError, ValueError):
    """A haystack source is missing or holds no readable text."""


def stdlib_source() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(source: Path, *, python_only: bool) -> list[Path]:
    """The files of `source` (one file, or a directory searched recursively) in stable sorted order."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise HaystackError(f"haystack source {str(source)!r} does not exist; give a text file or a directory")
    files = []
    for root, dirs, names in os.walk(source):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]  # pruned, so site-packages is never walked
        paths = (Path(root, n) for n in names if not python_only or n.endswith(".py"))
        files += [p for p in paths if p.is_file()]  # regular files only: a pipe or socket would block
    return sorted(files, key=lambda p: p.relative_to(source).as_posix())


class Haystack:
    """Text read lazily from a source (default: the standard library's `.py` files), at most `max_chars`.

    `window(tokenizer, n, rng)` cuts `n` tokens starting at a seeded line start; a source shorter than a
    window is repeated, so a short essay still fills a long context.
    """

    def __init__(self, source: str | Path | None = None, *, max_chars: int = 4_000_000):
        if max_chars < 1:
            raise HaystackError(f"max_chars={max_chars}; valid: an integer >= 1")
        self.source = Path(source) if source is not None else stdlib_source()
        self.default = source is None
        self.max_chars = max_chars
        self._text: str | None = None

    def __repr__(self) -> str:
        return f"Haystack({str(self.source)!r})"

    @property
    def text(self) -> str:
        """The documents joined by blank lines, read on first use; an empty source is an error."""
        if self._text is None:
            self._text = self._read()
        return self._text

    def _read(self) -> str:
        files = source_files(self.source, python_only=self.default)
        parts: list[str] = []
        size = 0
        for path in files:
            try:
                text = path.read_text(encoding="utf-8").strip()
            except (UnicodeDecodeError, OSError):
                continue  # binary or unreadable files are not text
            if not text:
                continue
            parts.append(text)
            size += len(text) + len(SEPARATOR)
            if size >= self.max_chars:
                break
        if not parts:
            what = "file" if self.source.is_file() else f"directory ({len(files)} files)"
            raise HaystackError(f"haystack source {str(self.source)!r} has no text: an empty or non-UTF-8 {what}")
        return SEPARATOR.join(parts)[: self.max_chars]

    def window(self, tokenizer: Tokenizer, n: int, rng: random.Random) -> list[int]:
        """`n` token ids of the text from a random line start (wrapping around the end of the text)."""
        text = self.text
        start = rng.randrange(len(text))
        newline = text.find("\n", start)
        start = 0 if newline < 0 else (newline + 1) % len(text)
        chars = 8 * n + 64  # a guess at the characters n tokens need; doubled until it is enough
        while chars <= 64 * (8 * n + 64):
            ids = tokenizer.encode(_ring_slice(text, start, chars))
            if len(ids) >= n:
                return ids[:n]
            chars *= 2
        raise HaystackError(f"the tokenizer makes fewer than {n} tokens of {chars // 2} characters of {self}")


def _ring_slice(text: str, start: int, length: int) -> str:
    """`length` characters of `text` from `start`, wrapping around through the separator."""
    ring = text + SEPARATOR
    out = ring[start : start + length]
    while len(out) < length:
        out += ring[: length - len(out)]
    return out
