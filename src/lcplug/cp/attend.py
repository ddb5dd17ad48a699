"""The one attention computation every strategy shares: queries of some spans over keys of some spans.

`span_attention` runs the core's block executor for each (query span, key span) pair the rule keeps and
returns each query's output normalised over those keys plus its log-sum-exp; `merge_partials` combines such
partial results exactly (`lcplug.attention.merge`), whichever rank or ring step produced them, and
`finish` adds the layer's sink logits last (an extra softmax term with no value). Queries that see no
key at all give zeros with finite gradients, never NaN.
"""

from __future__ import annotations

import torch

from ..attention.block_torch import block_attention
from ..attention.merge import merge_partials
from .rules import Rule
from .shard import ShardContext, Span


def finish(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H, D), with per-head sink logits (H,) taking their softmax share."""
    if sink is not None:
        out = out * torch.sigmoid(lse - sink.float().view(1, -1, 1)).to(out.dtype)[..., None]
    return out.transpose(1, 2).contiguous()


def span_attention(
    ctx: ShardContext,
    rule: Rule,
    query: torch.Tensor,
    q_spans: list[Span],
    key: torch.Tensor,
    value: torch.Tensor,
    kv_spans: list[Span],
    scaling: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries laid out as `q_spans` over keys laid out as `kv_spans`: merged (out, lse) in query order."""
    outs, lses = [], []
    q0 = 0
    for qs in q_spans:
        q = query[:, :, q0 : q0 + qs.length].contiguous()
        parts = []
        k0 = 0
        for ks in kv_spans:
            layout = rule.layout(ctx, qs, ks)
            if layout is not None:
                k = key[:, :, k0 : k0 + ks.length].contiguous()
                v = value[:, :, k0 : k0 + ks.length].contiguous()
                out, lse = block_attention(q, k, v, layout, scaling, softcap=softcap, return_lse=True)
                parts.append((out.transpose(1, 2), lse))
            k0 += ks.length
        out, lse = merge_partials(parts, q)
        outs.append(out)
        lses.append(lse)
        q0 += qs.length
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def needs(ctx: ShardContext, rule: Rule, q_spans: list[Span], kv_spans: list[Span]) -> bool:
    """Whether any of these queries may attend to any of these keys."""
    return any(rule.layout(ctx, qs, ks) is not None for qs in q_spans for ks in kv_spans)
