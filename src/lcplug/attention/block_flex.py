"""The FlexAttention executor: any `BlockLayout` run by `torch.nn.attention.flex_attention`.

The layout becomes a `BlockMask` directly — per (row, query head, query block) the kept key blocks,
split into *full* blocks (every token pair allowed: the kernel skips `mask_mod`) and *partial* ones —
without ever evaluating a mask over N x N. The `mask_mod` looks each pair up through a dense
(B, G, NQ, NKB) table of tiles — all-True for full blocks, all-False for blocks not kept, a copy of the
layout's token mask for partial ones — so the result is exact for any layout, static or dynamic
(top-k), also where flex evaluates `mask_mod` on every pair (its eager path).

Per-head sink logits enter as one extra key column whose value is zero and whose score `score_mod`
replaces with the sink logit: the sink takes softmax mass and contributes no value, exactly as in the
reference. Folding the sink in afterwards from the log-sum-exp would need `return_lse`, which the
compiled CPU kernel does not support; the extra column is a one-token tail block per query block.

Compilation: `flex_attention` is compiled once per process (LCPLUG_FLEX_COMPILE=0 selects flex's
eager, unfused path: exact but O(N^2), meant for quick tests). Compilation uses static shapes: in
torch 2.13 the CPU kernel compiled for dynamic shapes miscompiles `mask_mod`s that read captured
tensors (wrong outputs, or C++ that does not build). To bound recompilation, the counts of query
blocks, key blocks and partial tiles are padded to powers of two; padded blocks are never listed, so
the kernel skips them.
On CPU, FlexAttention is forward only; a backward request raises instead of failing inside flex.
"""

from __future__ import annotations

import functools
import os

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .blocks import BlockLayout

_FULL, _EMPTY, _SINK, _FIRST_PARTIAL = 0, 1, 2, 3
"""Fixed tiles of the `mask_mod` lookup; partial blocks' own token masks follow."""

MIN_FLEX_BLOCK: dict[str, tuple[int, int]] = {"cpu": (1, 16)}
"""Smallest (query, key) block flex is given, per device type; finer layout blocks are grouped. torch
2.13's compiled CPU kernel computes wrong rows (or NaN) with key blocks under 16 tokens."""
_DEFAULT_MIN_FLEX_BLOCK = (128, 128)
"""Elsewhere (CUDA): flex's own default block size, a multiple of every Triton tile it picks."""

RECOMPILE_LIMIT = 64
"""Shapes one process may compile (power-of-two counts of query blocks, key blocks and partial tiles,
times head and block settings). Past it the compiled call raises rather than fall back to flex's
O(N^2) eager path."""


@functools.cache
def _compiled_flex():
    # The mask_mod's indirect indices are in range by construction (table entries index `tiles`; flex
    # passes in-range positions), so inductor's per-element bounds checks only cost time (~12% at 16K).
    return torch.compile(
        flex_attention,
        dynamic=False,
        fullgraph=True,
        recompile_limit=RECOMPILE_LIMIT,
        isolate_recompiles=True,
        options={"assert_indirect_indexing": False},
    )


def _flex_fn():
    """Compiled flex unless LCPLUG_FLEX_COMPILE=0 (read per call, so tests can switch it)."""
    if os.environ.get("LCPLUG_FLEX_COMPILE", "1") == "0":
        return flex_attention
    return _compiled_flex()


