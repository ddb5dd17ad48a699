"""Which cache blocks a layer's attention pattern reads: the contract between patterns and KV tiers.

A `Pattern`'s `key_intervals(q_lo, q_hi)` covers every key a query in [q_lo, q_hi] may see (positions,
over-covering allowed). The cache stores keys by *slot* (index in its sequence dimension); in a
left-padded batch slot = position + shift, one shift per row. `blocks_needed` turns the intervals into
the cache blocks to fetch, so:

- a decode step reads only the blocks its queries need (`blocks_needed(pattern, q_lo, q_hi, ...)`);
- a layer drops for good the blocks no future query needs: future queries have positions >= the next
  one, so `blocks_needed(pattern, next_pos, FUTURE, ...)` is everything worth keeping (a sliding window
  keeps its window and sinks; a dense pattern keeps everything).

Correctness rests on the pattern's own coverage contract, which the conformance kit checks per plugin.
"""

from __future__ import annotations

import torch

from ..attention.pattern import Pattern

FUTURE = 2**40
"""A query position beyond any real context: `q_hi` for "every query from now on"."""


def blocks_needed(
    pattern: Pattern, q_lo: torch.Tensor, q_hi: torch.Tensor, shift: torch.Tensor, block_size: int, num_blocks: int
) -> list[int]:
    """Sorted indices (< `num_blocks`) of the blocks holding a key that queries at positions [q_lo, q_hi] may see.

    `q_lo`, `q_hi`, `shift` are (B,) long tensors, one per batch row; a key at position p of row r sits at
    slot p + shift[r]. The union over rows and head groups is returned (a block holds every row).
    """
    q_lo, q_hi, shift = (t.detach().to("cpu", torch.long) for t in (q_lo, q_hi, shift))
    limit = num_blocks * block_size
    edges = torch.zeros(num_blocks + 1, dtype=torch.long)
    for group in range(pattern.head_groups):
        for lo, hi in pattern.key_intervals(q_lo, q_hi, group):
            lo_slot = (lo.long() + shift).clamp(0, limit)
            hi_slot = (hi.long() + shift).clamp(0, limit)
            keep = hi_slot > lo_slot
            edges.scatter_add_(0, lo_slot[keep] // block_size, torch.ones_like(lo_slot[keep]))
            edges.scatter_add_(0, (hi_slot[keep] + block_size - 1) // block_size, -torch.ones_like(hi_slot[keep]))
    return (edges.cumsum(0)[:num_blocks] > 0).nonzero().flatten().tolist()
