"""Attention mechanisms: lazy masks, patterns, executors and the per-layer modules that run them."""

from .dispatch import DISPATCHER_NAME, SUBMODULE, ensure_registered
from .gated import GatedAttention
from .layer import LayerAttention, NativeAttention, PatternAttention
from .mask import LazyMask
from .pattern import Pattern, SlidingWindowPattern, check_block_size
from .reference import reference_attention

__all__ = [
    "DISPATCHER_NAME",
    "SUBMODULE",
    "GatedAttention",
    "LayerAttention",
    "LazyMask",
    "NativeAttention",
    "Pattern",
    "PatternAttention",
    "SlidingWindowPattern",
    "check_block_size",
    "ensure_registered",
    "reference_attention",
]
