"""Model surgery for latent attention (`mla`): the attention forward of a llama-style module, around a latent cache.

transformers' attention modules rotate K, write it and V to the cache, then call the attention function; a
latent cache needs the projections and the cache write changed, which no hook reaches. So a latent layer's
attention module gets, on the instance, the forward below: the family's own steps (q_proj, attention
function, o_proj, its scaling, dropout, sliding window and soft-cap) with the keys and values replaced by
`LatentKV.compress` -> cache -> `LatentKV.expand`. It fits every family whose attention has separate
`q_proj`/`k_proj`/`v_proj`/`o_proj` linears, no q/k norm, and rotate-half RoPE from `position_embeddings`
(llama, mistral, qwen2, qwen2_moe, gemma2, ...); `latent_missing` names what another module lacks, and a
family adapter with other modules would supply its own forward.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lcplug.attention.dispatch import SUBMODULE

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def latent_missing(module: nn.Module) -> list[str]:
    """What an attention module lacks for the latent forward (empty when it fits)."""
    out = [f"a linear {name}" for name in PROJECTIONS if not isinstance(getattr(module, name, None), nn.Linear)]
    if hasattr(module, "q_norm") or hasattr(module, "k_norm"):
        out.append("queries and keys without q_norm/k_norm (a whole-head norm mixes rope and latent dims)")
    if not isinstance(getattr(module, "head_dim", None), int):
        out.append("an integer head_dim")
    if getattr(sys.modules[type(module).__module__], "rotate_half", None) is None:
        out.append("rotate-half RoPE (a rotate_half function in its modeling module)")
    return out


def latent_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: Any = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A llama-style attention forward whose cache holds (rope keys, latent) instead of (K, V)."""
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    latent = self._modules[SUBMODULE].latent
    input_shape = hidden_states.shape[:-1]
    cos, sin = position_embeddings
    query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
    query = latent.queries(query, cos, sin)
    rope_key, codes = latent.compress(hidden_states, cos, sin)
    if cache is not None:
        rope_key, codes = cache.update(rope_key, codes, self.layer_idx, kwargs=kwargs)
    key, value = latent.expand(rope_key, codes)
    attention: Callable[..., Any] = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
    extras = {"softcap": self.attn_logit_softcapping} if hasattr(self, "attn_logit_softcapping") else {}
    if hasattr(self, "sliding_window"):
        extras["sliding_window"] = self.sliding_window
    output, weights = attention(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=self.attention_dropout if self.training else 0.0,
        scaling=self.scaling,
        **extras,
        **kwargs,
    )
    return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights
