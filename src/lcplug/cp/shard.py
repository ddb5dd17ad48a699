"""Sequence sharding across a cp group, and the *global* mask every cp rank attends with.

A rank holds a few contiguous spans of each row (one for the contiguous layout, two for zigzag), in the
order `lcplug.positions.shard_indices` gives them. transformers builds its masks from the local tokens,
which is wrong on a cp rank (it would see the zigzag jump as a new document, and nothing of the other
ranks' tokens); so per forward pass the ranks agree on shapes (a handshake), all-gather the position
ids, and every layer builds its masks from global token indices, global position ids and the document
boundaries they imply (a document starts wherever the position id does not follow its predecessor: the
rule transformers itself uses for packed rows). `ShardMask` presents one (query span, key span) pair in
the form the block-layout builders take, so every pattern runs through the core's own layout code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..attention.mask import LazyMask
from ..positions import SHARD_LAYOUTS, ShardLayout, shard_indices
from .comm import Comm
from .errors import CPConfigError, CPShapeError

CACHE_PAIRS = 1 << 24
"""(query, key) pairs whose masks and layouts one forward pass keeps (16 MiB of token masks per pattern)."""


@dataclass(frozen=True)
class Span:
    """Global token indices [start, start + length) of one contiguous piece of a row."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


def check_seq_len(seq_len: int, degree: int, layout: ShardLayout) -> None:
    """A row of `seq_len` tokens must split into equal chunks: `degree` (contiguous) or 2 * degree (zigzag)."""
    if layout not in SHARD_LAYOUTS:
        raise CPConfigError(f"cp layout {layout!r} is unknown; valid: {', '.join(SHARD_LAYOUTS)}")
    chunks = degree if layout == "contiguous" else 2 * degree
    if seq_len % chunks:
        below, above = max(chunks, seq_len // chunks * chunks), (seq_len // chunks + 1) * chunks
        raise CPConfigError(
            f"sequence length {seq_len} does not split over cp degree {degree} with the {layout} layout; valid: a "
            f"multiple of {chunks} (e.g. {below} or {above})"
        )


def rank_spans(seq_len: int, rank: int, degree: int, layout: ShardLayout) -> list[Span]:
    """The spans cp `rank` holds, in the order its local tokens are laid out."""
    check_seq_len(seq_len, degree, layout)
    idx = shard_indices(seq_len, rank, degree, layout).tolist()
    spans, start = [], 0
    for i in range(1, len(idx) + 1):
        if i == len(idx) or idx[i] != idx[i - 1] + 1:
            spans.append(Span(idx[start], i - start))
            start = i
    return spans


def coalesce(spans: list[Span]) -> list[Span]:
    """Adjacent spans joined (tokens laid out in this order stay where they are)."""
    out: list[Span] = []
    for span in spans:
        if out and out[-1].end == span.start:
            out[-1] = Span(out[-1].start, out[-1].length + span.length)
        else:
            out.append(span)
    return out


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """(B, L) document index of each token: a new one wherever a position id does not follow the previous."""
    starts = torch.ones_like(positions, dtype=torch.long)
    starts[:, 1:] = (positions[:, 1:] != positions[:, :-1] + 1).long()
    return starts.cumsum(-1)


class ShardContext:
    """What every layer of one forward pass shares on a cp rank: the spans, global positions and documents."""

    def __init__(self, comm: Comm, layout: ShardLayout, positions: torch.Tensor):
        self.comm, self.layout = comm, layout
        self.positions = positions  # (B, L) global position ids
        self.docs = document_ids(positions)
        self.batch, self.seq_len = positions.shape
        self._spans = [rank_spans(self.seq_len, r, comm.size, layout) for r in range(comm.size)]
        self._masks: dict[tuple, ShardMask] = {}
        self._cached_pairs = 0
        self.cache: dict[Any, Any] = {}  # per forward pass, shared by layers (e.g. ring steps per pattern)

    @classmethod
    def gather(cls, comm: Comm, layout: ShardLayout, local_positions: torch.Tensor, shapes: list[int]) -> ShardContext:
        """Shape handshake, then the global position ids from every rank's local ones."""
        sig = torch.tensor(shapes, dtype=torch.long, device=local_positions.device)
        seen = torch.stack(comm.all_gather(sig))
        if bool((seen != sig).any()):
            table = "; ".join(f"rank {comm.ranks[r]}: {tuple(seen[r].tolist())}" for r in range(comm.size))
            raise CPShapeError(
                f"cp ranks disagree on this step's (batch, local length, heads, kv heads, head dim): {table}; "
                "every rank of a cp group must get its shard of the same batch (lcplug.cp.shard_batch)"
            )
        local_len = local_positions.shape[-1]
        seq_len = local_len * comm.size
        parts = comm.all_gather(local_positions.long())
        positions = torch.empty(local_positions.shape[0], seq_len, dtype=torch.long, device=local_positions.device)
        for r, part in enumerate(parts):
            offset = 0
            for span in rank_spans(seq_len, r, comm.size, layout):
                positions[:, span.start : span.end] = part[:, offset : offset + span.length]
                offset += span.length
        return cls(comm, layout, positions)

    def spans(self, cp_rank: int) -> list[Span]:
        return self._spans[cp_rank]

    def mask(self, q: Span, kv: Span, window: int | None = None) -> ShardMask:
        """The mask of queries `q` over keys `kv`: causal, same document, the model's own window.

        Masks, and the layouts built on them, are cached for the forward pass's other layers and its
        backward until they cover CACHE_PAIRS (query, key) pairs; past that they are built per use and
        dropped, so a long row costs layout rebuilds, not memory that grows with its square.
        """
        key = (q, kv, window)
        if key in self._masks:
            return self._masks[key]
        mask = ShardMask(self, q, kv, window)
        if self._cached_pairs + q.length * kv.length <= CACHE_PAIRS:
            self._masks[key] = mask
            self._cached_pairs += q.length * kv.length
        return mask


class ShardMask(LazyMask):
    """A `LazyMask` for one (query span, key span) pair in global index space (not built by transformers).

    Offsets are the spans' global starts, `allowed` evaluates causality, document separation and the
    model's own sliding window on global indices, and `positions` gives global position ids (which
    `lcplug.positions.pattern_positions` defers to), so `static_layout`, `layout_from_blocks` and a
    dynamic layer's own selection code all run unchanged on a shard.
    """

    def __init__(self, ctx: ShardContext, q: Span, kv: Span, window: int | None):
        # LazyMask.__init__ reads transformers' mask arguments, which a shard mask has none of
        self.ctx, self.window = ctx, window
        self.batch_size, self.q_length, self.kv_length = ctx.batch, q.length, kv.length
        self.q_offset, self.kv_offset = q.start, kv.start
        self.device = ctx.positions.device
        self.padding_mask = None
        self.cache: dict[Any, Any] = {}

    def native(self, impl: str) -> Any:
        raise NotImplementedError("a cp shard's mask has no native form: cp layers run lcplug's executors")

    def dense(self) -> torch.Tensor:
        q = torch.arange(self.q_length, device=self.device).view(1, 1, -1, 1) + self.q_offset
        kv = torch.arange(self.kv_length, device=self.device).view(1, 1, 1, -1) + self.kv_offset
        return self.allowed(q, kv)

    def positions(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.ctx.positions.to(device)
        q0, k0 = self.q_offset, self.kv_offset
        return pos[:, q0 : q0 + self.q_length], pos[:, k0 : k0 + self.kv_length]

    def allowed(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        docs = self.ctx.docs.to(q_idx.device)
        b = torch.arange(self.batch_size, device=q_idx.device).view(-1, *([1] * (q_idx.dim() - 1)))
        ok = (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])
        if self.window is not None:
            ok = ok & ((q_idx - kv_idx) < self.window)
        return ok
