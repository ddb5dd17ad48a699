"""Errors lcplug raises on bad input.

Every error is one line that names the bad value and says what would be valid, so the CLI can print it
as-is (exit code 2) and a user never has to read a traceback to fix a spec.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LcplugError(Exception):
    """Base class: a user-facing error with a one-line message."""


class UnknownPluginError(LcplugError, KeyError):
    """A spec names a plugin no installed distribution registers."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(
            f"unknown {kind} plugin {name!r}{hint} (installed {kind} plugins: {', '.join(known) or 'none'})"
        )
        self.kind, self.name, self.close_matches = kind, name, close

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DuplicatePluginError(LcplugError):
    """Two distributions register a plugin of the same kind and name."""


class ParamError(LcplugError, ValueError):
    """A plugin parameter has a bad name, type or value."""


class SpecError(LcplugError, ValueError):
    """A patch spec (string, dict or YAML) cannot be parsed."""


class UnsupportedModelError(LcplugError, TypeError):
    """The model lacks what a plugin or adapter needs."""


class ConflictError(LcplugError, ValueError):
    """Two plugins in one spec cannot be combined."""


class ManifestError(LcplugError, ValueError):
    """A manifest in `config.lcplug` is missing, malformed, or needs something not installed."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """A short suffix suggesting the closest valid names, or the valid names when none is close."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    if close:
        return f"did you mean {', '.join(repr(c) for c in close)}?"
    return f"valid: {', '.join(valid) or 'none'}"
