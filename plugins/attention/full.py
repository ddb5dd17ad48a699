"""`full`: the model's own attention, unchanged, through lcplug's dispatcher."""

from __future__ import annotations

from typing import Any

from torch import nn

from lcplug.attention import NativeAttention
from lcplug.hookspecs import hookimpl
from lcplug.plugin import Adapter, AttentionPlugin


class FullAttention(AttentionPlugin):
    """Pass-through to the model's own attention backend (sdpa, eager, flash) with the model's own mask.

    Useful as the dense layers of a hybrid schedule, as a parity probe (a model patched with `full`
    gives exactly the unpatched logits), and as the base a RoPE-only retrofit records in its manifest.
    """

    name = "full"

    def layer_attention(
        self, layer_idx: int, attn_module: nn.Module, adapter: Adapter, *, native_fn: Any, native_impl: str
    ) -> NativeAttention:
        return NativeAttention(native_fn, native_impl)


@hookimpl
def lcplug_register(register):
    register(FullAttention)
