"""`hybrid`: Ulysses inside groups of ranks, ring attention across the groups (USP / Megatron a2a+p2p)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lcplug.cp.params import CPParams
from lcplug.cp.strategies import HeadsThenRing
from lcplug.errors import ParamError
from lcplug.hookspecs import hookimpl
from lcplug.params import param
from lcplug.plugin import CPPlugin


@dataclass(frozen=True)
class HybridParams(CPParams):
    ulysses: int = param(
        2,
        "ranks per Ulysses (all-to-all) group; degree / ulysses groups form the ring",
        check=lambda v: v >= 1,
        valid="an integer >= 1 dividing degree",
    )
    layout: Literal["zigzag", "contiguous"] = param("zigzag", "shard layout (zigzag balances causal work)")

    def validate(self, owner: str | None = None) -> None:
        super().validate(owner)
        if self.degree % self.ulysses:
            raise ParamError(
                f"{owner or self._owner}: parameter 'ulysses' got {self.ulysses}, which does not divide degree "
                f"{self.degree}; valid: a divisor of {self.degree}"
            )


class HybridCP(CPPlugin):
    """Hybrid context parallelism: an all-to-all inside each group of `ulysses` ranks (heads), a K/V ring
    across the degree / ulysses groups (sequence).

    Keeps the all-to-all inside fast links (ranks of one node) and lets the degree exceed the head
    count; `ulysses=1` is ring, `ulysses=degree` is Ulysses.
    """

    name = "hybrid"
    Params = HybridParams

    def strategy(self) -> HeadsThenRing:
        return HeadsThenRing(ulysses=self.params.ulysses, layout=self.params.layout)


@hookimpl
def lcplug_register(register):
    register(HybridCP)
