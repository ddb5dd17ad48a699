"""The one attention function lcplug registers with transformers.

`AttentionInterface` maps a name to a function; lcplug registers a single dispatcher under
`DISPATCHER_NAME` (and its lazy mask function under the same name with `AttentionMaskInterface`, so no
mask is ever dropped). A patched model is switched to that name with `set_attn_implementation`; the
dispatcher then calls the `lcplug_attention` submodule of whichever attention module is running. Models
not switched to the name never reach this code, so patches stay per instance.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from .mask import register_mask_interface

DISPATCHER_NAME = "lcplug"
SUBMODULE = "lcplug_attention"
CP_ATTR = "lcplug_cp"
"""Instance attribute of an attention module a `cp` plugin sets: the callable that runs it context-parallel."""


def lcplug_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    layer = module._modules.get(SUBMODULE)
    if layer is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) runs with attn_implementation "
            f"{DISPATCHER_NAME!r} but was not patched by lcplug; use lcplug.patch(model, ...) instead of setting "
            "the implementation by hand"
        )
    cp = module.__dict__.get(CP_ATTR)
    if cp is not None:  # context parallelism runs this layer's pattern across ranks (lcplug.cp)
        return cp(layer, module, query, key, value, attention_mask, **kwargs)
    return layer(module, query, key, value, attention_mask, **kwargs)


_registered = False


def ensure_registered() -> None:
    """Register the dispatcher and its mask function once per process (a name, not a class patch)."""
    global _registered
    if not _registered:
        AttentionInterface.register(DISPATCHER_NAME, lcplug_attention_forward)
        register_mask_interface(DISPATCHER_NAME)
        _registered = True
