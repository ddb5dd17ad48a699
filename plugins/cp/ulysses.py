"""`ulysses`: DeepSpeed-Ulysses, an all-to-all from sequence shards to head shards and back."""

from __future__ import annotations

from lcplug.cp.params import CPParams
from lcplug.cp.strategies import HeadsThenRing
from lcplug.hookspecs import hookimpl
from lcplug.plugin import CPPlugin


class UlyssesCP(CPPlugin):
    """Ulysses: one all-to-all gives each rank H / P heads of the whole sequence, attention runs locally,
    another all-to-all returns the output to sequence shards.

    The degree must divide the query heads (a clear error at patch time otherwise; use hybrid beyond);
    with more ranks than KV heads, KV heads are replicated. Volume per layer and rank about
    (N/P)(2d + 2d_kv)(P-1)/P; the pattern runs unchanged on the whole sequence.
    """

    name = "ulysses"
    Params = CPParams

    def strategy(self) -> HeadsThenRing:
        return HeadsThenRing(ulysses=self.params.degree, layout="contiguous")


@hookimpl
def lcplug_register(register):
    register(UlyssesCP)
