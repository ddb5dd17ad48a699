"""`allgather`: Llama 3's context parallelism, all-gather K/V and attend locally."""

from __future__ import annotations

from lcplug.cp.params import CPParams
from lcplug.cp.strategies import AllGatherKV
from lcplug.hookspecs import hookimpl
from lcplug.plugin import CPPlugin


class AllGatherCP(CPPlugin):
    """All-gather K/V over the cp group, run each rank's queries over the whole sequence's keys, and
    reduce-scatter dK/dV in backward.

    Simple and mask-agnostic (documents, windows, content selection all see every key); volume per layer
    and rank 2 N d_kv (P-1)/P, not overlapped, and K/V of the whole sequence held at once.
    """

    name = "allgather"
    Params = CPParams

    def strategy(self) -> AllGatherKV:
        return AllGatherKV()


@hookimpl
def lcplug_register(register):
    register(AllGatherCP)
