"""`ring`: ring attention, K/V passed around the cp group point to point, zigzag-balanced for causal models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lcplug.cp.params import CPParams
from lcplug.cp.strategies import HeadsThenRing
from lcplug.hookspecs import hookimpl
from lcplug.params import param
from lcplug.plugin import CPPlugin


@dataclass(frozen=True)
class RingParams(CPParams):
    layout: Literal["zigzag", "contiguous"] = param(
        "zigzag",
        "zigzag: rank r holds chunks r and 2P-1-r (equal causal work per rank); contiguous: chunk r (a sliding "
        "window then needs one ring step)",
    )


class RingCP(CPPlugin):
    """Ring attention: each rank keeps its queries and passes its K/V shard on to the next rank, P - 1 times.

    Each step's transfer (isend/irecv) overlaps the previous shard's attention; partial results merge by
    log-sum-exp. A step computes only the key blocks its queries' pattern keeps, and the ring stops as
    soon as no rank needs a further shard (a sliding window over contiguous shards: one step). Per layer
    and rank it moves about 2 N d_kv bytes forward, the same again in backward (dK/dV go home).
    """

    name = "ring"
    Params = RingParams

    def strategy(self) -> HeadsThenRing:
        return HeadsThenRing(ulysses=1, layout=self.params.layout)


@hookimpl
def lcplug_register(register):
    register(RingCP)
