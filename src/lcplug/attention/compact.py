"""Compact K/V: key/value tensors that hold only some key blocks of a longer sequence.

A block-sparse layer reads few key blocks, so a cache that knows the pattern (lcplug's KV tiers) need not
build full-length K/V: it hands the layer only the blocks it will read, concatenated, and tags the key
tensor with a `CompactKV` saying which blocks those are. Executors then run on a layout whose key-block
indices are remapped to the compact tensors (`compact_layout`); the token mask is unchanged, since it was
evaluated at the full sequence's indices. Layers whose selection depends on content (DSA) get a compact
tensor of the blocks already at hand plus `fetch`, to ask for the blocks they select, and `index_keys`,
the per-token keys they select by, so selecting never reads the full K/V. Compressed layers (ksa, csa,
hca) get their raw window plus `entries`, the compressed entries the cache pooled once and kept, so the
raw tokens behind them can be gone.

The tag is a tensor attribute because the key tensor is the only object transformers passes unchanged
from `Cache.update` to the attention function. `compact_of` also checks lengths, so a compact tensor that
lost its tag on the way fails loudly instead of being read as the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .blocks import BlockLayout
from .pattern import Pattern

if TYPE_CHECKING:
    from .compress import CachedEntries, Pooling

ATTR = "_lcplug_compact"
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(eq=False)
class CompactKV:
    """Which key blocks compact K/V tensors hold: `blocks[i]` is the full-sequence block at compact block i.

    `length` is the full sequence length; the last block may be partial (the open tail of a cache).
    `fetch(blocks)` returns compact (keys, values) of exactly those blocks (tagged); `index_keys` (B, L, d)
    are a content-selecting layer's per-token selection keys for the whole sequence, or None; `entries` a
    compressed layer's pooled entries (`compress.CachedEntries`), or None.
    """

    blocks: list[int]
    block_size: int
    length: int
    fetch: Callable[..., KV] | None = None
    index_keys: torch.Tensor | None = None
    entries: CachedEntries | None = None
    _lut: dict = field(default_factory=dict, repr=False)

    @property
    def is_full(self) -> bool:
        """The compact tensors hold every block in order: they are the full K/V."""
        return self.blocks == list(range(-(-self.length // self.block_size)))

    @property
    def compact_length(self) -> int:
        """Tokens in the compact tensors: whole blocks, except a partial last block of the sequence."""
        bs = self.block_size
        return sum(min(bs, self.length - b * bs) for b in self.blocks)

    def lookup(self, device: torch.device) -> torch.Tensor:
        """(num_full_blocks + 1,) long: compact index of each full block, -1 where absent (last slot: -1 pad)."""
        if device not in self._lut:
            lut = torch.full((-(-self.length // self.block_size) + 1,), -1, dtype=torch.long)
            lut[torch.tensor(self.blocks, dtype=torch.long)] = torch.arange(len(self.blocks))
            self._lut[device] = lut.to(device)
        return self._lut[device]


@dataclass(frozen=True)
class LayerAccess:
    """How one attention layer reads its keys, as far as a KV cache needs to know.

    `pattern`: a static pattern (the layer reads, so a cache keeps, only its blocks), or None; `index`: for a
    layer that selects blocks by content (DSA), the function turning new key states (B, Hkv, L, D) into its
    per-token selection keys (B, L, d), or None; `block_size`: the layer's own block size (None for dense
    layers); `compact`: the layer's attention takes compact K/V instead of full-length tensors; `compress`:
    for a compressed layer (ksa, csa, hca), how the cache pools its entries (`compress.Pooling`), or None.
    Its `pattern` is then the raw window: the cache keeps raw tokens only for it and the open entry
    windows, stores each entry once it completes and hands the layer both.
    """

    pattern: Pattern | None = None
    index: Callable[[torch.Tensor], torch.Tensor] | None = None
    block_size: int | None = None
    compact: bool = False
    compress: Pooling | None = None


def tag(keys: torch.Tensor, info: CompactKV) -> torch.Tensor:
    setattr(keys, ATTR, info)
    return keys


def compact_of(key: torch.Tensor, kv_length: int | None) -> CompactKV | None:
    """The tag of `key`, or None for ordinary full-length keys; `kv_length` is what the mask expects, if known."""
    info = getattr(key, ATTR, None)
    if info is None and kv_length is not None and key.shape[-2] != kv_length:
        raise RuntimeError(
            f"attention received {key.shape[-2]} keys for a mask of {kv_length}: compact K/V lost its block map "
            "between the cache and the attention function (an unsupported model-specific step in between?)"
        )
    return info


def compact_layout(layout: BlockLayout, info: CompactKV, *, subset: bool = False) -> BlockLayout:
    """`layout` with key-block indices moved to the compact tensors. Every block it reads must be present,
    unless `subset`: then the layout keeps only the blocks the compact tensors hold (one part of a streamed
    attention whose parts are merged by their log-sum-exps)."""
    if info.is_full:
        return layout
    if layout.block_k != info.block_size:
        raise RuntimeError(f"compact K/V in blocks of {info.block_size} cannot serve a layout of {layout.block_k}")
    lut = info.lookup(layout.kv_blocks.device)
    moved = torch.where(layout.kv_blocks >= 0, lut[layout.kv_blocks.clamp(min=0)], -1)
    missing = (layout.kv_blocks >= 0) & (moved < 0)
    if subset:
        moved, mask = _squeeze(moved, layout.mask)
    elif bool(missing.any()):
        block = int(layout.kv_blocks[missing][0])
        raise RuntimeError(f"the layout reads key block {block}, which the compact K/V does not hold")
    else:
        mask = layout.mask
    return BlockLayout(layout.block_q, layout.block_k, layout.q_len, info.compact_length, moved, mask)


def _squeeze(blocks: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the unused (-1) slots of block lists (B, G, NQ, K) and their token masks, keeping order, so an
    executor's work is the blocks present, not the whole layout's width."""
    present = blocks >= 0
    width = max(int(present.sum(-1).max()), 1)
    order = torch.sort((~present).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    kept = blocks.gather(-1, order)
    picked = mask.gather(3, order[..., None, None].expand(*order.shape, *mask.shape[-2:]))
    return kept, picked & (kept >= 0)[..., None, None]


def full_kv(key: torch.Tensor, value: torch.Tensor, info: CompactKV) -> KV:
    """Every block of the sequence as full-length K/V: fetched when the tags offer a fetch, else the compact
    blocks in place with zeros elsewhere (`expand`)."""
    if info.fetch is not None and not info.is_full:
        key, value = info.fetch(list(range(-(-info.length // info.block_size))))
        info = compact_of(key, None)
    return expand(key, value, info)


def expand(key: torch.Tensor, value: torch.Tensor, info: CompactKV) -> KV:
    """Full-length K/V with the compact blocks in place and zeros elsewhere (for the dense reference path,
    whose mask never lets a query reach an absent block)."""
    if info.is_full:
        return key, value
    bs = info.block_size
    shape = (*key.shape[:-2], info.length, key.shape[-1])
    out = (key.new_zeros(shape), value.new_zeros(shape))
    for i, block in enumerate(info.blocks):
        for full, part in zip(out, (key, value)):
            piece = part[..., i * bs : (i + 1) * bs, :]
            full[..., block * bs : block * bs + piece.shape[-2], :] = piece
    return out
