"""KV tiers: a block-granular `transformers.Cache` over device, host and disk (see docs/kv.md).

lcplug.patch(model, kv="disk:hot_tokens=4096")              # generate builds the tiered cache itself
with TieredCache(model, tier="host", hot_tokens=4096) as cache:
    model.generate(ids, cache=cache)
"""

from .cache import TIERS, TieredCache, layer_patterns
from .errors import KVCacheError
from .layer import TieredLayer
from .needs import blocks_needed
from .placement import Placement, placement_policy
from .plugin import TieredKVPlugin

__all__ = [
    "TIERS",
    "KVCacheError",
    "Placement",
    "TieredCache",
    "TieredKVPlugin",
    "TieredLayer",
    "blocks_needed",
    "layer_patterns",
    "placement_policy",
]
