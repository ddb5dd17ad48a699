"""Parameters of the KV tier plugins, one class per tier, each adding what its tier needs."""

from __future__ import annotations

from dataclasses import dataclass

from ..params import Params, param
from .quant import Quantize


def _power_of_two(v: int) -> bool:
    return v >= 1 and not v & (v - 1)


@dataclass(frozen=True)
class DeviceTierParams(Params):
    block_size: int | None = param(
        None,
        "tokens per block of dense layers; None: 64 (pattern and DSA layers always use their own block size)",
        check=_power_of_two,
        valid="a power of two, e.g. 64 or 128",
    )


@dataclass(frozen=True)
class SpillTierParams(DeviceTierParams):
    hot_tokens: int = param(
        4096,
        "tokens each dense layer keeps on the device; colder blocks spill",
        check=lambda v: v >= 1,
        valid="an integer >= 1",
    )
    sink_blocks: int = param(1, "leading blocks pinned hot", check=lambda v: v >= 0, valid="an integer >= 0")
    recent_blocks: int = param(
        1, "most recent sealed blocks pinned hot", check=lambda v: v >= 0, valid="an integer >= 0"
    )
    placement: str = param(
        "lru",
        "placement policy (a `placement` plugin) ordering which hot blocks spill first: 'lru' (least recently "
        "read) or 'reads' (fewest reads; suits DSA), or any installed one",
    )
    prefetch: bool = param(
        True, "read the next dense layer's spilled blocks on a worker thread while the current layer computes"
    )
    quantize: Quantize = param(
        "none",
        "how spilled blocks are stored: 'none' exactly, 'int8' (lossy, ~4x smaller than fp32) with per-channel "
        "key and per-token value scales; the error is reported in the cache's stats()",
    )


@dataclass(frozen=True)
class DiskTierParams(SpillTierParams):
    path: str | None = param(
        None, "directory in which a private (0700) cache directory is made; None: the system temp directory"
    )
