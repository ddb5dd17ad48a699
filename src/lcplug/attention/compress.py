"""Compressed KV entries: learned pooling of key/value windows, and which entries each query may see.

KSA summaries, DeepSeek-V4's CSA/HCA compressed entries and NSA's compression branch are one mechanism:
windows of `size` raw tokens, one every `stride` positions, each pooled into a single key/value entry with
weights softmax(Z + B) over the window, Z = k . w a content score and B a learned bias per offset in the
window (CSA's pooling; with w = q_sum / sqrt(D) it is KSA's summary token, a learned query attending to
its chunk). Both start at zero, so a fresh patch pools by the plain mean: a compressed entry starts as
the centroid of its window's keys and values, which the model's queries already know how to read.

Entries are counted on positions, never on slots: entry j of a sequence covers positions
[j * stride, j * stride + size), so left padding, decode steps and prefill agree; a window that leaves its
document (packed rows) or the keys at hand is not an entry. An entry is visible to a query once its
window is complete, at or before the query (`disjoint`: only once it has left the query's raw window,
KSA's rule, so no token is counted twice), and the model's own mask (causal, its window, padding,
documents) must allow both ends of the window.

Keys are pooled after the model's RoPE (the attention function receives them rotated): a mean of rotated
keys keeps the low-frequency (long-range) components of their position and averages away the fastest
ones, the part of position that a window of `size` tokens cannot resolve anyway. No normalisation is
applied to pooled keys: it would move them off the scale the model's queries were trained against.

A KV cache can store entries instead of the raw tokens they cover (`Pooling`, declared through
`LayerAccess.compress`): each entry is pooled once, when its window completes, and handed back as
`CachedEntries`; the cache keeps raw only what `RawRetention` says future queries or entries still need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ParamError
from .pattern import Interval, Pattern


class ChunkWindowPattern(Pattern):
    """The raw branch: each query sees the last `chunks` chunks of `chunk` positions raw, its own included.

    With chunk 1 it is a token sliding window of `chunks` tokens; KSA counts its window in chunks, so the
    raw window ends exactly where the query's older chunks are read through their summaries.
    """

    def __init__(self, chunks: int, chunk: int = 1, block_size: int = 64):
        self.chunks, self.chunk, self.block_size = chunks, chunk, block_size

    def window_start(self, q_pos: torch.Tensor) -> torch.Tensor:
        """First position the query at `q_pos` sees raw."""
        return (q_pos // self.chunk - self.chunks + 1) * self.chunk

    def allows(self, q_pos: torch.Tensor, kv_pos: torch.Tensor, head_group: torch.Tensor | None = None) -> torch.Tensor:
        return kv_pos >= self.window_start(q_pos)

    def key_intervals(self, q_lo: torch.Tensor, q_hi: torch.Tensor, head_group: int = 0) -> list[Interval]:
        return [(self.window_start(q_lo), q_hi + 1)]

    def describe(self) -> str:
        unit = "tokens" if self.chunk == 1 else f"chunks of {self.chunk}"
        return f"raw window of {self.chunks} {unit}"


@dataclass(frozen=True)
class Geometry:
    """Where compressed entries sit and who sees them.

    `size` tokens per entry window, one window every `stride` positions (stride < size: overlapping, as
    CSA); the raw branch is the last `window` chunks of `chunk` tokens; `disjoint` shows a query only the
    entries wholly older than its raw window (KSA; needs size == stride == chunk so nothing is skipped).
    """

    size: int
    stride: int
    window: int
    chunk: int = 1
    disjoint: bool = False

    def __post_init__(self) -> None:
        for name in ("size", "stride", "window", "chunk"):
            if getattr(self, name) < 1:
                raise ParamError(f"compressed attention: {name}={getattr(self, name)} must be an integer >= 1")
        if self.stride > self.size:
            raise ParamError(
                f"compressed attention: stride={self.stride} exceeds size={self.size}; valid: 1 <= stride <= size "
                "(a larger stride would leave tokens no entry covers)"
            )
        if self.disjoint and not self.size == self.stride == self.chunk:
            raise ParamError(
                f"compressed attention: disjoint entries need size == stride == chunk, got size={self.size}, "
                f"stride={self.stride}, chunk={self.chunk}"
            )

    def raw_pattern(self, block_size: int) -> ChunkWindowPattern:
        return ChunkWindowPattern(self.window, self.chunk, block_size)

    def raw_tokens(self) -> int:
        """Raw tokens a cache keeps: the window, plus the open (not yet complete) entry window behind it."""
        return self.window * self.chunk + (self.size - 1 if not self.disjoint else 0)

    def entries_at(self, length: int) -> int:
        """Complete entries of a sequence of `length` tokens (what a cache keeps in compressed form)."""
        return 0 if length < self.size else (length - self.size) // self.stride + 1

    def complete(self, length: torch.Tensor) -> torch.Tensor:
        """`entries_at` per row: complete entries of sequences of `length` (a long tensor) tokens."""
        return ((length - self.size).div(self.stride, rounding_mode="floor") + 1).clamp(min=0)

    def pending_start(self, q_pos: torch.Tensor) -> torch.Tensor:
        """First position of the first entry still incomplete when the token at `q_pos` arrives: its raw
        tokens must be kept until that entry is pooled."""
        return self.complete(q_pos) * self.stride


class RawRetention(Pattern):
    """The raw keys a cache must still hold for the queries at or after a position: the raw window and the
    tokens of every entry window not yet complete (pooled once its last token arrives), whichever starts
    first. A cache's retention rule, not an attention pattern (`kv.needs.blocks_needed` reads it)."""

    def __init__(self, geometry: Geometry, block_size: int):
        self.geometry, self.block_size = geometry, block_size
        self.raw = geometry.raw_pattern(block_size)

    def start(self, q_pos: torch.Tensor) -> torch.Tensor:
        return torch.minimum(self.raw.window_start(q_pos), self.geometry.pending_start(q_pos))

    def allows(self, q_pos: torch.Tensor, kv_pos: torch.Tensor, head_group: torch.Tensor | None = None) -> torch.Tensor:
        return kv_pos >= self.start(q_pos)

    def key_intervals(self, q_lo: torch.Tensor, q_hi: torch.Tensor, head_group: int = 0) -> list[Interval]:
        return [(self.start(q_lo), q_hi + 1)]

    def describe(self) -> str:
        return f"{self.raw.describe()} + open entry windows"


