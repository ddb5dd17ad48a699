"""A compressed layer's entries in the KV cache: pooled once, when their window completes, and kept hot.

A compressed layer (ksa, csa, hca) reads old context only through its entries, so the cache stores them
instead of the raw tokens behind them (`LayerAccess.compress`). Entry j of a row covers positions
[j * stride, j * stride + size) (`attention.compress`): it is pooled by the layer's own compressor, from
the raw K/V at hand, in the update that stores its last token, then never recomputed. Entries are
indexed by position, so the rows of a left-padded batch, which complete an entry at different steps,
each keep their own count; a row's entry j sits at slot j * stride + shift (its padding).

Entries stay on the device: they are what every decode step reads (HCA attends to all of them, CSA
scores all of their indexer keys), and they grow as N / stride, not N.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..attention.compress import CachedEntries, Entries, Pooling

RawFrom = Callable[[int], tuple[torch.Tensor, torch.Tensor, int]]
"""slot -> (keys, values, base): the raw K/V the cache holds from at most `slot` to its end, from slot `base`."""


class EntryStore:
    """Pooled entries of one compressed layer: keys/values (B, Hkv, capacity, D), optional indexer keys
    (B, capacity, d), and per row the number of entries pooled (`done`). Buffers grow geometrically, so
    storing an entry is no O(N) copy."""

    def __init__(self, pooling: Pooling):
        self.pooling = pooling
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.index_keys: torch.Tensor | None = None
        self.done: torch.Tensor | None = None  # (B,) long
        self.shift: torch.Tensor | None = None  # (B,) long: slot - position of each row

    @property
    def count(self) -> int:
        """Entries held for the row that has the most."""
        return int(self.done.max()) if self.done is not None and self.done.numel() else 0

    def start(self, key_states: torch.Tensor) -> None:
        """Empty buffers shaped like `key_states` (B, Hkv, L, D)."""
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = key_states.new_empty(b, h, 0, d)
        self.done = torch.zeros(b, dtype=torch.long, device=key_states.device)

    def pool(self, length: int, shift: torch.Tensor, raw_from: RawFrom) -> None:
        """Pool every entry that the first `length` slots complete and that is not pooled yet."""
        g = self.pooling.geometry
        self.shift = shift
        complete = g.complete(length - shift)  # a row's tokens run from slot shift to length - 1
        lo, hi = int(self.done.min()), int(complete.max())
        if hi <= lo:
            return
        j = torch.arange(lo, hi, device=shift.device)
        new = (j >= self.done[:, None]) & (j < complete[:, None])  # (B, n)
        if not bool(new.any()):
            return
        start = (j * g.stride).expand(new.shape[0], -1)
        slots = start + shift[:, None]
        keys, values, base = raw_from(int(slots[new].min()))
        rel = (slots - base).clamp(0, keys.shape[-2] - 1)  # rows' old or future entries: masked out below
        with torch.no_grad():
            ck, cv = self.pooling.compressor(keys, values, Entries(rel, start, new, g.size))
            ik = self.pooling.index(ck) if self.pooling.index is not None else None
        self._write(lo, hi, new, ck, cv, ik)
        self.done = torch.maximum(self.done, complete)

    def view(self, length: int) -> CachedEntries:
        """The entries held, as the layer reads them: slots in the full sequence, validity per row."""
        n, g = self.count, self.pooling.geometry
        j = torch.arange(n, device=self.done.device)
        start = (j * g.stride).expand(self.done.shape[0], -1)
        slots = (start + self.shift[:, None]).clamp(0, max(length - 1, 0))
        valid = j < self.done[:, None]
        index = self.index_keys[:, :n] if self.index_keys is not None else None
        return CachedEntries(Entries(slots, start, valid, g.size), self.keys[:, :, :n], self.values[:, :, :n], index)

    def resident_bytes(self) -> int:
        n = self.count
        held = [] if self.keys is None else [self.keys[:, :, :n], self.values[:, :, :n]]
        if self.index_keys is not None:
            held.append(self.index_keys[:, :n])
        return sum(t.numel() * t.element_size() for t in held)

    def _write(self, lo: int, hi: int, new: torch.Tensor, ck, cv, ik) -> None:
        if self.keys.shape[2] < hi:
            self.keys, self.values = (_grown(t, 2, hi, self.count) for t in (self.keys, self.values))
        if ik is not None and (self.index_keys is None or self.index_keys.shape[1] < hi):
            base = self.index_keys if self.index_keys is not None else ik.new_empty(ik.shape[0], 0, ik.shape[2])
            self.index_keys = _grown(base, 1, hi, self.count)
        kv_new = new[:, None, :, None]
        self.keys[:, :, lo:hi] = torch.where(kv_new, ck, self.keys[:, :, lo:hi])
        self.values[:, :, lo:hi] = torch.where(kv_new, cv, self.values[:, :, lo:hi])
        if ik is not None:
            self.index_keys[:, lo:hi] = torch.where(new[..., None], ik, self.index_keys[:, lo:hi])


def _grown(buffer: torch.Tensor, dim: int, needed: int, used: int) -> torch.Tensor:
    """`buffer` with capacity >= `needed` along `dim` (doubling), its first `used` entries kept, the rest zero."""
    shape = list(buffer.shape)
    shape[dim] = max(needed, 2 * buffer.shape[dim], 16)
    out = buffer.new_zeros(shape)
    out.narrow(dim, 0, used).copy_(buffer.narrow(dim, 0, used))
    return out
