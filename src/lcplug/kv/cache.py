"""`TieredCache`: a `transformers.Cache` whose layers keep K/V in blocks over device, host and disk tiers.

    with TieredCache(model, tier="disk", hot_tokens=4096) as cache:
        out = model.generate(ids, cache=cache, max_new_tokens=64)   # or past_key_values=cache

Each layer gets a `TieredLayer` shaped by that layer's attention: a layer lcplug patched with a static
pattern (sliding window, streaming blocks) keeps only the blocks its pattern can still read, all hot; any
other layer (the model's own attention, DSA's dynamic selection, gated mixes) is dense: it keeps every
block, sink and recent blocks pinned hot, the rest spilled least-recently-used to the lower tier once the
layer holds more than `hot_tokens`. Disk blocks live in a private directory removed on `close`, on leaving
a `with` block (also through an exception), and by a finalizer if the cache is garbage-collected.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn
from transformers.cache_utils import Cache

from ..attention.dispatch import SUBMODULE
from ..attention.layer import PatternAttention
from ..attention.pattern import Pattern, check_block_size
from ..errors import ParamError
from .layer import TieredLayer
from .placement import RecencyLRU
from .store import DiskStore, HostStore, private_directory, release

Tier = Literal["device", "host", "disk"]
TIERS: tuple[str, ...] = ("device", "host", "disk")
DENSE_BLOCK_SIZE = 64
"""Block size of layers without a pattern when none is given."""


def layer_patterns(model: nn.Module) -> dict[int, Pattern | None]:
    """Each attention layer's static pattern, or None where the layer reads every key (unpatched layers too)."""
    from ..patching import choose_adapter

    patterns: dict[int, Pattern | None] = {}
    for idx, module in choose_adapter(model).attention_modules(model).items():
        layer = module._modules.get(SUBMODULE)
        patterns[idx] = layer.pattern if isinstance(layer, PatternAttention) else None
    return patterns


@dataclass(frozen=True)
class LayerPlan:
    """How one layer will be cached: its block size, its pattern (None: dense) and, if it spills, its placement."""

    idx: int
    block_size: int
    pattern: Pattern | None
    placement: RecencyLRU | None


def plan_layers(
    model: nn.Module,
    tier: Tier,
    *,
    hot_tokens: int = 4096,
    block_size: int | None = None,
    sink_blocks: int = 1,
    recent_blocks: int = 1,
) -> list[LayerPlan]:
    """The per-layer plan of a cache for `model`; raises ParamError when a budget cannot hold its pinned blocks
    (a plugin calls it at patch time, so a bad budget fails there and not at the first `generate`).

    `hot_tokens` is each dense layer's device budget (spilling tiers); `block_size` None takes each layer's
    pattern block size (64 for dense layers); `sink_blocks` leading and `recent_blocks` trailing sealed
    blocks stay pinned hot.
    """
    if tier not in TIERS:
        raise ParamError(f"kv: unknown tier {tier!r}; valid: {', '.join(TIERS)}")
    if block_size is not None:
        check_block_size(block_size, "kv")
    plans = []
    for idx, pattern in sorted(layer_patterns(model).items()):
        size = block_size or (pattern.block_size if pattern is not None else DENSE_BLOCK_SIZE)
        spills = pattern is None and tier != "device"
        placement = RecencyLRU(sink_blocks, recent_blocks, hot_tokens // size) if spills else None
        plans.append(LayerPlan(idx, size, pattern, placement))
    return plans


class TieredCache(Cache):
    """A block-granular KV cache over tiers; see the module docstring.

    `tier`: "device" keeps every block hot (pattern layers still drop what they will never read); "host"
    spills dense layers' cold blocks to CPU memory; "disk" to memory-mapped files under `path` (None: the
    system temp directory) in a private 0700 directory. `settings` (`hot_tokens`, `block_size`,
    `sink_blocks`, `recent_blocks`) shape each layer as `plan_layers` says.
    """

    def __init__(
        self, model: nn.Module, tier: Tier = "disk", *, path: str | os.PathLike | None = None, **settings: Any
    ):
        plans = plan_layers(model, tier, **settings)
        self.tier = tier
        self.directory: Path | None = private_directory(path) if tier == "disk" else None
        stores: list[HostStore | DiskStore] = []
        self._finalizer = weakref.finalize(self, release, stores, self.directory)
        layers = []
        try:
            for plan in plans:
                store = self._store(plan.idx) if plan.placement is not None else None
                if store is not None:
                    stores.append(store)
                layers.append(TieredLayer(plan.idx, plan.block_size, plan.pattern, store, plan.placement))
        except BaseException:
            self.close()
            raise
        super().__init__(layers=layers)

    def _store(self, idx: int) -> HostStore | DiskStore:
        return HostStore() if self.tier == "host" else DiskStore(self.directory, f"layer{idx:03d}")

    def stats(self) -> dict[str, int]:
        """Block counts per state and lower-tier bytes read, summed over layers."""
        total: dict[str, int] = {}
        for layer in self.layers:
            for key, value in layer.stats().items():
                total[key] = total.get(key, 0) + value
        return total

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Free every tier and remove the cache directory (idempotent)."""
        self._finalizer()

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