@dataclass
class Entries:
    """The compressed entries of one attention call, per row: (B, Nc) each, invalid slots padded.

    `slots` index the call's key tensor (first token of each window), `start` is the window's first
    position; `valid` is False for padding slots of rows with fewer entries.
    """

    slots: torch.Tensor
    start: torch.Tensor
    valid: torch.Tensor
    size: int

    @property
    def count(self) -> int:
        return self.slots.shape[1]

    @property
    def end(self) -> torch.Tensor:
        """Last position of each window."""
        return self.start + self.size - 1


def find_entries(kv_pos: torch.Tensor, size: int, stride: int) -> Entries:
    """The complete windows among keys at positions `kv_pos` (B, Lkv): those starting at a position that is a
    multiple of `stride` and running `size` consecutive positions inside the keys at hand."""
    b, length = kv_pos.shape
    slot = torch.arange(length, device=kv_pos.device)
    last = (slot + size - 1).clamp(max=length - 1).expand(b, -1)
    complete = (slot + size - 1 < length) & (kv_pos.gather(1, last) == kv_pos + size - 1)
    candidate = (kv_pos >= 0) & (kv_pos % stride == 0) & complete
    count = int(candidate.sum(-1).max()) if length else 0
    order = torch.where(candidate, slot, length).sort(-1).values[:, :count]
    valid = order < length
    slots = order.clamp(max=max(length - 1, 0))
    start = torch.where(valid, kv_pos.gather(1, slots), 0) if count else slots
    return Entries(slots, start, valid, size)


def entry_visibility(q_pos: torch.Tensor, entries: Entries, geometry: Geometry) -> torch.Tensor:
    """(B, Lq, Nc): entries whose window is complete at or before each query (`disjoint`: and wholly older
    than its raw window). The model's own mask is ANDed by the caller."""
    end, q = entries.end[:, None, :], q_pos[:, :, None]
    ok = entries.valid[:, None, :] & (end <= q)
    if geometry.disjoint:
        ok &= end < geometry.raw_pattern(1).window_start(q)
    return ok


class Compressor(nn.Module):
    """Learned pooling of one layer's K/V windows into compressed entries: weights softmax(k . w + B).

    `score` w (Hkv, D) and `bias` B (Hkv, size) start at zero, so entries start as window means (see the
    module docstring). The same weights pool keys and values, per KV head.
    """

    def __init__(self, kv_heads: int, head_dim: int, size: int, dtype: torch.dtype):
        super().__init__()
        self.size = size
        self.score = nn.Parameter(torch.zeros(kv_heads, head_dim, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(kv_heads, size, dtype=dtype))

    def forward(self, key: torch.Tensor, value: torch.Tensor, entries: Entries) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed keys and values (B, Hkv, Nc, D) of key/value (B, Hkv, Lkv, D)."""
        b, _, length, _ = key.shape
        slots = (entries.slots[:, :, None] + torch.arange(self.size, device=key.device)).clamp(max=length - 1)
        rows = torch.arange(b, device=key.device)[:, None, None]
        k_win = key.transpose(1, 2)[rows, slots]  # (B, Nc, size, Hkv, D)
        v_win = value.transpose(1, 2)[rows, slots]
        logits = torch.einsum("bnmhd,hd->bhnm", k_win, self.score.to(key.dtype)) + self.bias.to(key.dtype)[:, None]
        weights = torch.softmax(logits.float(), dim=-1).to(key.dtype)
        return torch.einsum("bhnm,bnmhd->bhnd", weights, k_win), torch.einsum("bhnm,bnmhd->bhnd", weights, v_win)

    def extra_repr(self) -> str:
        return f"kv_heads={self.score.shape[0]}, size={self.size}"


@dataclass(frozen=True)
class Pooling:
    """How a KV cache pools a compressed layer's entries itself (`LayerAccess.compress`): where they sit
    (`geometry`), the layer's `compressor`, and `index`, turning pooled keys (B, Hkv, Nc, D) into the
    indexer keys (B, Nc, d) of a layer that selects entries (CSA), or None."""

    geometry: Geometry
    compressor: Compressor
    index: Callable[[torch.Tensor], torch.Tensor] | None = None

    def retention(self, block_size: int) -> RawRetention:
        return RawRetention(self.geometry, block_size)


@dataclass
class CachedEntries:
    """The entries a KV cache hands a compressed layer (`CompactKV.entries`): `entries` (slots in the full
    sequence, start positions, validity per row), pooled `keys`/`values` (B, Hkv, Nc, D) and, for a
    selecting layer, their `index_keys` (B, Nc, d)."""

    entries: Entries
    keys: torch.Tensor
    values: torch.Tensor
    index_keys: torch.Tensor | None = None
