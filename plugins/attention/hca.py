"""`hca`: DeepSeek-V4's heavily compressed attention: dense over large compressed windows + a raw window."""

from __future__ import annotations

from dataclasses import dataclass

from lcplug.attention.compress import Geometry
from lcplug.hookspecs import hookimpl
from lcplug.plugins.attention.compressed import CompressedParams, CompressedPlugin, positive


@dataclass(frozen=True)
class HCAParams(CompressedParams):
    size: int = positive(128, "tokens pooled into each compressed entry (m'); windows do not overlap")
    window: int = positive(128, "raw tokens each query sees, itself included (the sliding-window branch)")

    def geometry(self) -> Geometry:
        return Geometry(self.size, self.size, self.window)


class HCA(CompressedPlugin):
    """HCA (DeepSeek-V4): every `size` tokens pooled into one entry, attended densely, plus a raw window.

    A query attends, in one softmax, to its last `window` raw tokens and to every compressed entry whose
    window is complete at or before it; a cache keeps the raw window plus N / size entries. Pooling weights
    softmax(Z + B) start uniform (window means). DeepSeek-V4 trains this natively; here it is a retrofit:
    `train: compress`, `losses: {distill: 1.0}` fits the pooling to the model's own attention.
    """

    name = "hca"
    Params = HCAParams


@hookimpl
def lcplug_register(register):
    register(HCA)
