"""Placement: which hot blocks a dense layer spills when it is over its device budget.

One small policy with one job (kvpress style), kept apart from the mechanism so that other policies
(score- or pattern-driven) can replace it: sink blocks and a recency window stay pinned hot, the other
hot blocks leave least-recently-used first.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ParamError


@dataclass(frozen=True)
class RecencyLRU:
    """Pin `sink_blocks` leading and `recent_blocks` trailing sealed blocks; keep at most `hot_blocks` blocks
    hot (the open tail block counts as one); spill the rest, least recently used first."""

    sink_blocks: int
    recent_blocks: int
    hot_blocks: int

    def __post_init__(self) -> None:
        if self.hot_blocks < self.sink_blocks + self.recent_blocks + 1:
            raise ParamError(
                f"kv: a budget of {self.hot_blocks} hot blocks cannot hold sink_blocks={self.sink_blocks} + "
                f"recent_blocks={self.recent_blocks} + the open tail block; raise hot_tokens or lower the pins"
            )

    def victims(self, last_use: dict[int, int], sealed: int) -> list[int]:
        """Hot blocks to spill, given each hot sealed block's last use and the number of sealed blocks."""
        excess = len(last_use) + 1 - self.hot_blocks
        if excess <= 0:
            return []
        pinned_from = sealed - self.recent_blocks
        movable = [b for b in last_use if self.sink_blocks <= b < pinned_from]
        return sorted(movable, key=lambda b: (last_use[b], b))[:excess]
