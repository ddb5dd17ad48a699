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
from .row_ranges import Ranges, row_ranges


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

    def empty_rows(self) -> torch.Tensor | None:
        """(B, G, NQ, BQ) True for query rows that keep no key at all; None when every row keeps one (cached)."""
        if "empty" not in self._memo:
            self._memo["empty"] = _empty_rows(self.mask)
        return self._memo["empty"]

    def row_ranges(self) -> Ranges | None:
        """Per query row, a key prefix and a key range holding exactly its pairs, if every row's are (cached);
        see `row_ranges`."""
        if "ranges" not in self._memo:
            self._memo["ranges"] = row_ranges(self.kv_blocks, self.mask, self.block_k)
        return self._memo["ranges"]

    def merged(self, factor: int) -> BlockLayout:
        """The same pairs with `factor` consecutive query blocks merged into one (cached).

        A merged block keeps the union of its members' key blocks; each member's rows keep their own mask
        and are masked out of blocks that member does not keep. Fused kernels run taller query tiles this
        way (torch's CPU flash backward is about 1.5x faster per pair on 256 rows than on 64).
        """
        if ("merged", factor) not in self._memo:
            self._memo[("merged", factor)] = _merge_q_blocks(self, factor)
        return self._memo[("merged", factor)]

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

    Query block i (>= first) reads key blocks [i * stride + offset - width, i * stride + offset) entirely
    (every row, every group, no token mask; `stride` = block_q / block_k), so executors can run them from
    an overlapping strided view of K/V without copying and without a mask. `rest_blocks`/`rest_mask` hold
    everything else: the other kept blocks of banded query blocks (sinks, partial diagonal and window-edge
    blocks) and all kept blocks of the query blocks before `first`. Sliding-window and streaming (LoZA)
    layouts are mostly band.
    """

    first: int
    width: int
    offset: int
    rest_blocks: torch.Tensor  # (B, G, NQ, Kr) long, -1 = unused
    rest_mask: torch.Tensor  # (B, G, NQ, Kr, BQ, BK) bool
    stride: int = 1
    _memo: dict = field(default_factory=dict, repr=False)

    def rest_used(self) -> list[int]:
        """Per query block, how many rest slots any row or group uses (lists are sorted, -1 last)."""
        if "used" not in self._memo:
            self._memo["used"] = (self.rest_blocks >= 0).sum(-1).amax(dim=(0, 1)).tolist()
        return self._memo["used"]

    def rest_empty(self) -> torch.Tensor | None:
        """(B, G, NQ, BQ) True for rows that keep no rest key (their whole window is band); None if there are none."""
        if "empty" not in self._memo:
            self._memo["empty"] = _empty_rows(self.rest_mask)
        return self._memo["empty"]

    def rest_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive (B, G, NQ, BQ, Kr*BK) bias of the rest blocks, built once per dtype."""
        if dtype not in self._memo:
            self._memo[dtype] = _additive(self.rest_mask, dtype)
        return self._memo[dtype]


