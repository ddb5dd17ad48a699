"""The one attention computation every strategy shares: queries of some spans over keys of some spans.

`span_forward` runs the core's split block executor (`partial_attention`) for each (query span, key span)
pair the rule keeps and returns each query's output normalised over those keys plus its log-sum-exp,
without autograd; `span_backward` gives the gradients of that share from the *final* output and
log-sum-exp (`partial_attention_backward`). A strategy's key sets (`lcplug.attention.merge.KeySets`: the
ring's shards, or the all-gathered row) call them, and `key_set_attention` ties them into one autograd
node (`merged_attention`): it merges the sets exactly, adds the layer's sink logits last, and keeps only
the queries, the rank's own K/V, the output and the log-sum-exp, so that a ring keeps no received shard:
its backward brings them in again. Queries that see no key at all give zeros with finite gradients.
"""

from __future__ import annotations

import torch

from ..attention.block_torch import partial_attention, partial_attention_backward
from ..attention.merge import KeySets, merge_partials, merged_attention
from .rules import Rule
from .shard import ShardContext, Span

PIECE_KEYS = 1 << 14
"""Key tokens per piece: a (query span, key span) pair longer than this is computed piece by piece."""
PIECE_PAIRS = 1 << 22
"""(query, key) token pairs per piece (a 4 MiB token mask, about 40 MiB while it is built): what one layout
holds at any sequence length."""
ALIGN = 128
"""Query pieces start on multiples of this many tokens (a multiple of every pattern's block size)."""


def pieces(q_spans: list[Span], kv_spans: list[Span]) -> tuple[list[tuple[Span, int]], list[tuple[Span, int]]]:
    """The spans cut into pieces of at most PIECE_PAIRS pairs, each with its offset in the local layout.

    A layout's token mask is O(queries x keys): for a ring step at N/P tokens that is fine, but Ulysses and
    all-gather attend over the whole row, and at 1M tokens one mask of the whole row would not fit any
    memory. Pieces bound it; `ShardContext.mask` decides which pieces' layouts stay cached.
    """
    kv_size = min(max(s.length for s in kv_spans), PIECE_KEYS)
    q_size = max(ALIGN, PIECE_PAIRS // kv_size // ALIGN * ALIGN)
    return _cut(q_spans, q_size), _cut(kv_spans, kv_size)


def _cut(spans: list[Span], size: int) -> list[tuple[Span, int]]:
    out, offset = [], 0
    for span in spans:
        for start in range(0, span.length, size):
            out.append((Span(span.start + start, min(size, span.length - start)), offset + start))
        offset += span.length
    return out


def _grid(ctx: ShardContext, rule: Rule, q_spans: list[Span], kv_spans: list[Span]):
    """(query piece, its rows, [(layout, key columns) of every key piece it attends to])."""
    q_pieces, kv_pieces = pieces(q_spans, kv_spans)
    for qp, q0 in q_pieces:
        reads = []
        for kp, k0 in kv_pieces:
            layout = rule.layout(ctx, qp, kp)
            if layout is not None:
                reads.append((layout, slice(k0, k0 + kp.length)))
        yield slice(q0, q0 + qp.length), reads


def span_forward(
    ctx: ShardContext, rule: Rule, query, q_spans: list[Span], key, value, kv_spans: list[Span], scaling, softcap
):
    """Queries laid out as `q_spans` over keys laid out as `kv_spans`: merged (out, lse) in query order."""
    outs, lses = [], []
    for rows, reads in _grid(ctx, rule, q_spans, kv_spans):
        q = query[:, :, rows]
        parts = [
            partial_attention(q, key[:, :, cols], value[:, :, cols], layout, scaling, softcap) for layout, cols in reads
        ]
        out, lse = merge_partials(parts, q)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def span_backward(
    ctx: ShardContext, rule: Rule, query, q_spans, key, value, kv_spans, scaling, softcap, grad_out, out, total
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the share `span_forward` computed, given the final output, its gradient and the final
    log-sum-exp `total` of these queries (B, H, Lq)."""
    dq = torch.zeros_like(query)
    dk, dv = torch.zeros_like(key), torch.zeros_like(value)
    for rows, reads in _grid(ctx, rule, q_spans, kv_spans):
        for layout, cols in reads:
            gq, gk, gv = partial_attention_backward(
                query[:, :, rows], key[:, :, cols], value[:, :, cols], layout, scaling, softcap,
                grad_out[:, :, rows], out[:, :, rows], total[:, :, rows],
            )  # fmt: skip
            dq[:, :, rows] += gq
            dk[:, :, cols] += gk
            dv[:, :, cols] += gv
    return dq, dk, dv


def needs(ctx: ShardContext, rule: Rule, q_spans: list[Span], kv_spans: list[Span]) -> bool:
    """Whether any of these queries may attend to any of these keys (piece by piece, stopping at the first)."""
    q_pieces, kv_pieces = pieces(q_spans, kv_spans)
    return any(rule.layout(ctx, qp, kp) is not None for qp, _ in q_pieces for kp, _ in kv_pieces)


def key_set_attention(query, key, value, sink, sets: KeySets) -> torch.Tensor:
    """(B, L, H, D) output of this rank's queries over every key set `sets` brings in from this rank's
    (key, value), with per-head sink logits `sink` (H,) of these query heads, or None."""
    return merged_attention(query, sets, (key, value), sink).transpose(1, 2).contiguous()
