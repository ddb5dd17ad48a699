"""`reads` placement: the block read by the fewest steps leaves first."""

from __future__ import annotations

from lcplug.hookspecs import hookimpl
from lcplug.plugin import PlacementPlugin


class FewestReads(PlacementPlugin):
    """Evict the hot block read by the fewest steps (ties: read longest ago, then the older block). Right
    when a few blocks are selected again and again, as a DSA indexer's favourite blocks are: they stay hot
    while one-off selections leave."""

    name = "reads"

    def eviction_order(self, candidates: list[int], last_use: dict[int, int], reads: dict[int, int]) -> list[int]:
        return sorted(candidates, key=lambda b: (reads.get(b, 0), last_use[b], b))


@hookimpl
def lcplug_register(register):
    register(FewestReads)
