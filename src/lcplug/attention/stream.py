"""Streamed attention: a dense layer's keys read part by part, merged by log-sum-exps, never all at once.

A KV tier hands a dense layer compact K/V of the blocks it holds hot plus a `fetch` for the rest (spilled
to host memory or disk). `stream_attention` runs the blocks at hand, then fetches the others `chunk_blocks`
at a time, each part through the block executor with its log-sum-exp, and merges the parts exactly
(`merge.merge_partials`). The model's own mask (causality, its own sliding window, padding, documents)
comes from the lazy mask, evaluated inside the kept blocks as for any pattern; transient memory is one
chunk of blocks, whatever the context length.
"""

from __future__ import annotations

import torch

from .block_torch import block_attention
from .blocks import static_layout
from .compact import CompactKV, compact_layout, compact_of
from .mask import LazyMask
from .merge import merge_partials
from .pattern import Pattern

CHUNK_BLOCKS = 256
"""Blocks fetched per part (16K tokens at block size 64)."""


def stream_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    info: CompactKV,
    mask: LazyMask,
    *,
    position_ids: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    causal: bool = True,
    chunk_blocks: int | None = None,
) -> torch.Tensor:
    """Dense attention of query (B, H, Lq, D) over every key the model's mask allows, reading compact K/V
    (`key`, `value`, tagged `info`) first and the other blocks through `info.fetch`, `chunk_blocks` at a time
    (None: `CHUNK_BLOCKS`). Returns (B, Lq, H, D)."""
    bs = info.block_size
    layout = static_layout(Pattern(bs), mask, position_ids, block_q=bs, block_k=bs, causal=causal)
    wanted = layout.kv_blocks[layout.kv_blocks >= 0].unique().tolist()
    held = set(info.blocks)
    rest = [b for b in wanted if b not in held]
    parts = []
    for k, v, tags in _parts(key, value, info, rest, chunk_blocks or CHUNK_BLOCKS):
        sub = compact_layout(layout, tags, subset=True)
        if bool((sub.kv_blocks >= 0).any()):
            out, lse = block_attention(query, k, v, sub, scaling, softcap=softcap, return_lse=True)
            parts.append((out.transpose(1, 2), lse))
    out, _ = merge_partials(parts, query)
    return out.transpose(1, 2)


def _parts(key: torch.Tensor, value: torch.Tensor, info: CompactKV, rest: list[int], chunk_blocks: int):
    """The compact tensors at hand, then the other blocks fetched `chunk_blocks` at a time (one in memory)."""
    if info.blocks:
        yield key, value, info
    for i in range(0, len(rest), chunk_blocks):
        k, v = info.fetch(rest[i : i + chunk_blocks], tail=False)
        yield k, v, compact_of(k, None)
