"""Placement: which hot blocks a spilling layer sends to the lower tier when it is over its device budget.

Mechanism and policy apart (kvpress style): `Placement` pins the sink and most recent blocks and enforces
the budget; a placement plugin (`kind: placement`, e.g. `lru`, `reads`) orders the other hot blocks for
eviction. A pattern layer never spills at all: it keeps exactly what its pattern can still read.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ParamError
from ..plugin import PlacementPlugin


@dataclass(frozen=True)
class Placement:
    """Pin `sink_blocks` leading and `recent_blocks` trailing sealed blocks; keep at most `hot_blocks` blocks
    hot (the open tail block counts as one); evict the rest in the order `policy` gives."""

    sink_blocks: int
    recent_blocks: int
    hot_blocks: int
    policy: PlacementPlugin

    def __post_init__(self) -> None:
        if self.hot_blocks < self.sink_blocks + self.recent_blocks + 1:
            raise ParamError(
                f"kv: a budget of {self.hot_blocks} hot blocks cannot hold sink_blocks={self.sink_blocks} + "
                f"recent_blocks={self.recent_blocks} + the open tail block; raise hot_tokens or lower the pins"
            )

    def victims(self, last_use: dict[int, int], reads: dict[int, int], sealed: int) -> list[int]:
        """Hot blocks to spill, given each hot sealed block's last use and read count, and the sealed count."""
        excess = len(last_use) + 1 - self.hot_blocks
        if excess <= 0:
            return []
        pinned_from = sealed - self.recent_blocks
        movable = [b for b in last_use if self.sink_blocks <= b < pinned_from]
        return self.policy.eviction_order(movable, last_use, reads)[:excess]


def placement_policy(name: str) -> PlacementPlugin:
    """The registered placement policy `name` (raises UnknownPluginError listing the installed ones)."""
    from ..registry import get_registry

    return get_registry().get("placement", name).build({})
