"""One layer of the tiered cache: block-granular K/V over a hot (device) tier and an optional lower tier.

The sequence is cut into blocks of `block_size` tokens. Full blocks are *sealed* (immutable); the last,
partial block is the open *tail* and always stays hot. A sealed block is in one of three states:
- hot: on the device (it may also have a lower copy);
- spilled: only in the lower store (dense layers over their hot budget, per the placement policy);
- dropped: gone for good, because the layer's attention pattern says no future query reads it (sliding
  window, streaming blocks). Such layers keep exactly their retention set hot and never spill.

`update` returns the full-length K/V the model's mask expects (slot i = token i). A pattern layer fills
only the blocks its queries need; the others are zeros that its pattern never lets a query attend to,
so results are exact while lower tiers are read only for needed blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from ..attention.pattern import Pattern
from .errors import KVCacheError
from .needs import FUTURE, blocks_needed
from .placement import RecencyLRU
from .store import KV, DiskStore, HostStore


class TieredLayer(CacheLayerMixin):
    """A `transformers` cache layer storing K/V in blocks across tiers (see the module docstring)."""

    is_sliding = False  # the mask sees every slot from 0, as for a DynamicLayer: patterns do the skipping
    is_croppable = False  # dropped and write-once blocks cannot be rolled back

    def __init__(
        self,
        layer_idx: int,
        block_size: int,
        pattern: Pattern | None = None,
        store: HostStore | DiskStore | None = None,
        placement: RecencyLRU | None = None,
    ):
        super().__init__()
        self.layer_idx, self.block_size, self.pattern = layer_idx, block_size, pattern
        self.store, self.placement = store, placement
        self.length = 0
        self.hot: dict[int, KV] = {}
        self.last_use: dict[int, int] = {}
        self.step = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.tail: KV = (key_states[..., :0, :].clone(), value_states[..., :0, :].clone())
        self.is_initialized = True

    # ---- the Cache layer interface ------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> KV:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.step += 1
        start = self.length
        self._append(key_states, value_states)
        positions = _position_ids(args, kwargs)
        if self.pattern is None or positions is None:
            keys, values = self._gather(range(self.sealed), dense=True)
        else:
            shift = (start + positions.shape[-1] - 1) - positions[:, -1].long()
            needed = blocks_needed(
                self.pattern, positions.amin(-1), positions.amax(-1), shift, self.block_size, self.sealed
            )
            keys, values = self._gather(needed, dense=len(needed) == self.sealed)
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
        self.hot.clear()
        self.last_use.clear()
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
        }

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

    def _gather(self, blocks: range | list[int], *, dense: bool) -> KV:
        """Full-length K/V with `blocks` and the tail filled; other slots zero (only when not `dense`)."""
        blocks = list(blocks)
        lost = [b for b in blocks if b not in self.hot and not self._stored(b)]
        if lost:
            raise KVCacheError(
                f"kv: layer {self.layer_idx} needs block {lost[0]}, which its pattern's retention dropped; "
                "the pattern's key_intervals under-covers what it allows"
            )
        spilled = [b for b in blocks if b not in self.hot]
        fetched = self.store.get_many(spilled, self.device) if spilled else {}
        for b in blocks:
            if b in self.hot:
                self.last_use[b] = self.step
        parts = [self.hot[b] if b in self.hot else fetched[b] for b in blocks]
        if dense:
            return tuple(torch.cat([p[i] for p in parts] + [self.tail[i]], dim=-2) for i in (0, 1))
        tail_k = self.tail[0]
        shape = (*tail_k.shape[:-2], self.length, tail_k.shape[-1])
        out = (tail_k.new_zeros(shape), tail_k.new_zeros(shape))
        bs = self.block_size
        for b, part in zip(blocks, parts):
            for i in (0, 1):
                out[i][..., b * bs : (b + 1) * bs, :] = part[i]
        for i in (0, 1):
            out[i][..., self.sealed * bs :, :] = self.tail[i]
        return out

    def _retain(self, next_pos: torch.Tensor, shift: torch.Tensor) -> None:
        """Drop the hot blocks no query at a position >= `next_pos` can read (pattern layers)."""
        keep = set(
            blocks_needed(
                self.pattern, next_pos, torch.full_like(next_pos, FUTURE), shift, self.block_size, self.sealed
            )
        )
        for b in [b for b in self.hot if b not in keep]:
            del self.hot[b], self.last_use[b]

    def _place(self) -> None:
        """Spill hot blocks over the budget to the lower tier (dense layers; a sealed block is written once)."""
        if self.store is None or self.placement is None:  # device tier, or a pattern layer: nothing spills
            return
        for b in self.placement.victims(self.last_use, self.sealed):
            if b not in self.store:
                self.store.put(b, *self.hot[b])
            del self.hot[b], self.last_use[b]


def _position_ids(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The (B, Lq) position ids of this update's tokens, from the attention kwargs transformers forwards."""
    for extra in (kwargs.get("kwargs"), kwargs, *args):
        if isinstance(extra, dict) and extra.get("position_ids") is not None:
            return extra["position_ids"]
    return None


def _unsupported(what: str) -> None:
    raise KVCacheError(f"kv: the tiered cache does not support {what} yet; use the default cache for it")
