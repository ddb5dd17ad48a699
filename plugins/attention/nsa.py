"""`nsa`: native sparse attention's three gated branches (compressed, selected, window) as a retrofit."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lcplug.attention.compress import Geometry
from lcplug.attention.compressed import GatedCompressedAttention, compressed_layers
from lcplug.errors import ParamError
from lcplug.hookspecs import hookimpl
from lcplug.params import param
from lcplug.plugins.attention.compressed import CompressedParams, CompressedPlugin, positive


@dataclass(frozen=True)
class NSAParams(CompressedParams):
    size: int = positive(32, "tokens pooled into each compressed entry (l)")
    stride: int = positive(16, "positions between compressed entries (d)")
    select_block: int = positive(64, "tokens per selection block (l'); a multiple of stride")
    select_count: int = param(
        16,
        "blocks each query reads raw (n), the first and its two latest included",
        check=lambda v: v >= 3,
        valid="an integer >= 3 (the first block and the query's two latest are always read)",
    )
    window: int = positive(512, "raw tokens the window branch sees, itself included (w)")

    def geometry(self) -> Geometry:
        if self.select_block % self.stride:
            raise ParamError(
                f"select_block={self.select_block} must be a multiple of stride={self.stride} (e.g. "
                f"{self.stride * max(1, self.select_block // self.stride)})"
            )
        return Geometry(self.size, self.stride, self.window)


class NSA(CompressedPlugin):
    """NSA (arXiv:2502.11089): o = sum_c g_c Attn(q, K_c, V_c) over c in {cmp, slc, win}, as a retrofit.

    cmp attends to compressed entries (windows of `size` every `stride`, pooled by softmax(Z + B), starting
    as means); slc to the raw tokens of the `select_count` blocks of `select_block` tokens the cmp branch
    attends to most (first block and the two latest always in); win to the last `window` tokens. Per-head
    gates from the query state start at (0, 0, 1): patching alone is sliding-window attention, and
    `train: gates` + `train: compress` with `distill` move mass onto the other branches. The branches share
    the model's K/V (NSA trains separate ones natively). KV: slc may read any block, so NSA keeps every raw
    token plus the entries: it saves compute, not memory.
    """

    name = "nsa"
    Params = NSAParams
    layer_class = GatedCompressedAttention

    def layer_extras(self, layer_idx: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> dict:
        return {"select_block": self.params.select_block, "select_count": self.params.select_count}

    def trainable_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        gates = [p for layer in compressed_layers(model) for p in (layer.gate_weight, layer.gate_bias)]
        return {**super().trainable_groups(model), "gates": gates}


@hookimpl
def lcplug_register(register):
    register(NSA)