def flex_block_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: BlockLayout,
    scaling: float,
    *,
    sink_logit: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of query (B, H, Lq, D) over key/value (B, Hkv, Lkv, D) restricted to `layout`.

    Same contract as `block_attention`: head h uses layout group h // (H // G); a query with no visible
    key gets zeros. Returns (B, Lq, H, D).
    """
    h, lq = query.shape[1], query.shape[2]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value, sink_logit))
    if grad and query.device.type == "cpu":
        raise RuntimeError("FlexAttention has no backward on the CPU; use executor='torch'")
    if not grad:  # flex rejects CPU inputs that merely carry requires_grad, even when no graph is recorded
        query, key, value = query.detach(), key.detach(), value.detach()
        sink_logit = None if sink_logit is None else sink_logit.detach()
    has_sink = sink_logit is not None
    memo_key = ("flex", h, has_sink, grad, query.device)
    if memo_key not in layout._memo:  # built once per layout, shared by every layer of the forward pass
        layout._memo[memo_key] = _block_mask(layout, h, sink=has_sink, backward=grad)
    block_mask = layout._memo[memo_key]
    q_cols, kv_cols = block_mask.seq_lengths
    sink_col = kv_cols - 1  # only read when there is a sink
    sink = sink_logit.float() if has_sink else None

    def score_mod(score, bi, hi, qi, ki):
        if softcap is not None:
            score = torch.tanh(score / softcap) * softcap
        if sink is not None:
            score = torch.where(ki == sink_col, sink[hi].to(score.dtype), score)
        return score

    out = _flex_fn()(
        _pad(query, q_cols),
        _pad(key, kv_cols),
        _pad(value, kv_cols),
        score_mod=score_mod if softcap is not None or has_sink else None,
        block_mask=block_mask,
        scale=scaling,
        enable_gqa=h != key.shape[1],
    )
    return out[:, :, :lq].transpose(1, 2).contiguous()


def _block_mask(layout: BlockLayout, heads: int, *, sink: bool, backward: bool) -> BlockMask:
    """The layout as a BlockMask with an exact `mask_mod`, over power-of-two padded block counts.

    Key columns: NKB*BK padded keys, then one sink column (its own one-token block) if `sink`. The
    `mask_mod` reads one table at the layout's block granularity: (row, group, query block, key block)
    -> a tile of `tiles`, which holds an all-True tile (full blocks), an all-False one (blocks not kept),
    the sink column's tile and a copy of each partial block's token mask. Flex's own blocks may be
    coarser (`MIN_FLEX_BLOCK`): one is full when all layout blocks in it are, else partial when any
    layout block in it is kept.
    """
    bq, bk = layout.block_q, layout.block_k
    b, g, nq, _ = layout.kv_blocks.shape
    device = layout.mask.device
    min_q, min_k = MIN_FLEX_BLOCK.get(device.type, _DEFAULT_MIN_FLEX_BLOCK)
    mq, mk = max(1, min_q // bq), max(1, min_k // bk)  # layout blocks per flex block (powers of two)
    nq_pad, nkb = _bucket(nq), max(_bucket((layout.kv_len + bk - 1) // bk), mk)
    cols = nkb + sink
    kept = layout.kv_blocks >= 0
    pairs = layout.mask.flatten(-2).view(torch.uint8)
    full = kept & (pairs.amin(-1) > 0)
    partial = kept & (pairs.amax(-1) > 0) & ~full
    n_partial = int(partial.sum())
    tile = torch.full(kept.shape, _EMPTY, dtype=torch.long, device=device)
    tile[full] = _FULL
    tile[partial] = torch.arange(_FIRST_PARTIAL, _FIRST_PARTIAL + n_partial, device=device)
    rows = max(nq_pad, mq)
    # a short chunk's query block (q_len < the pattern's block, so any size) is flex's only row of blocks
    flex_bq = max(bq * mq, min_q) if rows == mq else bq * mq
    table = torch.full((b, g, rows, cols + 1), _EMPTY, dtype=torch.long, device=device)
    table[:, :, :nq].scatter_(-1, torch.where(kept, layout.kv_blocks, cols), tile)  # unused slots: dropped column
    table = table[..., :cols].contiguous()
    if sink:
        table[..., nkb] = _SINK
    tiles = torch.zeros(_bucket(_FIRST_PARTIAL + n_partial), bq, bk, dtype=torch.bool, device=device)
    tiles[_FULL] = True
    tiles[_SINK, :, 0] = True
    tiles[_FIRST_PARTIAL : _FIRST_PARTIAL + n_partial] = layout.mask[partial]

    keys = table[..., :nkb].reshape(b, g, rows // mq, mq, nkb // mk, mk)
    flex_full = (keys == _FULL).all(-1).all(3)
    flex_partial = (keys != _EMPTY).any(-1).any(3) & ~flex_full
    if sink:
        flex_full = torch.nn.functional.pad(flex_full, (0, 1), value=False)
        flex_partial = torch.nn.functional.pad(flex_partial, (0, 1), value=True)
    per_group = heads // g
    if g > 1:  # flex's block mask is per query head (or one for all)
        flex_full = flex_full.repeat_interleave(per_group, 1)
        flex_partial = flex_partial.repeat_interleave(per_group, 1)
    flat_table, flat_tiles, tile_size = table.flatten(), tiles.flatten(), bq * bk

    def mask_mod(bi, hi, qi, ki):  # flat indexing: one indirect load each, cheaper in the compiled kernel
        t = flat_table[((bi * g + hi // per_group) * rows + qi // bq) * cols + ki // bk]
        return flat_tiles[t * tile_size + (qi % bq) * bk + ki % bk]

    return BlockMask.from_kv_blocks(
        *_ordered(flex_partial),
        *_ordered(flex_full),
        BLOCK_SIZE=(flex_bq, bk * mk),
        mask_mod=mask_mod,
        seq_lengths=(nq_pad * bq, nkb * bk + sink),
        compute_q_blocks=backward,
    )


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _ordered(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, indices) per row of a boolean block matrix, present blocks first in ascending order."""
    num = present.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~present).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, idx


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - x.shape[2]
    return torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra > 0 else x
