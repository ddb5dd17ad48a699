"""lcplug-example-chunked: chunked local attention, shipped as a third-party lcplug plugin package.

Installing the distribution is the whole integration: its `lcplug` entry point names this module, whose
`lcplug_register` hook registers `ChunkedLocalAttention`. Then
`lcplug.patch(model, attention="chunked-local:chunk=8192")` works and `lcplug plugins` lists the plugin
with this distribution as its origin; nothing in lcplug knows about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lcplug import Adapter, AttentionPlugin, Params, hookimpl, param
from lcplug.attention import Pattern, PatternAttention
from lcplug.attention.executors import EXECUTORS

__version__ = "0.1.0"


class ChunkedPattern(Pattern):
    """Position p belongs to chunk p // chunk; a query sees only keys of its own chunk.

    The model's own mask (causality, padding) is ANDed on top by the executor, so within its chunk a query
    sees the keys up to itself.
    """

    def __init__(self, chunk: int, block_size: int = 64):
        self.chunk, self.block_size = chunk, block_size

    def allows(self, q_pos: torch.Tensor, kv_pos: torch.Tensor, head_group: torch.Tensor | None = None) -> torch.Tensor:
        return q_pos // self.chunk == kv_pos // self.chunk

    def key_intervals(
        self, q_lo: torch.Tensor, q_hi: torch.Tensor, head_group: int = 0
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # queries in [q_lo, q_hi] need keys from the start of q_lo's chunk up to q_hi (causal)
        return [((q_lo // self.chunk) * self.chunk, q_hi + 1)]

    def describe(self) -> str:
        return f"chunked local, chunks of {self.chunk}"


@dataclass(frozen=True)
class ChunkedLocalParams(Params):
    chunk: int = param(
        8192,
        "tokens per chunk: a query sees only the keys of its own chunk (Llama 4 uses 8192)",
        check=lambda v: v >= 1,
        valid="an integer >= 1",
    )
    block_size: int = param(
        64,
        "block size of the block-sparse pattern",
        check=lambda v: v >= 1 and not v & (v - 1),
        valid="a power of two, e.g. 64 or 128",
    )
    executor: Literal[EXECUTORS] = param("auto", "which executor runs the pattern; auto picks per device")


class ChunkedLocalAttention(AttentionPlugin):
    """Chunked local attention (Llama 4's local layers): each query sees only keys of its own chunk.

    Positions are cut into consecutive chunks of `chunk` tokens; a query attends causally within its chunk
    and never across a boundary, so cost per token is bounded by `chunk` whatever the context length.
    Combine with full layers (e.g. `layers="3:1"`) so information can still cross chunks, as Llama 4 does.
    """

    name = "chunked-local"
    Params = ChunkedLocalParams

    def layer_attention(
        self, layer_idx: int, attn_module: nn.Module, adapter: Adapter, *, native_fn: Any, native_impl: str
    ) -> PatternAttention:
        p = self.params
        return PatternAttention(
            native_fn,
            native_impl,
            ChunkedPattern(p.chunk, p.block_size),
            num_heads=adapter.num_heads(attn_module),
            executor=p.executor,
        )


@hookimpl
def lcplug_register(register):
    register(ChunkedLocalAttention)
