"""Parameters of the KV tier plugins, one class per tier, each adding what its tier needs."""

from __future__ import annotations

from dataclasses import dataclass

from ..params import Params, param


def _power_of_two(v: int) -> bool:
    return v >= 1 and not v & (v - 1)


@dataclass(frozen=True)
class DeviceTierParams(Params):
    block_size: int | None = param(
        None,
        "tokens per block; None: each layer's attention-pattern block size (64 for dense layers)",
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


@dataclass(frozen=True)
class DiskTierParams(SpillTierParams):
    path: str | None = param(
        None, "directory in which a private (0700) cache directory is made; None: the system temp directory"
    )
