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

from ..attention.compact import LayerAccess
from ..attention.dispatch import SUBMODULE
from ..attention.layer import LayerAttention
from ..attention.pattern import Pattern, check_block_size
from ..errors import ParamError
from . import persist
from .errors import KVCacheError
from .layer import TieredLayer
from .placement import Placement, placement_policy
from .prefetch import Prefetcher
from .quant import QUANTIZE, QuantError, Quantize, QuantizedStore
from .store import DiskStore, HostStore, private_directory, release

Tier = Literal["device", "host", "disk"]
TIERS: tuple[str, ...] = ("device", "host", "disk")
DENSE_BLOCK_SIZE = 64
"""Block size of layers without a pattern when none is given."""


def layer_access(model: nn.Module) -> dict[int, LayerAccess]:
    """Each attention layer's `LayerAccess`; layers lcplug did not patch read every key, in full."""
    from ..patching import choose_adapter

    access: dict[int, LayerAccess] = {}
    for idx, module in choose_adapter(model).attention_modules(model).items():
        layer = module._modules.get(SUBMODULE)
        access[idx] = layer.kv_access() if isinstance(layer, LayerAttention) else LayerAccess()
    return access


def layer_patterns(model: nn.Module) -> dict[int, Pattern | None]:
    """Each attention layer's static pattern, or None where the layer reads every key (unpatched layers too)."""
    return {idx: access.pattern for idx, access in layer_access(model).items()}


@dataclass(frozen=True)
class LayerPlan:
    """How one layer will be cached: its block size, how it reads keys and, if it spills, its placement."""

    idx: int
    block_size: int
    access: LayerAccess
    placement: Placement | None
    quantize: Quantize = "none"
    """How its spilled blocks are stored (`quant`); "none" for a layer that does not spill."""


