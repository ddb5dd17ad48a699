"""Per-layer attention modules installed on a patched model's attention modules.

Each attention module of a patched model gets one submodule `lcplug_attention`. The dispatcher calls
it with exactly what transformers passes an attention function. `NativeAttention` forwards to the
model's own backend with the model's own mask (layers a spec leaves alone); `PatternAttention` runs a
pattern through an executor. Parameters a variant adds (sink logits, gates) live here, so they train,
save and load with the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .blocks import static_layout
from .compact import LayerAccess, compact_layout, compact_of, expand, full_kv
from .executors import RUNNERS, choose
from .mask import LazyMask
from .pattern import Pattern
from .positions import pattern_positions
from .reference import reference_attention
from .stream import stream_attention

STREAMABLE_IMPLS = ("sdpa", "eager")
"""Model backends whose attention lcplug's executor reproduces exactly from the lazy mask."""
STREAMABLE_KWARGS = frozenset(
    {
        "scaling",
        "dropout",
        "softcap",
        "sliding_window",
        "position_ids",
        "cache_position",
        "output_attentions",
        "use_cache",
    }
)
"""Attention-call arguments a streamed dense layer honours (the sliding window is in the mask); any other
non-None argument (e.g. gpt-oss's sinks `s_aux`) makes the layer fetch every block and run its backend."""


class LayerAttention(nn.Module):
    """Base: holds the model's own attention function and backend name for this layer."""

    def __init__(self, native_fn: Callable[..., Any], native_impl: str):
        super().__init__()
        self.native_fn = native_fn
        self.native_impl = native_impl

    def native_mask(self, mask: Any) -> Any:
        return mask.native(self.native_impl) if isinstance(mask, LazyMask) else mask

    def run_native(self, module: nn.Module, query, key, value, mask, **kwargs: Any):
        return self.native_fn(module, query, key, value, self.native_mask(mask), **kwargs)

    def kv_access(self) -> LayerAccess:
        """How this layer reads its keys (what a KV cache may keep and hand it): here, every key, in full."""
        return LayerAccess()


class NativeAttention(LayerAttention):
    """The model's own attention, unchanged (the `full` plugin and unselected layers).

    Given compact K/V by a KV tier (blocks held hot, the rest spilled), it streams the spilled blocks
    through lcplug's executor (`stream.stream_attention`) with the model's own mask, when the call carries
    nothing the executor cannot reproduce (`STREAMABLE_KWARGS`); otherwise it fetches every block and runs
    the model's own backend.
    """

    def forward(self, module: nn.Module, query, key, value, mask, **kwargs: Any):
        compact = compact_of(key, mask.kv_length if isinstance(mask, LazyMask) else None)
        if compact is not None and not compact.is_full:
            if isinstance(mask, LazyMask) and self._streamable(module, kwargs):
                scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
                out = stream_attention(
                    query,
                    key,
                    value,
                    compact,
                    mask,
                    position_ids=kwargs.get("position_ids"),
                    scaling=scaling,
                    softcap=kwargs.get("softcap"),
                    causal=getattr(module, "is_causal", True),
                )
                return out, None
            key, value = full_kv(key, value, compact)
        return self.run_native(module, query, key, value, mask, **kwargs)

    def kv_access(self) -> LayerAccess:
        """Compact K/V when the model's backend is one the executor reproduces (sdpa, eager)."""
        return LayerAccess(compact=self.native_impl in STREAMABLE_IMPLS)

    @staticmethod
    def _streamable(module: nn.Module, kwargs: dict[str, Any]) -> bool:
        extra = {k for k, v in kwargs.items() if v is not None and k not in STREAMABLE_KWARGS}
        return not extra and not (kwargs.get("dropout") and module.training)

    def extra_repr(self) -> str:
        return f"native={self.native_impl}"


def dense_allowed(mask: Any, query: torch.Tensor, key: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The model's own mask as a boolean (B, 1, Lq, Lkv) tensor, whatever form it arrived in."""
    if isinstance(mask, LazyMask):
        return mask.dense()
    lq, lkv = query.shape[-2], key.shape[-2]
    if mask is None:
        if getattr(module, "is_causal", True) and lq > 1:
            return torch.ones(lq, lkv, dtype=torch.bool, device=query.device).tril(lkv - lq)[None, None]
        return torch.ones(1, 1, lq, lkv, dtype=torch.bool, device=query.device)
    mask = mask[..., :lkv]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


class PatternAttention(LayerAttention):
    """Attention restricted by a `Pattern` (ANDed with the model's own mask), optionally with sink logits."""

    def __init__(
        self,
        native_fn: Callable[..., Any],
        native_impl: str,
        pattern: Pattern,
        num_heads: int,
        learnable_sink: bool = False,
        sink_init: float = -20.0,
        executor: str = "auto",
    ):
        super().__init__(native_fn, native_impl)
        self.pattern = pattern
        self.executor = executor
        self.sink_logit = nn.Parameter(torch.full((num_heads,), float(sink_init))) if learnable_sink else None

    def forward(
        self,
        module: nn.Module,
        query,
        key,
        value,
        mask,
        *,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs,
    ):
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        executor = choose(self.executor, query.device, needs_grad)
        lazy = isinstance(mask, LazyMask)
        compact = compact_of(key, mask.kv_length if lazy else None)
        if executor == "reference" or not lazy or (dropout and module.training):
            if compact is not None:
                key, value = expand(key, value, compact)
            return self.reference(module, query, key, value, mask, scaling, dropout, kwargs)
        layout = static_layout(
            self.pattern,
            mask,
            kwargs.get("position_ids"),
            block_q=self.pattern.block_size,
            block_k=self.pattern.block_size,
            causal=getattr(module, "is_causal", True),
        )
        if compact is not None:
            layout = compact_layout(layout, compact)
        out = RUNNERS[executor](
            query, key, value, layout, scaling, sink_logit=self.sink_logit, softcap=kwargs.get("softcap")
        )
        return out, None

    def kv_access(self) -> LayerAccess:
        return LayerAccess(pattern=self.pattern, block_size=self.pattern.block_size, compact=True)

    def reference(self, module: nn.Module, query, key, value, mask, scaling: float, dropout: float, kwargs: dict):
        """The dense masked oracle: the model's own mask AND the pattern, O(N^2)."""
        allowed = dense_allowed(mask, query, key, module)
        if isinstance(mask, LazyMask):
            q_pos, kv_pos = pattern_positions(mask, kwargs.get("position_ids"), query.device)
        else:
            lq, lkv = query.shape[-2], key.shape[-2]
            kv_pos = torch.arange(lkv, device=query.device)[None]
            q_pos = kv_pos[:, lkv - lq :]
        heads = self._head_groups(query)
        allowed = allowed & self.pattern.allows(q_pos[:, None, :, None], kv_pos[:, None, None, :], heads)
        return reference_attention(
            query,
            key,
            value,
            allowed,
            scaling,
            softcap=kwargs.get("softcap"),
            sink_logit=self.sink_logit,
            dropout=dropout,
            training=module.training,
        )

    def _head_groups(self, query: torch.Tensor) -> torch.Tensor | None:
        """(1, H, 1, 1) head-group index per head when the pattern depends on the head."""
        groups = self.pattern.head_groups
        if groups == 1:
            return None
        heads = query.shape[1]
        return (torch.arange(heads, device=query.device) // (heads // groups)).view(1, heads, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.pattern.describe()}, executor={self.executor}, sink_logit={self.sink_logit is not None}"
