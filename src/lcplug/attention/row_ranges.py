"""A layout's pairs as at most two key ranges per query row, when they have that shape.

Causal sliding windows with sink tokens, streaming sink + local blocks, and either of them cut at packed
document or padding boundaries keep, in every query row, a range of sink keys and a range of recent keys.
A kernel that bounds each row's keys by those four numbers (`range_kernel`) then computes no masked pair
beyond its tile's edges and reads no mask. Finding them takes one pass over the kept pairs
(chunked, O(N * kept keys), never N x N) and is exact: a layout whose rows have any other shape, whose
rule depends on the head group, or whose block lists are not sorted gets None.
"""

from __future__ import annotations

import torch

Ranges = torch.Tensor
"""(B, NQ * BQ, 4) int64 (a0, a1, b0, b1): row r reads keys [a0, a1) and [b0, b1), a1 < b0 or a0 = a1 = 0."""

CHUNK_PAIRS = 1 << 25
"""Kept pairs examined at once (the scan's boolean temporaries stay near 32 MiB each)."""


def row_ranges(kv_blocks: torch.Tensor, mask: torch.Tensor, block_k: int) -> Ranges | None:
    """The ranges of a layout's `kv_blocks` (B, G, NQ, K) and `mask` (B, G, NQ, K, BQ, BK), or None."""
    b, g, nq, k = kv_blocks.shape
    if g != 1 or not _sorted(kv_blocks):
        return None
    bq = mask.shape[-2]
    step = max(1, CHUNK_PAIRS // max(1, b * k * bq * block_k))
    parts = [_chunk(kv_blocks[:, 0, c0 : c0 + step], mask[:, 0, c0 : c0 + step], block_k) for c0 in range(0, nq, step)]
    if any(p is None for p in parts):
        return None
    return torch.cat(parts, dim=1).reshape(b, nq * bq, 4)


def _sorted(kv_blocks: torch.Tensor) -> bool:
    """Used slots ascending, unused (-1) after them: keys then run in ascending order along the slots."""
    used = kv_blocks >= 0
    ascending = (kv_blocks[..., 1:] > kv_blocks[..., :-1]) | ~used[..., 1:]
    return bool((ascending & (used[..., :-1] | ~used[..., 1:])).all())


def _chunk(blocks: torch.Tensor, mask: torch.Tensor, bk: int) -> Ranges | None:
    """blocks (B, n, K), mask (B, n, K, BQ, BK) -> ranges (B, n, BQ, 4), or None if a row has another shape.

    Runs of allowed keys are counted inside each (row, kept block) with boolean passes over the pairs, then
    joined across consecutive slots whose keys touch (slots ascend, so an empty slot always separates).
    """
    starts = mask.clone()
    starts[..., 1:] &= ~mask[..., :-1]  # the first key of each run inside a block
    inner = _count_true(starts)  # (B, n, K, BQ) runs per (slot, row)
    count = _count_true(mask)
    nonempty = count > 0
    base = blocks.clamp(min=0)[..., None] * bk  # (B, n, K, 1)
    first = base + mask.byte().argmax(-1)
    last = base + (bk - 1) - mask.flip(-1).byte().argmax(-1)
    last_start = base + (bk - 1) - starts.flip(-1).byte().argmax(-1)
    joins = torch.zeros_like(nonempty)
    joins[:, :, 1:] = nonempty[:, :, 1:] & nonempty[:, :, :-1] & (last[:, :, :-1] + 1 == first[:, :, 1:])
    runs = inner.sum(2) - joins.sum(2)  # (B, n, BQ)
    if bool((runs > 2).any()):
        return None
    big = torch.iinfo(first.dtype).max
    row_first = torch.where(nonempty, first, big).amin(2)
    row_last = torch.where(nonempty, last, -1).amax(2)
    opens = nonempty & ((inner > 1) | ~joins)  # slots whose last run starts inside them
    second = torch.where(opens, last_start, -1).amax(2)  # the start of the row's last run
    total = count.sum(2)
    two, empty = runs == 2, runs == 0
    zero = torch.zeros_like(row_first)
    a0 = torch.where(two, row_first, zero)
    a1 = torch.where(two, row_first + total - (row_last + 1 - second), zero)
    b0 = torch.where(empty, zero, torch.where(two, second, row_first))
    b1 = torch.where(empty, zero, row_last + 1)
    return torch.stack([a0, a1, b0, b1], dim=-1)


BYTES = 0x0101010101010101


def _count_true(x: torch.Tensor) -> torch.Tensor:
    """`x.sum(-1)` of a boolean x whose last dim is 8..64 (a key block), on int64 words (a bool sum widens
    every element first): bools are bytes, so summing x's words adds 8 columns at once byte-wise, and
    multiplying by 0x0101.. sums a word's bytes into its top byte. No byte carries and the top byte stays
    below 128: each sum is at most 64."""
    n = x.shape[-1]
    if n % 8 or n > 64 or x.stride(-1) != 1:
        return x.sum(-1)
    words = x.view(torch.int64).sum(-1)
    return (words * BYTES) >> 56
