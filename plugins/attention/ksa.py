"""`ksa`: KSA summary attention retrofitted: raw recent chunks, older chunks through learned summaries."""

from __future__ import annotations

from dataclasses import dataclass

from lcplug.attention.compress import Geometry
from lcplug.hookspecs import hookimpl
from lcplug.params import param
from lcplug.plugins.attention.compressed import CompressedParams, CompressedPlugin, positive


@dataclass(frozen=True)
class KSAParams(CompressedParams):
    chunk: int = positive(8, "tokens per chunk; each complete chunk gets one summary entry (k)")
    window: int = param(
        128, "chunks each query sees raw, its own included (KSA: 128)", check=lambda v: v >= 1, valid="an integer >= 1"
    )

    def geometry(self) -> Geometry:
        return Geometry(self.chunk, self.chunk, self.window, chunk=self.chunk, disjoint=True)


class KSA(CompressedPlugin):
    """KSA (arXiv:2604.24432) as a retrofit: one learned summary per chunk of `chunk` tokens.

    A query sees its last `window` chunks raw and every older chunk only through its summary, in one
    softmax; a cache needs the raw window plus one entry per older chunk (O(N / chunk)). A summary is a
    learned query attending to its own chunk only (weights softmax(k . q_sum + B) over the chunk's keys,
    applied to keys and values), starting as the chunk mean, so patching alone already reads old context.
    KSA inserts summary tokens into the sequence; a retrofit of a trained checkpoint pools each layer's
    K/V instead. Retrofit stage: `train: compress` with `losses: {distill: 1.0}` distils the summaries
    against the model's own full attention; `hybrid:sparse=ksa,ratio=3:1` is KSA's 3:1 schedule.
    """

    name = "ksa"
    Params = KSAParams


@hookimpl
def lcplug_register(register):
    register(KSA)
