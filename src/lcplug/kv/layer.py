"""One layer of the tiered cache: block-granular K/V over a hot (device) tier and an optional lower tier.

The sequence is cut into blocks of `block_size` tokens. Full blocks are *sealed* (immutable); the last,
partial block is the open *tail* and always stays hot. A sealed block is in one of three states:
- hot: on the device (it may also have a lower copy);
- spilled: only in the lower store (dense layers over their hot budget, per the placement policy);
- dropped: gone for good, because the layer's attention pattern says no future query reads it (sliding
  window, streaming blocks). Such layers keep exactly their retention set hot and never spill.

What `update` returns depends on how the layer's attention reads keys (`LayerAccess`):
- a layer whose attention takes compact K/V (`lcplug.attention.compact`) gets only the blocks it reads:
  a pattern layer the blocks its queries need; a content-selecting layer (DSA) the open tail plus a
  `fetch` for the blocks it selects and the per-token `index_keys` it selects by, kept hot by this layer.
  Lower tiers are read only for those blocks, and transient memory is theirs, not the sequence's;
- any other layer gets the full-length K/V the model's mask expects (slot i = token i): all blocks for a
  dense layer; for a pattern layer whose attention cannot take compact K/V, the blocks it needs with zeros
  elsewhere, which its pattern never lets a query attend to.

A compressed layer (ksa, csa, hca: `LayerAccess.compress`) is a pattern layer whose pattern is its raw
window, plus entries (`entries.EntryStore`): each update first pools the entries its tokens complete,
from the raw K/V still held, then hands over the raw blocks the queries need with every entry held in the
tag (`CompactKV.entries`), then drops the raw blocks that neither the raw window of a future query nor an
incomplete entry window needs (`compress.RawRetention`). Entries are counted on positions, so this needs
position ids that count one per slot from each row's first real token (what `generate` passes); other
position ids raise `KVCacheError`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from ..attention.compact import CompactKV, LayerAccess, compact_of, expand, tag
from ..attention.pattern import Pattern
from .entries import EntryStore
from .errors import KVCacheError
from .needs import FUTURE, blocks_needed
from .placement import Placement
from .store import KV, DiskStore, HostStore

PREFETCH_BLOCKS = 256
"""Spilled blocks a `Prefetcher` reads ahead per layer: one streamed chunk (`attention.stream.CHUNK_BLOCKS`)."""


class TieredLayer(CacheLayerMixin):
    """A `transformers` cache layer storing K/V in blocks across tiers (see the module docstring)."""

    is_sliding = False  # the mask sees every slot from 0, as for a DynamicLayer: patterns do the skipping
    is_croppable = False  # dropped and write-once blocks cannot be rolled back

    def __init__(
        self,
        layer_idx: int,
        block_size: int,
        access: LayerAccess | None = None,
        store: HostStore | DiskStore | None = None,
        placement: Placement | None = None,
    ):
        super().__init__()
        self.layer_idx, self.block_size = layer_idx, block_size
        self.access = access or LayerAccess()
        self.pattern: Pattern | None = self.access.pattern
        pooling = self.access.compress
        self.entries = EntryStore(pooling) if pooling is not None else None
        self.retention: Pattern | None = pooling.retention(block_size) if pooling is not None else self.pattern
        self.store, self.placement = store, placement
        self.length = 0
        self.hot: dict[int, KV] = {}
        self.last_use: dict[int, int] = {}  # hot block -> the step that last read it
        self.reads: dict[int, int] = {}  # block -> steps that read it (kept when it spills: policies may use it)
        self.staged: dict[int, KV] = {}  # spilled blocks a `Prefetcher` read ahead for the next update
        self.index_keys: torch.Tensor | None = None  # (B, capacity, d) selection keys of a content-selecting layer
        self.step = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.tail: KV = (key_states[..., :0, :].clone(), value_states[..., :0, :].clone())
        if self.entries is not None:
            self.entries.start(key_states)
        self.is_initialized = True

    # ---- the Cache layer interface ------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> KV:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.step += 1
        start = self.length
        self._append(key_states, value_states)
        if self.access.index is not None:
            self._append_index(key_states)
        positions = _position_ids(args, kwargs)
        if self.entries is not None and positions is None:
            raise KVCacheError(
                f"kv: layer {self.layer_idx} is compressed attention, whose cache needs the tokens' position ids; "
                "pass position_ids (generate does)"
            )
        if self.access.index is not None and self.access.compact:
            keys, values = self.fetch([])  # the layer fetches what its selection needs
        elif self.pattern is None and self.access.compact:
            keys, values = self.fetch(sorted(self.hot))  # the layer streams the spilled blocks it reads
        elif self.pattern is None or positions is None:
            keys, values = self._gather()
        else:
            shift = (start + positions.shape[-1] - 1) - positions[:, -1].long()
            if self.entries is not None:
                self._pool(positions, start, shift.expand(key_states.shape[0]))
            needed = blocks_needed(
                self.pattern, positions.amin(-1), positions.amax(-1), shift, self.block_size, self.sealed
            )
            keys, values = self.fetch(needed)
            if not self.access.compact:  # an attention that reads full-length K/V: zeros where it never looks
                keys, values = expand(keys, values, compact_of(keys, None))
            self._retain(positions[:, -1] + 1, shift)
        self._place()
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.entries is not None:
            self.entries = EntryStore(self.access.compress)
        self.hot.clear()
        self.last_use.clear()
        self.reads.clear()
        self.index_keys = None
        if self.store is not None:
            self.store.clear()
        self.length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            _unsupported("crop (assisted decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        _unsupported("reorder_cache (beam search)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        _unsupported("batch_repeat_interleave (num_return_sequences > 1)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        _unsupported("batch_select_indices")

    # ---- mechanics ------------------------------------------------------------------------------------

    @property
    def sealed(self) -> int:
        return self.length // self.block_size

    def stats(self) -> dict[str, int]:
        """Block counts per state and bytes read from the lower tier (what tests and benchmarks report)."""
        spilled = sum(1 for b in range(self.sealed) if b not in self.hot and self._stored(b))
        return {
            "hot": len(self.hot),
            "spilled": spilled,
            "dropped": self.sealed - len(self.hot) - spilled,
            "bytes_read": self.store.bytes_read if self.store is not None else 0,
            "resident_bytes": self.resident_bytes(),
            "entries": self.entries.count if self.entries is not None else 0,
        }

    def resident_bytes(self) -> int:
        """Bytes this layer holds on its device: hot blocks, the open tail, selection keys and compressed entries."""
        tensors = [t for block in self.hot.values() for t in block]
        if self.is_initialized:
            tensors += list(self.tail)
        if self.index_keys is not None:
            tensors.append(self.index_keys[:, : self.length])
        entries = self.entries.resident_bytes() if self.entries is not None else 0
        return sum(t.numel() * t.element_size() for t in tensors) + entries

    @property
    def prefetchable(self) -> bool:
        """A dense layer that spills: its next update reads every spilled block, so they can be read ahead."""
        return self.store is not None and self.access.pattern is None and self.access.index is None

    def read_spilled(self) -> dict[int, KV]:
        """The first `PREFETCH_BLOCKS` spilled blocks (what a streamed read takes first), read into host memory
        (a `Prefetcher` calls this on its worker thread; the bound keeps read-ahead memory bounded)."""
        blocks = [b for b in range(self.sealed) if b not in self.hot and self._stored(b)][:PREFETCH_BLOCKS]
        return self.store.get_many(blocks, torch.device("cpu")) if blocks else {}

    def _stored(self, block: int) -> bool:
        return self.store is not None and block in self.store

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add new tokens: fill the tail, seal each full block as hot, keep the remainder as the new tail."""
        k = torch.cat([self.tail[0], keys], dim=-2)
        v = torch.cat([self.tail[1], values], dim=-2)
        first = self.sealed
        full = k.shape[-2] // self.block_size
        bs = self.block_size
        for i in range(full):
            block = (k[..., i * bs : (i + 1) * bs, :].clone(), v[..., i * bs : (i + 1) * bs, :].clone())
            self.hot[first + i] = block
            self.last_use[first + i] = self.step
        self.tail = (k[..., full * bs :, :].clone(), v[..., full * bs :, :].clone())
        self.length += keys.shape[-2]

    def fetch(self, blocks: list[int], tail: bool = True) -> KV:
        """Compact K/V (tagged `CompactKV`) of the sealed `blocks` (sorted) and, with `tail`, the open tail.

        Spilled blocks are read from the lower tier; a content-selecting layer promotes them to hot (its
        selections repeat from step to step), the placement policy evicting its least recently used blocks.
        """
        sealed = [b for b in blocks if b < self.sealed]
        promote = self.access.index is not None
        parts = self._blocks(sealed, promote=promote)
        if promote:
            self._place()  # promoted blocks count against the budget at once; these are the most recent uses
        tail = tail and self.tail[0].shape[-2] > 0
        listed = sealed + ([self.sealed] if tail else [])
        ends = [t if tail else t[..., :0, :] for t in self.tail]  # an empty end keeps the shape for no blocks
        keys, values = (torch.cat([p[i] for p in parts] + [ends[i]], dim=-2) for i in (0, 1))
        index = self.index_keys[:, : self.length] if self.index_keys is not None else None
        entries = self.entries.view(self.length) if self.entries is not None else None
        info = CompactKV(listed, self.block_size, self.length, fetch=self.fetch, index_keys=index, entries=entries)
        return tag(keys, info), values

    def _blocks(self, blocks: list[int], *, promote: bool = False) -> list[KV]:
        """The sealed `blocks`, hot or read from the lower tier; raises if one was dropped."""
        lost = [b for b in blocks if b not in self.hot and not self._stored(b)]
        if lost:
            raise KVCacheError(
                f"kv: layer {self.layer_idx} needs block {lost[0]}, which its pattern's retention dropped; "
                "the pattern's key_intervals under-covers what it allows"
            )
        spilled = [b for b in blocks if b not in self.hot]
        fetched = {b: tuple(t.to(self.device) for t in self.staged.pop(b)) for b in spilled if b in self.staged}
        unread = [b for b in spilled if b not in fetched]
        if unread:
            fetched.update(self.store.get_many(unread, self.device))
        if promote:
            self.hot.update(fetched)
        for b in blocks:
            self.reads[b] = self.reads.get(b, 0) + 1
            if b in self.hot:
                self.last_use[b] = self.step
        return [self.hot[b] if b in self.hot else fetched[b] for b in blocks]

    def _append_index(self, key_states: torch.Tensor) -> None:
        """Add the new tokens' selection keys, growing the buffer geometrically (no O(N) copy per step)."""
        with torch.no_grad():
            new = self.access.index(key_states).detach()
        used = self.length - new.shape[1]
        if self.index_keys is None or self.index_keys.shape[1] < self.length:
            grown = new.new_empty(new.shape[0], max(self.length, 2 * used, 64), new.shape[2])
            if self.index_keys is not None:
                grown[:, :used] = self.index_keys[:, :used]
            self.index_keys = grown
        self.index_keys[:, used : self.length] = new

    def _gather(self, first: int = 0) -> KV:
        """K/V from sealed block `first` on (spilled ones read back) and the tail: full-length by default."""
        parts = self._blocks(list(range(first, self.sealed)))
        return tuple(torch.cat([p[i] for p in parts] + [self.tail[i]], dim=-2) for i in (0, 1))

    def _pool(self, positions: torch.Tensor, start: int, shift: torch.Tensor) -> None:
        """Pool the compressed entries this update's tokens complete (`EntryStore.pool`), after checking that
        the position ids count one per slot from each row's first real token: entries sit on positions."""
        positions = positions.expand(shift.shape[0], -1)
        padding = shift if self.entries.shift is None else self.entries.shift  # the first update's
        expected = torch.arange(start, self.length, device=positions.device) - padding[:, None]
        wrong = ((expected >= 0) & (positions.long() != expected)).nonzero()
        ahead = (shift < 0).nonzero()  # positions beyond the slots: tokens before them were never stored
        if len(ahead):
            row = int(ahead[0])
            raise KVCacheError(
                f"kv: layer {self.layer_idx} is compressed attention, whose cached entries need position ids that "
                f"count from 0 at each row's first token; row {row} has position {int(positions[row, -1])} at slot "
                f"{self.length - 1}"
            )
        if len(wrong):
            row, col = wrong[0].tolist()
            raise KVCacheError(
                f"kv: layer {self.layer_idx} is compressed attention, whose cached entries need position ids "
                "counting one per slot from each row's first real token, with the same padding at every step (as "
                f"generate passes them); row {row} has position {int(positions[row, col])} at slot {start + col} "
                f"(expected {int(expected[row, col])}): packed rows and custom position ids need the default cache"
            )

        def raw_from(slot: int) -> tuple[torch.Tensor, torch.Tensor, int]:
            first = min(slot // self.block_size, self.sealed)
            return (*self._gather(first), first * self.block_size)

        self.entries.pool(self.length, shift, raw_from)

    def _retain(self, next_pos: torch.Tensor, shift: torch.Tensor) -> None:
        """Drop the hot blocks no query at a position >= `next_pos` can read (pattern layers; a compressed
        layer also keeps the raw tokens of its entries not yet complete)."""
        keep = set(
            blocks_needed(
                self.retention, next_pos, torch.full_like(next_pos, FUTURE), shift, self.block_size, self.sealed
            )
        )
        for b in [b for b in self.hot if b not in keep]:
            del self.hot[b], self.last_use[b]

    def _place(self) -> None:
        """Spill hot blocks over the budget to the lower tier (dense layers; a sealed block is written once)."""
        if self.store is None or self.placement is None:  # device tier, or a pattern layer: nothing spills
            return
        for b in self.placement.victims(self.last_use, self.reads, self.sealed):
            if b not in self.store:
                self.store.put(b, *self.hot[b])
            del self.hot[b], self.last_use[b]

    # ---- save and reopen (`persist`) ------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """What rebuilds this layer: its counters, the tail, every block it holds (hot ones, and spilled ones
        read back from the lower tier) with the last use of those that were hot, and a content-selecting
        layer's index keys. Dropped blocks are gone and stay gone."""
        if not self.is_initialized:
            return {"length": 0}
        if self.entries is not None:
            raise KVCacheError(
                f"kv: layer {self.layer_idx} is compressed attention (ksa, csa, hca); saving its pooled entries is "
                "not supported yet"
            )
        spilled = [b for b in range(self.sealed) if b not in self.hot and self._stored(b)]
        blocks = {**self.hot, **(self.store.get_many(spilled, torch.device("cpu")) if spilled else {})}
        index = self.index_keys[:, : self.length] if self.index_keys is not None else None
        return {
            "length": self.length,
            "step": self.step,
            "tail": self.tail,
            "blocks": blocks,
            "hot": dict(self.last_use),
            "index_keys": index,
        }

    def import_state(self, state: dict[str, Any], device: torch.device) -> None:
        """Rebuild from `export_state()`'s output (tensors anywhere): blocks that were hot come back hot on
        `device`, the others go to this layer's lower tier (hot when it has none), then the budget applies."""
        self.reset()
        if not state["length"]:
            return
        self.device = device
        self.length, self.step = state["length"], state["step"]
        self.tail = (state["tail"][0].to(device), state["tail"][1].to(device))
        if state["index_keys"] is not None:
            self.index_keys = state["index_keys"].to(device)
        for b, (keys, values) in sorted(state["blocks"].items()):
            if b in state["hot"] or self.store is None:
                self.hot[b] = (keys.to(device), values.to(device))
                self.last_use[b] = state["hot"].get(b, self.step)
            else:
                self.store.put(b, keys, values)
        self.is_initialized = True
        self._place()


def _position_ids(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The (B, Lq) position ids of this update's tokens, from the attention kwargs transformers forwards."""
    for extra in (kwargs.get("kwargs"), kwargs, *args):
        if isinstance(extra, dict) and extra.get("position_ids") is not None:
            return extra["position_ids"]
    return None


def _unsupported(what: str) -> None:
    raise KVCacheError(f"kv: the tiered cache does not support {what} yet; use the default cache for it")
