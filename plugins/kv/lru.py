"""`lru` placement: the least recently read block leaves first."""

from __future__ import annotations

from lcplug.hookspecs import hookimpl
from lcplug.plugin import PlacementPlugin


class LeastRecentlyUsed(PlacementPlugin):
    """Evict the hot block read longest ago (ties: the older block). Right when reads move with the
    context, as a dense layer's recency-weighted attention does."""

    name = "lru"

    def eviction_order(self, candidates: list[int], last_use: dict[int, int], reads: dict[int, int]) -> list[int]:
        return sorted(candidates, key=lambda b: (last_use[b], b))


@hookimpl
def lcplug_register(register):
    register(LeastRecentlyUsed)
