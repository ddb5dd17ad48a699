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

from collections.abc import Iterator

import torch

from ..attention.block_torch import partial_attention, partial_attention_backward
from ..attention.merge import KeySets, merge_partials, merged_attention
from .rules import Rule
from .shard import ShardContext, Span

KV = tuple[torch.Tensor, torch.Tensor]


def span_forward(
    ctx: ShardContext, rule: Rule, query, q_spans: list[Span], key, value, kv_spans: list[Span], scaling, softcap
):
    """Queries laid out as `q_spans` over keys laid out as `kv_spans`: merged (out, lse) in query order."""
    outs, lses = [], []
    for qs, q in _slices(query, q_spans):
        parts = [
            partial_attention(q, k, v, layout, scaling, softcap)
            for layout, k, v in _layouts(ctx, rule, qs, key, value, kv_spans)
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
    q0 = 0
    for qs, q in _slices(query, q_spans):
        rows = slice(q0, q0 + qs.length)
        k0 = 0
        for ks in kv_spans:
            layout = rule.layout(ctx, qs, ks)
            if layout is not None:
                cols = slice(k0, k0 + ks.length)
                gq, gk, gv = partial_attention_backward(
                    q, key[:, :, cols], value[:, :, cols], layout, scaling, softcap,
                    grad_out[:, :, rows], out[:, :, rows], total[:, :, rows],
                )  # fmt: skip
                dq[:, :, rows] += gq
                dk[:, :, cols] += gk
                dv[:, :, cols] += gv
            k0 += ks.length
        q0 += qs.length
    return dq, dk, dv


def _slices(query: torch.Tensor, spans: list[Span]) -> Iterator[tuple[Span, torch.Tensor]]:
    q0 = 0
    for span in spans:
        yield span, query[:, :, q0 : q0 + span.length]
        q0 += span.length


def _layouts(ctx: ShardContext, rule: Rule, qs: Span, key, value, kv_spans: list[Span]):
    k0 = 0
    for ks in kv_spans:
        layout = rule.layout(ctx, qs, ks)
        if layout is not None:
            yield layout, key[:, :, k0 : k0 + ks.length], value[:, :, k0 : k0 + ks.length]
        k0 += ks.length


def needs(ctx: ShardContext, rule: Rule, q_spans: list[Span], kv_spans: list[Span]) -> bool:
    """Whether any of these queries may attend to any of these keys."""
    return any(rule.layout(ctx, qs, ks) is not None for qs in q_spans for ks in kv_spans)


def key_set_attention(query, key, value, sink, sets: KeySets) -> torch.Tensor:
    """(B, L, H, D) output of this rank's queries over every key set `sets` brings in from this rank's
    (key, value), with per-head sink logits `sink` (H,) of these query heads, or None."""
    return merged_attention(query, sets, (key, value), sink).transpose(1, 2).contiguous()
