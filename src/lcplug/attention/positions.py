"""Token positions as attention patterns see them: the one implementation lives in `lcplug.positions`.

Kept as an import path so patterns, executors and third-party plugins written against
`lcplug.attention.positions.pattern_positions` keep working.
"""

from __future__ import annotations

from ..positions import pattern_positions

__all__ = ["pattern_positions"]
