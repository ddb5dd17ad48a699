"""Token positions, computed in one place.

Every part of lcplug that needs "the position of this token" asks this module, so that packing,
context-parallel sharding, attention patterns and position remapping (SelfExtend) agree:

- `packed_position_ids`: a packed row holds several documents; each restarts at position 0 (what
  transformers' own mask code reads to keep documents apart).
- `shard_indices` / `shard_positions`: a context-parallel rank holds a slice of a row (contiguous, or
  zigzag chunks for a balanced causal load) and keeps the row's *global* position ids for it.
- `pattern_positions`: inside one attention call, the positions of the queries and keys as patterns
  see them, from what transformers passes (the lazy mask's offsets and padding, the position ids);
  `rope_positions`: the same, aligned with the positions the model's RoPE actually rotated by.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from .attention.mask import LazyMask

ShardLayout = Literal["contiguous", "zigzag"]
SHARD_LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")


def packed_position_ids(
    doc_lengths: Sequence[int] | torch.Tensor | None = None,
    *,
    cu_seqlens: Sequence[int] | torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Position ids (1-D, long) of one packed row: 0, 1, ... restarting at each document.

    Give the documents' lengths, or their cumulative boundaries `cu_seqlens` = [0, l1, l1+l2, ...]
    (the flash-attention varlen form). Empty documents are allowed and take no slot.
    """
    if (doc_lengths is None) == (cu_seqlens is None):
        raise ValueError("packed_position_ids needs exactly one of doc_lengths or cu_seqlens")
    if cu_seqlens is not None:
        bounds = torch.as_tensor(cu_seqlens, dtype=torch.long, device=device)
        if bounds.dim() != 1 or bounds.numel() < 1 or int(bounds[0]) != 0:
            raise ValueError(f"cu_seqlens must be 1-D and start at 0, got {bounds.tolist()}")
        lengths = bounds.diff()
    else:
        lengths = torch.as_tensor(doc_lengths, dtype=torch.long, device=device).reshape(-1)
    if bool((lengths < 0).any()):
        raise ValueError(f"document lengths must be >= 0 (cu_seqlens non-decreasing), got {lengths.tolist()}")
    starts = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    return torch.arange(total, device=lengths.device) - torch.repeat_interleave(starts, lengths)


def shard_indices(
    seq_len: int, rank: int, world: int, layout: ShardLayout = "contiguous", device: torch.device | str | None = None
) -> torch.Tensor:
    """Indices (1-D, long, ascending) of the tokens that context-parallel `rank` of `world` holds.

    - contiguous: `world` equal chunks, rank r holds chunk r.
    - zigzag: 2 * `world` equal chunks, rank r holds chunks r and 2*world-1-r, so every rank gets the
      same share of causal attention work (one early chunk, one late one).
    Inputs, labels and position ids are all sharded with these indices, so they stay aligned.
    """
    if layout not in SHARD_LAYOUTS:
        raise ValueError(f"unknown shard layout {layout!r}; valid: {', '.join(SHARD_LAYOUTS)}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, world={world})")
    chunks = world if layout == "contiguous" else 2 * world
    if seq_len % chunks:
        raise ValueError(
            f"a {layout} shard over {world} ranks needs a length divisible by {chunks}, got {seq_len}; pad the row"
        )
    size = seq_len // chunks
    held = [rank] if layout == "contiguous" else [rank, chunks - 1 - rank]
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device) for c in held])


def shard_positions(
    position_ids: torch.Tensor, rank: int, world: int, layout: ShardLayout = "contiguous"
) -> torch.Tensor:
    """The global position ids (..., L / world) of the tokens `rank` holds: a shard never restarts at 0.

    `position_ids` (..., L) are the whole row's ids, packed documents included (`packed_position_ids`).
    """
    idx = shard_indices(position_ids.shape[-1], rank, world, layout, device=position_ids.device)
    return position_ids.index_select(-1, idx)


def pattern_positions(
    mask: LazyMask, position_ids: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, Lq) of the queries and (B, Lkv) of the keys of one attention call.

    Patterns speak of positions inside a sequence, not of slots in a padded batch or a cache: 0 at the
    first real token of each sequence (left padding shifts them) and restarting at each document of a
    packed row, so prefill, decode, left-padded batches and packed rows all see the same pattern.
    - Without a cache and without padding, with position ids: both are the position ids (this covers
      packed documents, whose ids restart).
    - Otherwise slots are shifted so that each row's first real (non-padding) key is position 0: the same
      answer for a left-padded prefill, for its decode steps, and whether or not the caller passed ids.
    """
    own = getattr(mask, "positions", None)
    if own is not None:  # a context-parallel shard's mask knows its tokens' global positions (lcplug.cp.shard)
        return own(device)
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


def rope_positions(
    mask: Any, position_ids: torch.Tensor | None, q_length: int, kv_length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions (B, Lq) and (B, Lkv) the model's RoPE rotated this call's queries and keys by.

    A plugin that re-rotates post-RoPE queries and keys (SelfExtend) needs these exactly. They are
    `pattern_positions`, shifted per row so that the last query sits at the position id the model gave
    it: equal to the pattern positions when the caller passes position ids as `generate` does, and still
    exact for a left-padded batch run without position ids (the model then counts pads too). Keys are
    assumed to follow their queries one position per slot, which holds for every cache but a packed one.
    A mask that is not a `LazyMask` (a hand-made 4-D mask) gives slot positions, keys right-aligned.
    """
    from .attention.mask import LazyMask

    if isinstance(mask, LazyMask):
        q_pos, kv_pos = pattern_positions(mask, position_ids, device)
    else:
        kv_pos = torch.arange(kv_length, device=device)[None]
        q_pos = kv_pos[:, kv_length - q_length :]
    if position_ids is not None and position_ids.shape[-1] == q_length:
        shift = position_ids.to(device).long()[:, -1:] - q_pos[:, -1:]
        q_pos, kv_pos = q_pos + shift, kv_pos + shift
    return q_pos, kv_pos
