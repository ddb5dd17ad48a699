"""Install a KV plugin on one model instance: its `generate` builds the plugin's cache when none is given.

transformers has no per-instance setting for "which Cache class `generate` makes" (cache implementations
are registered process-wide), so the patch sets an instance attribute `generate` (a bound method, so a
deep copy of the model rebinds to the copy) through the transaction; `unpatch` deletes it and the class's
own `generate` is back. The wrapper owns the cache it makes: on an exception the cache is closed (its
files removed) before the error propagates; after a normal return it is closed unless the output hands
it to the caller (`return_dict_in_generate=True`), who may continue from it.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from ..patching import PatchContext

CACHE_KWARGS = ("cache", "past_key_values")
"""The names under which `generate` takes a cache (`past_key_values` is the deprecated one)."""


def install_kv(ctx: PatchContext) -> None:
    ctx.txn.setattr(ctx.model, "generate", types.MethodType(_generate_with_kv_plugin, ctx.model))


def _generate_with_kv_plugin(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """`generate`, with the patched KV plugin's cache unless the caller passes one (or turns caching off)."""
    generate = type(model).generate
    if any(kwargs.get(name) is not None for name in CACHE_KWARGS) or kwargs.get("use_cache") is False:
        return generate(model, *args, **kwargs)
    from ..patching import patch_state

    cache = patch_state(model).plugins["kv"].make_cache(model)
    try:
        out = generate(model, *args, cache=cache, **kwargs)
    except BaseException:
        cache.close()
        raise
    if getattr(out, "cache", None) is not cache:
        cache.close()
    return out