def plan_layers(
    model: nn.Module,
    tier: Tier,
    *,
    hot_tokens: int = 4096,
    block_size: int | None = None,
    sink_blocks: int = 1,
    recent_blocks: int = 1,
    placement: str = "lru",
    quantize: Quantize = "none",
) -> list[LayerPlan]:
    """The per-layer plan of a cache for `model`; raises ParamError when a budget cannot hold its pinned blocks
    (a plugin calls it at patch time, so a bad budget fails there and not at the first `generate`).

    `hot_tokens` is the device budget of each layer that keeps every block (dense and content-selecting
    layers; spilling tiers); `block_size` is the block size of dense layers (None: 64), while pattern and
    content-selecting layers always use their own, so the cache can hand them just the blocks they read;
    `sink_blocks` leading and `recent_blocks` trailing sealed blocks stay pinned hot, the other hot blocks
    spilling in the order of the `placement` policy (a registered `placement` plugin); `quantize` "int8"
    stores spilled blocks as int8 with scales (lossy; spilling tiers only).
    """
    if tier not in TIERS:
        raise ParamError(f"kv: unknown tier {tier!r}; valid: {', '.join(TIERS)}")
    if quantize not in QUANTIZE:
        raise ParamError(f"kv: unknown quantize {quantize!r}; valid: {', '.join(QUANTIZE)}")
    if quantize != "none" and tier == "device":
        raise ParamError("kv: quantize applies to the spilling tiers (host, disk); the device tier keeps blocks exact")
    if block_size is not None:
        check_block_size(block_size, "kv")
    policy = placement_policy(placement)
    plans = []
    for idx, access in sorted(layer_access(model).items()):
        size = access.block_size or block_size or DENSE_BLOCK_SIZE
        spills = access.pattern is None and tier != "device"
        placement = Placement(sink_blocks, recent_blocks, hot_tokens // size, policy) if spills else None
        plans.append(LayerPlan(idx, size, access, placement, quantize if spills else "none"))
    return plans


class TieredCache(Cache):
    """A block-granular KV cache over tiers; see the module docstring.

    `tier`: "device" keeps every block hot (pattern layers still drop what they will never read); "host"
    spills dense layers' cold blocks to CPU memory; "disk" to memory-mapped files under `path` (None: the
    system temp directory) in a private 0700 directory. `settings` (`hot_tokens`, `block_size`,
    `sink_blocks`, `recent_blocks`, `quantize`) shape each layer as `plan_layers` says.

    `save(path)` writes the cache to a directory and `TieredCache.open(model, path)` continues from it
    (`persist`): the cache remembers its model (weakly) for the fingerprint it saves.
    """

    def __init__(
        self, model: nn.Module, tier: Tier = "disk", *, path: str | os.PathLike | None = None, **settings: Any
    ):
        prefetch = settings.pop("prefetch", True)
        plans = plan_layers(model, tier, **settings)
        self.tier, self.settings = tier, {**settings, "prefetch": prefetch}
        self._model = weakref.ref(model)
        self.directory: Path | None = private_directory(path) if tier == "disk" else None
        stores: list[HostStore | DiskStore | QuantizedStore] = []
        prefetchers: list[Prefetcher] = []
        self._finalizer = weakref.finalize(self, release, stores, self.directory, prefetchers)
        layers = []
        try:
            for plan in plans:
                store = self._store(plan) if plan.placement is not None else None
                if store is not None:
                    stores.append(store)
                layers.append(TieredLayer(plan.idx, plan.block_size, plan.access, store, plan.placement))
        except BaseException:
            self.close()
            raise
        super().__init__(layers=layers)
        self.prefetcher = Prefetcher(layers) if prefetch and any(layer.prefetchable for layer in layers) else None
        if self.prefetcher is not None:
            prefetchers.append(self.prefetcher)

    def update(self, key_states, value_states, layer_idx: int, *args: Any, **kwargs: Any):
        """Store the new K/V of layer `layer_idx`; with prefetch on, the next dense layer is read ahead meanwhile."""
        if self.prefetcher is not None:
            self.prefetcher.advance(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _store(self, plan: LayerPlan) -> HostStore | DiskStore | QuantizedStore:
        inner = HostStore() if self.tier == "host" else DiskStore(self.directory, f"layer{plan.idx:03d}")
        return QuantizedStore(inner) if plan.quantize == "int8" else inner

    def stats(self) -> dict[str, int | float]:
        """Block counts per state, lower-tier bytes read and `bytes_stored`, summed over layers; with
        quantize="int8" also `bytes_unquantized` (what the stored blocks took before quantizing) and the
        quantization error over every block stored, `quant_max_abs_error` and `quant_rel_rms_error`."""
        total: dict[str, int | float] = {}
        for layer in self.layers:
            for key, value in layer.stats().items():
                total[key] = total.get(key, 0) + value
        stores = [layer.store for layer in self.layers if layer.store is not None]
        total["bytes_stored"] = sum(store.bytes_stored for store in stores)
        quantized = [store for store in stores if isinstance(store, QuantizedStore)]
        if quantized:
            error = QuantError.merged(store.error for store in quantized)
            total["bytes_unquantized"] = sum(store.bytes_unquantized for store in quantized)
            total["quant_max_abs_error"], total["quant_rel_rms_error"] = error.max_abs, error.rel_rms
        return total

    def save(self, path: str | os.PathLike) -> None:
        """Write every layer's blocks, tail and counters, with the model's fingerprint, to the new directory
        `path` (`persist`); `TieredCache.open` continues from it. The cache stays usable."""
        model = self._model()
        if model is None:
            raise KVCacheError(f"kv: cannot save the cache to {path}: the model it was made for is gone")
        persist.save(self, model, path)

    @classmethod
    def open(
        cls, model: nn.Module, source: str | os.PathLike, /, tier: Tier | None = None, **settings: Any
    ) -> TieredCache:
        """A cache continuing the one saved at `source`, for `model`.

        The saved fingerprint must match `model`: another model, lcplug patch or weights raise KVCacheError
        naming what differs. `tier` None reopens with the saved tier and settings (`settings` override them);
        another tier takes `settings` alone, the block size defaulting to the saved one. `path` is, as for
        the constructor, where a disk tier makes its directory.
        """
        index = persist.read_index(source)
        persist.check_fingerprint(index, model, source)
        if tier is None:
            tier, settings = index["tier"], {**index["settings"], **settings}
        else:
            settings.setdefault("block_size", index["settings"].get("block_size"))
        cache = cls(model, tier, **settings)
        try:
            persist.restore(cache, model, index, source)
        except BaseException:
            cache.close()
            raise
        return cache

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
