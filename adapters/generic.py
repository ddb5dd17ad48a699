"""The generic adapter: any transformers causal LM whose attention uses the AttentionInterface.

It finds attention modules by their `layer_idx` and the projections every modern decoder has, rotary
modules by their `inv_freq` buffers, and the model's own eager attention function in the modeling
module that defines the attention class. No allow-list: a new family works as soon as transformers
implements it the standard way; what a model lacks is named in `missing`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lcplug.hookspecs import hookimpl
from lcplug.plugin import Adapter


class GenericAdapter(Adapter):
    """Any transformers causal LM whose attention goes through AttentionInterface."""

    name = "generic"
    priority = 0

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, PreTrainedModel)

    def missing(self, model: nn.Module) -> list[str]:
        if not isinstance(model, PreTrainedModel):
            return [f"a transformers PreTrainedModel (got {type(model).__name__})"]
        out = []
        modules = self.attention_modules(model)
        n_layers = getattr(self.text_config(model), "num_hidden_layers", None)
        if not modules:
            out.append("attention modules with an integer `layer_idx`")
        elif n_layers is not None and len(modules) != n_layers:
            out.append(f"one attention module per layer (found {len(modules)} for {n_layers} layers)")
        if not type(model)._can_set_attn_implementation():
            out.append("attention that goes through transformers' AttentionInterface (set_attn_implementation)")
        return out

    def text_config(self, model: nn.Module) -> Any:
        return model.config.get_text_config()

    def attention_modules(self, model: nn.Module) -> dict[int, nn.Module]:
        found: dict[int, nn.Module] = {}
        for module in model.modules():
            idx = getattr(module, "layer_idx", None)
            if isinstance(idx, int) and type(module).__name__.endswith("Attention") and idx not in found:
                found[idx] = module
        return found

    def num_heads(self, attn_module: nn.Module) -> int:
        """Query heads of one attention module."""
        heads = getattr(attn_module, "num_heads", None) or getattr(attn_module.config, "num_attention_heads", None)
        if not isinstance(heads, int):
            raise RuntimeError(f"cannot tell the head count of {type(attn_module).__qualname__}")
        return heads

    def num_kv_heads(self, attn_module: nn.Module) -> int:
        """Key/value heads of one attention module (GQA: fewer than query heads)."""
        groups = getattr(attn_module, "num_key_value_groups", None)
        if isinstance(groups, int) and groups >= 1:
            return self.num_heads(attn_module) // groups
        kv = getattr(attn_module.config, "num_key_value_heads", None)
        return kv if isinstance(kv, int) else self.num_heads(attn_module)

    def rotary_modules(self, model: nn.Module) -> list[nn.Module]:
        return [
            m
            for m in model.modules()
            if hasattr(m, "rope_type") and any(name.endswith("inv_freq") for name, _ in m.named_buffers(recurse=False))
        ]

    def native_attention(self, module: nn.Module, impl: str) -> Callable[..., Any]:
        """The function the unpatched model would call for `impl` (its own eager function for 'eager')."""
        modeling = sys.modules[type(module).__module__]
        eager = getattr(modeling, "eager_attention_forward", None)
        interface = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
        fn = interface.get_interface(impl, eager)
        if fn is None:
            raise RuntimeError(f"cannot find the {impl!r} attention function of {type(module).__qualname__}")
        return fn

    def latent_missing(self, attn_module: nn.Module) -> list[str]:
        """What `attn_module` lacks for latent attention (the `mla` plugin); see `lcplug.adapters.latent`."""
        from .latent import latent_missing

        return latent_missing(attn_module)

    def latent_forward(self, attn_module: nn.Module) -> Callable[..., Any]:
        """The attention forward a latent layer runs, to be bound to `attn_module` (see `lcplug.adapters.latent`)."""
        from .latent import latent_forward

        return latent_forward


@hookimpl
def lcplug_register(register):
    register(GenericAdapter)