def _empty_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """(B, G, NQ, K, BQ, BK) -> (B, G, NQ, BQ) rows with no kept pair, or None when there are none."""
    empty = ~mask.any(-1).any(3)
    return empty if bool(empty.any()) else None


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, G, NQ, K, BQ, BK) bool -> (B, G, NQ, BQ, K*BK) additive bias: 0 where allowed, -inf elsewhere."""
    b, g, nq, k, bq, bk = mask.shape
    keep = mask.permute(0, 1, 2, 4, 3, 5).reshape(b, g, nq, bq, k * bk)
    return torch.zeros((), dtype=dtype).masked_fill(~keep, float("-inf"))


def find_band(layout: BlockLayout) -> Band | None:
    kv, mask = layout.kv_blocks, layout.mask
    b, g, nq, _ = kv.shape
    if layout.block_q % layout.block_k or nq < 2:
        return None
    stride = layout.block_q // layout.block_k
    device = kv.device
    nkb = (layout.kv_len + layout.block_k - 1) // layout.block_k
    padding = torch.arange(nq * layout.block_q, device=device).view(nq, 1, layout.block_q, 1) >= layout.q_len
    kept_full = (kv >= 0) & (mask | padding).all(dim=-1).all(dim=-1)  # padding query rows keep what the band keeps
    table = torch.zeros(b, g, nq, nkb + 1, dtype=torch.bool, device=device)
    table.scatter_(-1, torch.where(kv >= 0, kv, nkb), kept_full)
    table = table[..., :nkb]
    last = kv.max(dim=-1).values  # (B, G, NQ): the diagonal block of each query block
    qi = torch.arange(nq, device=device)
    offset = int(last[0, 0, -1]) - (nq - 1) * stride
    steps = torch.arange(1, nkb + 1, device=device)
    below = last[..., None] - (stride - 1) - steps  # blocks under the block's diagonal stretch, nearest first
    run = (table.gather(-1, below.clamp(min=0)) & (below >= 0)).int().cumprod(-1).sum(-1)  # (B, G, NQ)
    run = torch.where(last == qi * stride + offset, run, torch.zeros_like(run)).amin(dim=(0, 1))  # (NQ,)
    width = int(run[max(1, layout.q_len // layout.block_q) - 1])  # the last block without padding rows sets it
    if width < 2:
        return None
    ok = (run >= width).flip(0).int().cumprod(0).flip(0).bool()  # True from `first` to the end
    first = int(nq - ok.sum())
    if first >= nq:
        return None
    offset -= stride - 1  # the band ends where the diagonal stretch begins
    lo = (qi * stride + offset - width).view(1, 1, nq, 1)
    in_band = (kv >= lo) & (kv < lo + width) & (qi >= first).view(1, 1, nq, 1)
    rest = torch.where(in_band, -1, kv)
    order = torch.where(rest >= 0, rest, nkb).sort(dim=-1)
    k_rest = max(int((rest >= 0).sum(-1).max()), 1)
    slots = order.indices[..., :k_rest]
    rest_blocks = torch.where(order.values[..., :k_rest] < nkb, order.values[..., :k_rest], -1)
    rest_mask = mask.gather(3, slots[..., None, None].expand(-1, -1, -1, -1, *mask.shape[-2:]))
    rest_mask = rest_mask & (rest_blocks >= 0)[..., None, None]
    return Band(first, width, offset, rest_blocks, rest_mask, stride)


def _merge_q_blocks(layout: BlockLayout, factor: int) -> BlockLayout:
    """`BlockLayout.merged`: query blocks padded to a multiple of `factor` (padding rows keep nothing)."""
    kv, mask = layout.kv_blocks, layout.mask
    b, g, nq, k = kv.shape
    bq, bk = layout.block_q, layout.block_k
    nqm = -(-nq // factor)
    extra = nqm * factor - nq
    kv = torch.cat([kv, kv.new_full((b, g, extra, k), -1)], dim=2).view(b, g, nqm, factor * k)
    mask = torch.cat([mask, mask.new_zeros((b, g, extra, *mask.shape[3:]))], dim=2)
    nkb = (layout.kv_len + bk - 1) // bk
    union = torch.where(kv >= 0, kv, nkb).sort(dim=-1).values
    repeat = torch.zeros_like(union, dtype=torch.bool)
    repeat[..., 1:] = union[..., 1:] == union[..., :-1]
    union = torch.where(repeat, nkb, union).sort(dim=-1).values  # distinct blocks first, nkb after
    km = max(int((union < nkb).sum(-1).max()), 1)
    # each member slot goes to the merged slot holding its block; unused member slots to a dropped extra slot
    slot = torch.searchsorted(union, torch.where(kv >= 0, kv, nkb)).clamp(max=km)
    merged = mask.new_zeros((b, g, nqm, km + 1, factor, bq, bk))
    idx = [torch.arange(n, device=kv.device).view(*([1] * i), n, *([1] * (3 - i))) for i, n in enumerate((b, g, nqm))]
    member = torch.arange(factor, device=kv.device).repeat_interleave(k).view(1, 1, 1, -1)
    merged[(*idx, slot, member)] = mask.view(b, g, nqm, factor * k, bq, bk)
    blocks = torch.where(union[..., :km] < nkb, union[..., :km], -1)
    merged = merged[:, :, :, :km].reshape(b, g, nqm, km, factor * bq, bk)
    return BlockLayout(factor * bq, bk, layout.q_len, layout.kv_len, blocks, merged)


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
