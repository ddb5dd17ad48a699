"""Token positions as attention patterns see them.

A pattern (window, sinks, streaming blocks) speaks of positions inside a sequence, not of slots in a
padded batch or a cache. These are the model's position ids: 0 at the first real token of each
sequence (left padding shifts them) and restarting at each document of a packed row. This module turns
what the attention call knows into per-token positions for queries and keys, so prefill, decode,
left-padded batches and packed rows all see the same pattern.
"""

from __future__ import annotations

import torch

from .mask import LazyMask


def pattern_positions(
    mask: LazyMask, position_ids: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, Lq) of the queries and (B, Lkv) of the keys.

    - Without a cache and without padding, with position ids: both are the position ids (this covers
      packed documents, whose ids restart).
    - Otherwise slots are shifted so that each row's first real (non-padding) key is position 0: the same
      answer for a left-padded prefill, for its decode steps, and whether or not the caller passed ids.
    """
    b, lq, lkv = mask.batch_size, mask.q_length, mask.kv_length
    q_slots = torch.arange(lq, device=device) + mask.q_offset
    kv_slots = torch.arange(lkv, device=device) + mask.kv_offset
    pad = mask.padding()
    no_cache = lq == lkv and mask.q_offset == mask.kv_offset == 0
    if position_ids is not None and no_cache and pad is None:
        pos = position_ids.to(device).expand(b, -1).long()
        return pos, pos
    if pad is not None:
        # first real token of each row; rows with no real token get 0
        start = torch.where(pad.any(-1), pad.float().argmax(-1), torch.zeros(b, dtype=torch.long, device=pad.device))
        start = start.to(device).long()[:, None]
    else:
        start = torch.zeros(b, 1, dtype=torch.long, device=device)
    return q_slots[None, :] - start, kv_slots[None, :] - start
