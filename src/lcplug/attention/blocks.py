"""Block-sparse layouts: the one structure every fast executor consumes.

A `BlockLayout` says, per batch row, head group and query block, which key blocks are read
(`kv_blocks`, -1 for an unused slot) and, inside each kept block, which (query, key) pairs may attend
(`mask`). Building it never touches an N x N matrix: static patterns give key *intervals* per query
block, turned into block lists with a difference-array sweep over (query block, key block) — (N/B)^2
entries — and the token predicate (the model's own mask ANDed with the pattern) is evaluated only
inside kept blocks. Dynamic patterns (top-k indexers) hand in their block lists directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .mask import LazyMask
from .pattern import Pattern
from .positions import pattern_positions


@dataclass
class BlockLayout:
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    kv_blocks: torch.Tensor  # (B, G, NQ, K) long; -1 = unused slot
    mask: torch.Tensor  # (B, G, NQ, K, BQ, BK) bool; True = may attend
    _memo: dict = field(default_factory=dict, repr=False)  # derived views (bias per dtype, band), built once

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive (B, G, NQ, BQ, K*BK) bias, 0 where allowed and -inf elsewhere; built once per dtype and
        shared by every layer that runs this layout in one forward pass."""
        if ("bias", dtype) not in self._memo:
            self._memo[("bias", dtype)] = _additive(self.mask, dtype)
        return self._memo[("bias", dtype)]

    def band(self) -> Band | None:
        """The banded part of this layout, if it has one worth running copy-free (cached)."""
        if "band" not in self._memo:
            self._memo["band"] = find_band(self)
        return self._memo["band"]

    @property
    def groups(self) -> int:
        return self.kv_blocks.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_blocks.shape[2]

    def kept_pairs(self) -> int:
        """(query, key) pairs inside kept blocks: the work a block executor does."""
        return int((self.kv_blocks >= 0).sum()) * self.block_q * self.block_k

    def to_dense(self) -> torch.Tensor:
        """The layout as a boolean (B, G, Lq, Lkv) mask (tests and debugging only: O(N^2))."""
        b, g, nq, _ = self.kv_blocks.shape
        bq, bk = self.block_q, self.block_k
        dense = torch.zeros(
            b, g, nq * bq, (self.kv_len + bk - 1) // bk * bk + bk, dtype=torch.bool, device=self.mask.device
        )
        q_idx = torch.arange(nq, device=dense.device)[:, None] * bq + torch.arange(bq, device=dense.device)
        kvb = torch.where(self.kv_blocks >= 0, self.kv_blocks, dense.shape[-1] // bk - 1)
        kv_idx = kvb[..., None] * bk + torch.arange(bk, device=dense.device)  # (B,G,NQ,K,BK)
        bi = torch.arange(b, device=dense.device).view(b, 1, 1, 1, 1, 1)
        gi = torch.arange(g, device=dense.device).view(1, g, 1, 1, 1, 1)
        qi = q_idx.view(1, 1, nq, 1, bq, 1)
        dense[bi, gi, qi, kv_idx[..., None, :]] |= self.mask
        return dense[:, :, : self.q_len, : self.kv_len]


@dataclass
class Band:
    """A diagonal band of fully-allowed key blocks, identical in shape for every query block >= `first`.

    Query block i (>= first) reads key blocks [i + offset - width, i + offset) entirely (every row, every
    group, no token mask), so executors can run them from an overlapping strided view of K/V without
    copying and without a mask. `rest_blocks`/`rest_mask` hold everything else: the other kept blocks
    of banded query blocks (sinks, partial diagonal and window-edge blocks) and all kept blocks of the
    query blocks before `first`. Sliding-window and streaming (LoZA) layouts are mostly band.
    """

    first: int
    width: int
    offset: int
    rest_blocks: torch.Tensor  # (B, G, NQ, Kr) long, -1 = unused
    rest_mask: torch.Tensor  # (B, G, NQ, Kr, BQ, BK) bool
    _memo: dict = field(default_factory=dict, repr=False)

    def rest_used(self) -> list[int]:
        """Per query block, how many rest slots any row or group uses (lists are sorted, -1 last)."""
        if "used" not in self._memo:
            self._memo["used"] = (self.rest_blocks >= 0).sum(-1).amax(dim=(0, 1)).tolist()
        return self._memo["used"]

    def rest_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive (B, G, NQ, BQ, Kr*BK) bias of the rest blocks, built once per dtype."""
        if dtype not in self._memo:
            self._memo[dtype] = _additive(self.rest_mask, dtype)
        return self._memo[dtype]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, G, NQ, K, BQ, BK) bool -> (B, G, NQ, BQ, K*BK) additive bias: 0 where allowed, -inf elsewhere."""
    b, g, nq, k, bq, bk = mask.shape
    keep = mask.permute(0, 1, 2, 4, 3, 5).reshape(b, g, nq, bq, k * bk)
    return torch.zeros((), dtype=dtype).masked_fill(~keep, float("-inf"))


def find_band(layout: BlockLayout) -> Band | None:
    kv, mask = layout.kv_blocks, layout.mask
    b, g, nq, _ = kv.shape
    if layout.block_q != layout.block_k or nq < 2:
        return None
    device = kv.device
    nkb = (layout.kv_len + layout.block_k - 1) // layout.block_k
    kept_full = (kv >= 0) & mask.all(dim=-1).all(dim=-1)
    table = torch.zeros(b, g, nq, nkb + 1, dtype=torch.bool, device=device)
    table.scatter_(-1, torch.where(kv >= 0, kv, nkb), kept_full)
    table = table[..., :nkb]
    last = kv.max(dim=-1).values  # (B, G, NQ): the diagonal block of each query block
    qi = torch.arange(nq, device=device)
    offset = int(last[0, 0, -1]) - (nq - 1)
    steps = torch.arange(1, nkb + 1, device=device)
    below = last[..., None] - steps  # blocks under the diagonal, nearest first
    run = (table.gather(-1, below.clamp(min=0)) & (below >= 0)).int().cumprod(-1).sum(-1)  # (B, G, NQ)
    run = torch.where(last == qi + offset, run, torch.zeros_like(run)).amin(dim=(0, 1))  # (NQ,)
    width = int(run.max())
    if width < 2:
        return None
    ok = (run >= width).flip(0).int().cumprod(0).flip(0).bool()  # True from `first` to the end
    first = int(nq - ok.sum())
    if first >= nq:
        return None
    lo = (qi + offset - width).view(1, 1, nq, 1)
    in_band = (kv >= lo) & (kv < lo + width) & (qi >= first).view(1, 1, nq, 1)
    rest = torch.where(in_band, -1, kv)
    order = torch.where(rest >= 0, rest, nkb).sort(dim=-1)
    k_rest = max(int((rest >= 0).sum(-1).max()), 1)
    slots = order.indices[..., :k_rest]
    rest_blocks = torch.where(order.values[..., :k_rest] < nkb, order.values[..., :k_rest], -1)
    rest_mask = mask.gather(3, slots[..., None, None].expand(-1, -1, -1, -1, *mask.shape[-2:]))
    rest_mask = rest_mask & (rest_blocks >= 0)[..., None, None]
    return Band(first, width, offset, rest_blocks, rest_mask)


def _block_q(block_q: int, q_len: int) -> int:
    """Decode and short chunks use a query block no larger than the query length."""
    return max(1, min(block_q, q_len))


def static_layout(
    pattern: Pattern,
    mask: LazyMask,
    position_ids: torch.Tensor | None,
    *,
    block_q: int,
    block_k: int,
    causal: bool = True,
) -> BlockLayout:
    """The layout of a position-defined pattern for one attention call (cached on the mask per pattern)."""
    cache_key = ("static", pattern.key(), block_q, block_k, causal)
    cached = mask.cache.get(cache_key)
    if cached is not None:
        return cached
    device = mask.device if not isinstance(mask.device, str) else torch.device(mask.device)
    b, lq, lkv = mask.batch_size, mask.q_length, mask.kv_length
    bq, bk = _block_q(block_q, lq), block_k
    nq, nkb = (lq + bq - 1) // bq, (lkv + bk - 1) // bk
    q_pos, kv_pos = pattern_positions(mask, position_ids, device)
    q_slot = torch.arange(lq, device=device) + mask.q_offset
    doc_start = q_slot[None] - q_pos  # (B, Lq): slot of position 0 of each query's sequence
    first = torch.arange(nq, device=device) * bq
    last = torch.clamp(first + bq - 1, max=lq - 1)
    span = last - first
    groups = []
    for group in range(pattern.head_groups):
        ranges = []
        # a query block may straddle two documents of a packed row: cover the first and the last query's
        for start, lo_pos, hi_pos in (
            (doc_start[:, first], q_pos[:, first], q_pos[:, first] + span),
            (doc_start[:, last], (q_pos[:, last] - span).clamp(min=0), q_pos[:, last]),
        ):
            for lo, hi in pattern.key_intervals(lo_pos, hi_pos, group):
                lo_slot, hi_slot = start + lo, start + hi
                if causal:
                    hi_slot = torch.minimum(hi_slot, q_slot[last][None] + 1)
                ranges.append((lo_slot - mask.kv_offset, hi_slot - mask.kv_offset))
        groups.append(_blocks_from_ranges(ranges, b, nq, nkb, bk, lkv))
    k_max = max(int(g.shape[-1]) for g in groups)
    kv_blocks = torch.stack([torch.nn.functional.pad(g, (0, k_max - g.shape[-1]), value=-1) for g in groups], dim=1)
    layout = layout_from_blocks(kv_blocks, mask, pattern, q_pos, kv_pos, block_q=bq, block_k=bk)
    mask.cache[cache_key] = layout
    return layout


def _blocks_from_ranges(ranges, b: int, nq: int, nkb: int, bk: int, lkv: int) -> torch.Tensor:
    """Sorted key-block lists (B, NQ, K) covering index ranges [lo, hi) per (row, query block)."""
    device = ranges[0][0].device
    diff = torch.zeros(b, nq, nkb + 1, dtype=torch.int32, device=device)
    for lo, hi in ranges:
        lo = lo.clamp(0, lkv)
        hi = hi.clamp(0, lkv)
        nonempty = (hi > lo).int()
        lo_b = (lo // bk).clamp(max=nkb)
        hi_b = ((hi + bk - 1) // bk).clamp(max=nkb)
        diff.scatter_add_(-1, lo_b[..., None].long(), nonempty[..., None])
        diff.scatter_add_(-1, hi_b[..., None].long(), -nonempty[..., None])
    present = diff.cumsum(-1)[..., :nkb] > 0
    k_max = max(int(present.sum(-1).max()), 1)
    order = torch.where(present, torch.arange(nkb, device=device), nkb)
    order = order.sort(dim=-1).values[..., :k_max]
    return torch.where(order < nkb, order, -1)


def layout_from_blocks(
    kv_blocks: torch.Tensor,
    mask: LazyMask,
    pattern: Pattern | None,
    q_pos: torch.Tensor,
    kv_pos: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    token_keep: torch.Tensor | None = None,
) -> BlockLayout:
    """Complete block lists (B, G, NQ, K) with the token mask: model mask & pattern & bounds [& token_keep].

    `token_keep`, if given, is an extra (B, G, NQ, K, BQ, BK) boolean (token-level top-k selections).
    """
    b, g, nq, _ = kv_blocks.shape
    lq, lkv = mask.q_length, mask.kv_length
    device = kv_blocks.device
    bq, bk = block_q, block_k
    q_idx = (torch.arange(nq, device=device)[:, None] * bq + torch.arange(bq, device=device)).view(1, 1, nq, 1, bq, 1)
    kv_idx = kv_blocks.clamp(min=0)[..., None] * bk + torch.arange(bk, device=device)  # (B,G,NQ,K,BK)
    kv_idx = kv_idx[..., None, :]  # (B,G,NQ,K,1,BK)
    valid = (q_idx < lq) & (kv_idx < lkv) & (kv_blocks >= 0)[..., None, None]
    q_c, kv_c = q_idx.clamp(max=lq - 1), kv_idx.clamp(max=lkv - 1)
    allowed = mask.allowed(q_c + mask.q_offset, kv_c + mask.kv_offset) & valid
    if pattern is not None:
        bi = torch.arange(b, device=device).view(b, 1, 1, 1, 1, 1)
        group = torch.arange(g, device=device).view(1, g, 1, 1, 1, 1) if g > 1 else None
        allowed &= pattern.allows(q_pos[bi, q_c], kv_pos[bi, kv_c], group)
    if token_keep is not None:
        allowed &= token_keep
    return BlockLayout(bq, bk, lq, lkv, kv_blocks, allowed)
